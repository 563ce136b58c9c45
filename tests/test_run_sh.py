"""run.sh end to end on 2 CPU processes: how each kind of run ENDS. A user error is our one `error:`
line and exit 2 (no launcher dump, no second rank's traceback); a crash still shows its traceback;
Ctrl-C saves, says how to resume and that the sample reply is skipped, and exits 0."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import demo
from conftest import ROOT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_sh")
    paths = demo.make_demo(root / "demo", train_rows=32, val_rows=4)
    bad_row = demo.make_row(random.Random(0))
    call = next(m for m in bad_row["messages"] if m.get("tool_calls"))
    call["tool_calls"][0]["function"]["arguments"] = '{"code": "print(1)"'  # a JSON string, cut short
    (root / "bad_row.jsonl").write_text(json.dumps(bad_row) + "\n")
    no_config = root / "no_config"
    shutil.copytree(paths["model"], no_config)
    (no_config / "config.json").unlink()
    bad_weights = root / "bad_weights"  # passes the preflight (it reads no weights); every worker stops on it
    shutil.copytree(paths["model"], bad_weights)
    (bad_weights / "model.safetensors").write_bytes(b"\x00" * 64)
    return dict(root=root, **paths, bad_row=root / "bad_row.jsonl", no_config=no_config, bad_weights=bad_weights)


def env_for(tiny, save, **over):
    env = {**os.environ, "PYTHON": sys.executable, "MODEL_PATH": str(tiny["model"]), "TRAIN_DATA": str(tiny["train"]),
           "EVAL_DATA": str(tiny["val"]), "SAVE_PATH": str(save), "OMP_NUM_THREADS": "1"}
    env.update({k: str(v) for k, v in over.items()})
    return {k: v for k, v in env.items() if v != "unset"}


def start(tiny, save, *args, **over):
    return subprocess.Popen(["bash", "run.sh", *args], cwd=ROOT, env=env_for(tiny, save, **over), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def test_user_errors_are_one_line_and_exit_2(tiny, tmp_path):
    cases = [  # (run.sh arguments, environment overrides, what the one error line says)
        (["data.train_batch_sise=16"], {}, "unknown key 'data.train_batch_sise' (did you mean data.train_batch_size?)"),
        (["data.train_batch_size=15", "ulysses_sequence_parallel_size=1"], {},
         "data.train_batch_size=15 is not divisible by the data-parallel size 2"),
        (["data.val_files=/nonexistent/val.parquet"], {}, "data file /nonexistent/val.parquet does not exist"),
        ([], {"TRAIN_DATA": tiny["bad_row"], "EVAL_DATA": tiny["bad_row"]}, "is not valid JSON"),
        (["ulysses_sequence_parallel_size=3"], {}, "ulysses_sequence_parallel_size=3 must divide the number of processes (2)"),
        ([], {"MODEL_PATH": tiny["no_config"]}, "config.json not found"),
        ([], {"MODEL_PATH": tiny["bad_weights"]}, "is not a readable safetensors file"),  # in the workers
        ([], {"TRAIN_DATA": "/nonexistent/train.parquet"}, "TRAIN_DATA=/nonexistent/train.parquet does not exist"),
        ([], {"MODEL_PATH": "unset", "HDFS_ROOT": tmp_path}, f"MODEL_PATH={tmp_path}/model/Qwen2.5-0.5B-Instruct does not exist"),
    ]
    procs = [start(tiny, tmp_path / f"out{i}", *args, **over) for i, (args, over, _) in enumerate(cases)]
    for (args, over, expected), proc in zip(cases, procs):
        out = proc.communicate(timeout=240)[0]
        errors = [line for line in out.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], (args, over, out)
        assert "Traceback" not in out and "ChildFailedError" not in out and "exitcode" not in out, out


def test_a_crash_shows_its_traceback(tiny, tmp_path):
    # A bug, not a user error: rank 1 cannot import plot (sitecustomize runs before train.py in the workers).
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nif os.environ.get('RANK') == '1':\n    sys.modules['plot'] = None\n")
    proc = start(tiny, tmp_path / "out", PYTHONPATH=tmp_path)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode not in (0, 2) and "Traceback" in out and "ModuleNotFoundError" in out, out


def test_ctrl_c_saves_says_so_and_exits_0(tiny, tmp_path):
    save = tmp_path / "out"
    proc = start(tiny, save, "trainer.total_epochs=50")  # 100 steps: the signal comes long before the end
    deadline = time.time() + 240
    while time.time() < deadline and not ((save / "metrics.jsonl").is_file() and (save / "metrics.jsonl").read_text()):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out
    step = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert f"stopped by signal after step {step}; rerun the same command to resume" in out, out
    assert "run.sh: stopped by a signal, so no sample reply" in out and "Traceback" not in out, out
    assert "--- reply:" not in out
    # The same command again resumes; done: counts this invocation's steps and says where it resumed.
    proc = start(tiny, save, "trainer.total_epochs=50", f"trainer.total_training_steps={step + 2}")
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out
    assert f"done: 2 steps (resumed at step {step}, now at {step + 2}) in " in out, out
    assert "--- reply:" in out and "run.sh: loss curve in" in out  # a finished run ends with the sample reply
    assert "=== score: " in out and "equal the reference calls" in out  # ... and the score of its tool calls
