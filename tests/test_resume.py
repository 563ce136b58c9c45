"""Resume exactness, safe checkpoints and run-stopping failures, through train.py itself."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import demo
import model as M
import checkpoint
import cli
from tests_util import distributed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    paths = demo.make_demo(tmp_path_factory.mktemp("demo"), train_rows=48, val_rows=8)
    return paths


def job_args(paths, out, *extra):
    return [f"data.train_files={paths['train']}", f"data.val_files={paths['val']}", "data.train_batch_size=8",
            "data.micro_batch_size_per_gpu=2", "data.multiturn.enable=true", f"model.partial_pretrain={paths['model']}",
            "trainer.total_epochs=2", "trainer.device=cpu", "use_remove_padding=true", "optim.lr=2e-3",
            "data.chat_template=qwen2.5",  # the demo model ships no chat template
            f"trainer.default_local_dir={out}", *extra]


def run_train(args, nproc=2, check=True):
    if nproc == 1:
        cmd = [sys.executable, "train.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact_mid_epoch_and_across_epoch_boundary(tiny_job, tmp_path):
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    sp2 = ["ulysses_sequence_parallel_size=2"]
    run_train(job_args(tiny_job, straight, *sp2))
    # 12 steps = 2 epochs of 6. Stop at 3 (mid-epoch 0), resume to 8 (across the boundary), resume to 12,
    # keeping at most 2 checkpoints; the second resume runs with dp=2 instead of sp=2 (layout-free state).
    # The pieces also switch sharding: HSDP (fsdp_size=1: 2 replicas) -> FSDP -> HSDP.
    hsdp = "model.fsdp_config.fsdp_size=1"
    run_train(job_args(tiny_job, pieces, *sp2, hsdp, "trainer.total_training_steps=3"))
    run_train(job_args(tiny_job, pieces, *sp2, "trainer.total_training_steps=8", "trainer.max_ckpt_to_keep=2"))
    run_train(job_args(tiny_job, pieces, hsdp, "trainer.max_ckpt_to_keep=2"))
    a, b = metrics(straight), metrics(pieces)
    assert [r["step"] for r in b] == list(range(1, 13)) == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-6, abs=1e-7), ra["step"]
        assert rb["train/lr"] == pytest.approx(ra["train/lr"], rel=1e-12)
    assert a[0]["train/loss"] > a[-1]["train/loss"] + 0.5  # it learns
    wa = load_file(straight / "global_step_12" / "huggingface" / "model.safetensors")
    wb = load_file(pieces / "global_step_12" / "huggingface" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k].float(), wb[k].float(), rtol=0, atol=2 ** -7 * wa[k].abs().max().item())
    assert sorted(p.name for p in pieces.glob("global_step_*")) == ["global_step_12", "global_step_8"]
    assert (pieces / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    # The saved HF model is the trained model: the fp32 master weights of the resume state, rounded
    # to bf16, give exactly the logits of the huggingface/ directory loaded by model.load_pretrained.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(pieces / "global_step_12" / "dcp", tmp_path / "full.pt")
    master = torch.load(tmp_path / "full.pt", weights_only=False)["model"]
    assert all(t.dtype == torch.float32 for t in master.values())
    trained = M.load_pretrained(tiny_job["model"])
    M.load_state_dict_into(trained, {k: v.to(torch.bfloat16) for k, v in master.items()})
    loaded = M.load_pretrained(pieces / "global_step_12" / "huggingface")
    ids = torch.arange(40) % 900
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    with torch.no_grad():
        assert torch.equal(loaded(ids, cu), trained(ids, cu))

    # A resume whose config changes the data order is refused, naming the difference.
    p = run_train(job_args(tiny_job, pieces, "data.train_batch_size=4"), nproc=1, check=False)
    assert p.returncode == 2
    assert "cannot resume from" in p.stderr and "train_batch_size 8 -> 4" in p.stderr
    assert "Traceback" not in p.stderr


def test_sigterm_saves_and_exits_then_resumes(tiny_job, tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, "train.py", *job_args(tiny_job, out, "trainer.total_epochs=4")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by signal after step" in stdout
    step = int((out / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= step < 24 and (out / f"global_step_{step}" / "trainer_state.json").is_file()
    run_train(job_args(tiny_job, out, "trainer.total_epochs=4"), nproc=1)
    assert [r["step"] for r in metrics(out)] == list(range(1, 25))


def test_repeated_nonfinite_grads_stop_the_run(tiny_job, tmp_path):
    bad = tmp_path / "nan_model"
    bad.mkdir()
    for f in Path(tiny_job["model"]).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    w = load_file(bad / "model.safetensors")
    w["model.norm.weight"][0] = float("nan")
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    args = job_args({**tiny_job, "model": bad}, tmp_path / "out", "trainer.max_consecutive_skips=2")
    p = run_train(args, nproc=1, check=False)
    assert p.returncode == 2
    assert "non-finite grad norm, update skipped (1 so far)" in p.stdout
    assert "2 consecutive steps had a non-finite gradient norm" in p.stderr and "Traceback" not in p.stderr


# --------------------------------------------------------------------------- crashes while saving

def _crash_worker(rank, world_size, paths, out):
    from test_train import load, tiny_model
    from test_train import save as save_as_run
    args = cli.parse_args(job_args(paths, out, "trainer.max_ckpt_to_keep=5"))
    model, _ = tiny_model(args, world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    cfg = M.read_config(paths["model"])

    def save(step):
        pos = dict(step=step, epoch=0, next_batch=step, skipped=0, consecutive_skips=0)
        return save_as_run(args, model, optimizer, scheduler, cfg, pos)
    save(1)
    seen = {}
    real_write_hf, real_replace = checkpoint.write_hf, os.replace

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    checkpoint.write_hf = disk_full
    try:
        save(2)
    except checkpoint.CheckpointError as e:
        seen["disk_full"] = str(e)
    checkpoint.write_hf = real_write_hf
    seen["after_disk_full"] = sorted(p.name for p in Path(out).iterdir() if p.name.startswith((".tmp", "global")))

    def killed(src, dst):  # the process dies just before the rename: nothing after it happens
        raise KeyboardInterrupt
    os.replace = killed
    try:
        save(3)
    except KeyboardInterrupt:
        seen["killed"] = True
    os.replace = real_replace
    seen["resume_from"] = str(checkpoint.find_resume(out))
    load(args, checkpoint.find_resume(out), model, optimizer, scheduler)
    return seen


def test_crash_during_save_keeps_previous_checkpoint(tiny_job, tmp_path):
    seen = distributed.run(_crash_worker, 1, tiny_job, tmp_path)[0]
    assert "could not write checkpoint" in seen["disk_full"] and "No space left" in seen["disk_full"]
    assert "previous checkpoint is intact" in seen["disk_full"]
    assert seen["after_disk_full"] == ["global_step_1"]
    assert seen["killed"] and seen["resume_from"] == str(tmp_path / "global_step_1")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert not (tmp_path / "global_step_3").exists()


def test_resume_errors(tmp_path):
    assert checkpoint.find_resume(tmp_path) is None  # nothing saved yet: a fresh start
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.find_resume(tmp_path)
    assert checkpoint.find_resume(tmp_path, "disable") is None
    with pytest.raises(checkpoint.CheckpointError, match="resume_from_path=.* is not a complete checkpoint"):
        checkpoint.find_resume(tmp_path, "resume_path", str(tmp_path / "nope"))
