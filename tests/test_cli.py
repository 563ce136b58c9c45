"""The command line: verl's old fsdp_sft_trainer keys and its current sft_trainer keys, each with its
own defaults; mixed commands, typos, template kwargs; one end-to-end run of verl's current example."""
import json
import math
import os
import subprocess
import sys

import pytest

import demo
import templates
import cli
import train
from conftest import REFERENCE, ROOT

# verl's multi-turn example for its current trainer (the text), with the shell variables filled
CURRENT_EXAMPLE = """
data.train_files={train} data.val_files={val}
data.messages_key=messages data.micro_batch_size_per_gpu=2
model.path={model} model.use_remove_padding=true engine=fsdp
engine.ulysses_sequence_parallel_size=2 trainer.default_local_dir={out}
trainer.project_name=multiturn-sft trainer.experiment_name=qwen-sp2
trainer.logger=["console","wandb"] trainer.total_training_steps=2
"""


def current_example(**paths):
    return CURRENT_EXAMPLE.format(**paths).split()


# verl's current defaults, read from its config files (sft_trainer_engine.yaml, model/hf_model.yaml,
# engine/fsdp.yaml, optim/fsdp.yaml), under our dest names
VERL_CURRENT_DEFAULTS = dict(
    train_batch_size=256, micro_batch_size_per_gpu=4, max_token_len_per_gpu=8192, use_dynamic_bsz=True,
    val_files=None, train_max_samples=-1, val_max_samples=-1, messages_key="messages", tools_key="tools",
    enable_thinking_key="enable_thinking", pad_mode="no_padding", max_length=1024, truncation="error",
    balance_dp_token=False, apply_chat_template_kwargs={}, num_workers=8, ignore_input_ids_mismatch=False,
    save_contents=["model", "optimizer", "extra"], project_name="gsm8k-sft", experiment_name="test", total_epochs=4,
    total_training_steps=None, seed=1, save_freq=-1, test_freq=-1, max_ckpt_to_keep=None, balance_batch=True,
    resume_mode="auto", resume_from_path=None, device="cuda", nnodes=1, n_gpus_per_node=1,
    custom_chat_template=None, enable_gradient_checkpointing=True, use_remove_padding=True, lora_rank=0,
    lora_alpha=16, target_modules=["all-linear"], use_liger=False, trust_remote_code=False, external_lib=None,
    strategy="fsdp", sp_size=1, fsdp_size=-1, model_dtype="fp32", dtype="bfloat16", offload_params=False,
    optimizer_offload=False, cpu_offload=False, min_num_params=0,
    lr=1e-3, warmup_steps_ratio=0.0, weight_decay=0.01, lr_warmup_steps=-1, betas=[0.9, 0.999], clip_grad=1.0,
    min_lr_ratio=0.0, num_cycles=0.5, lr_scheduler="constant",
)

# today's defaults (the old trainer's, SPEC §2) where the two differ
OLD_DEFAULTS = dict(lr=1e-5, betas=[0.9, 0.95], warmup_steps_ratio=0.1, lr_scheduler="cosine", use_dynamic_bsz=False,
                    max_token_len_per_gpu=16384, use_remove_padding=False, multiturn=False, n_gpus_per_node=8,
                    strategy="fsdp2")


# --------------------------------------------------------------------------- parsing

def test_current_example_parses_onto_the_same_dests():
    a = cli.parse_args(current_example(train="/d/t.parquet", val="/d/v.parquet", model="/m/q", out="/s/o"))
    assert a.dialect == cli.CURRENT
    assert a.train_files == ["/d/t.parquet"] and a.val_files == ["/d/v.parquet"] and a.partial_pretrain == "/m/q"
    assert (a.messages_key, a.micro_batch_size_per_gpu, a.use_remove_padding, a.sp_size) == ("messages", 2, True, 2)
    assert (a.engine, a.default_local_dir, a.logger, a.total_training_steps) == ("fsdp", "/s/o", ["console", "wandb"], 2)
    assert a.multiturn is True  # the current trainer reads messages columns only


def test_current_defaults_are_verls():
    a = vars(cli.parse_args(["model.path=/m"]))
    assert {k: a[k] for k in VERL_CURRENT_DEFAULTS} == VERL_CURRENT_DEFAULTS
    assert a["multiturn"] is True and a["enable_thinking_default"] is None and a["chat_template"] == "auto"
    assert a["default_local_dir"] == "checkpoints/gsm8k-sft/test"


@pytest.mark.parametrize("argv", [[], ["data.max_length=64", "trainer.total_epochs=1"],
                                  ["model.partial_pretrain=/m", "ulysses_sequence_parallel_size=2"]])
def test_old_or_shared_keys_keep_todays_defaults(argv):
    a = cli.parse_args(argv)
    assert a.dialect == cli.OLD
    assert {k: getattr(a, k) for k in OLD_DEFAULTS} == OLD_DEFAULTS
    # and the current trainer's extra options stay at the values that mean today's behaviour
    assert (a.lr_warmup_steps, a.min_lr_ratio, a.num_cycles, a.optimizer_offload) == (-1, 0.0, 0.5, False)


def test_a_current_only_key_switches_every_default():
    a, b = cli.parse_args(["data.max_length=64"]), cli.parse_args(["data.max_length=64", "optim.min_lr_ratio=0.1"])
    assert (a.dialect, b.dialect) == (cli.OLD, cli.CURRENT)
    assert {k: getattr(b, k) for k in OLD_DEFAULTS} == {k: VERL_CURRENT_DEFAULTS.get(k, True) for k in OLD_DEFAULTS}


def test_explicit_values_win_over_either_default():
    a = cli.parse_args(["model.path=/m", "optim.lr=2e-5", "data.use_dynamic_bsz=false", "optim.lr_scheduler_type=cosine",
                          "optim.lr_warmup_steps=7", "optim.num_cycles=1", "--engine.param_offload", "true"])
    assert (a.lr, a.use_dynamic_bsz, a.lr_scheduler, a.lr_warmup_steps, a.num_cycles, a.offload_params) == (
        2e-5, False, "cosine", 7, 1.0, True)


@pytest.mark.parametrize("new,old", [("model.path=/m", "model.partial_pretrain=/m"),
                                     ("engine.ulysses_sequence_parallel_size=2", "use_remove_padding=true"),
                                     ("data.messages_key=m", "data.multiturn.enable=true"),
                                     ("+optim.lr_scheduler_type=cosine", "optim.warmup_steps_ratio=0.1")])
def test_mixed_command_is_one_sentence_naming_a_key_of_each(new, old):
    for argv in ([new, old], [old, new]):
        with pytest.raises(cli.ConfigError) as e:
            cli.parse_args(["data.max_length=64"] + argv)
        msg = str(e.value)
        assert msg.count(".") >= 1 and "\n" not in msg
        assert new.lstrip("+").split("=")[0] in msg and old.split("=")[0] in msg and "one of the two" in msg


def test_mixed_command_names_the_current_spelling():
    with pytest.raises(cli.ConfigError, match="its sft_trainer name is engine.ulysses_sequence_parallel_size"):
        cli.parse_args(["model.path=/m", "ulysses_sequence_parallel_size=2"])


@pytest.mark.parametrize("argv,suggestion", [
    (["model.path=/m", "engine.ulysses_sequence_paralel_size=2"], "engine.ulysses_sequence_parallel_size"),
    (["model.partial_pretrain=/m", "ulysses_sequence_paralel_size=2"], "ulysses_sequence_parallel_size"),
    (["model.path=/m", "data.messages_kye=m"], "data.messages_key"),
    (["data.multiturn.enable=true", "data.multiturn.messages_kye=m"], "data.multiturn.messages_key"),
    (["model.path=/m", "optim.lr_schedular_type=cosine"], "optim.lr_scheduler_type"),
    (["model.partial_pretrain=/m", "model.pth=/m"], "model.lora_alpha"),  # model.path is not an old key
    (["model.pth=/m"], "model.path"),  # nothing decides the dialect: the closest key of either
])
def test_typo_names_the_closest_key_of_the_commands_dialect(argv, suggestion):
    bad = argv[-1].split("=")[0]
    with pytest.raises(cli.ConfigError, match=f"unknown key '{bad}' \\(did you mean {suggestion}\\?\\)"):
        cli.parse_args(argv)


@pytest.mark.parametrize("dialect_key", ["model.path=/m", "model.partial_pretrain=/m"])
def test_template_kwargs_with_and_without_plus_in_both_dialects(dialect_key):
    a = cli.parse_args([dialect_key, "+data.apply_chat_template_kwargs.enable_thinking=false",
                          "data.apply_chat_template_kwargs.n=3", "--data.apply_chat_template_kwargs.x", "0.5",
                          "data.apply_chat_template_kwargs.name='true'", "data.apply_chat_template_kwargs.z=null",
                          "data.apply_chat_template_kwargs.s=hello"])
    assert a.apply_chat_template_kwargs == dict(enable_thinking=False, n=3, x=0.5, name="true", z=None, s="hello")
    assert a.dialect == (cli.CURRENT if dialect_key.startswith("model.path") else cli.OLD)
    assert type(a.apply_chat_template_kwargs["enable_thinking"]) is bool


def test_template_kwargs_dict_form_and_later_wins():
    a = cli.parse_args(["data.apply_chat_template_kwargs.a=1", "data.apply_chat_template_kwargs={enable_thinking: True, b: x}",
                          "data.apply_chat_template_kwargs.b=2"])
    assert a.apply_chat_template_kwargs == dict(enable_thinking=True, b=2)
    assert cli.parse_args(["data.apply_chat_template_kwargs={}"]).apply_chat_template_kwargs == {}
    assert cli.parse_args([]).apply_chat_template_kwargs == {} and cli.parse_args([]).apply_chat_template_kwargs \
        is not cli.parse_args([]).apply_chat_template_kwargs


@pytest.mark.parametrize("argv,message", [
    (["data.apply_chat_template_kwargs=enable_thinking"], "is not a dict"),
    (["data.apply_chat_template_kwargs.=1"], "write data.apply_chat_template_kwargs.KEY=VALUE"),
    (["data.apply_chat_template_kwargsx=1"], "unknown key 'data.apply_chat_template_kwargsx'"),
    (["data.enable_thinking_default=maybe"], "is not a boolean"),
    (["optim.lr_scheduler_type=wsd"], "invalid choice"),
    (["engine=megatron"], "invalid choice"),
    (["data.pad_mode=left"], "invalid choice"),
])
def test_bad_values_are_one_sentence(argv, message):
    with pytest.raises(cli.ConfigError, match=message):
        cli.parse_args(argv)


@pytest.mark.parametrize("value,expected", [("true", True), ("False", False), ("null", None), ("none", None)])
def test_enable_thinking_default(value, expected):
    assert cli.parse_args([f"data.enable_thinking_default={value}"]).enable_thinking_default is expected


def test_custom_chat_template_only_as_an_official_text():
    qwen = REFERENCE / "qwen2.5-0.5b-instruct"
    if not qwen.is_dir():
        pytest.skip("../shared/reference not present")
    text = templates.read_template(qwen)
    assert cli.parse_args(["model.path=/m", f"model.custom_chat_template={text}"]).chat_template == "qwen2.5"
    for argv in ([f"model.custom_chat_template={text} "], [f"model.custom_chat_template={text}", "data.chat_template=qwen3"]):
        with pytest.raises(cli.ConfigError, match="is not the exact text of an official"):
            cli.parse_args(argv)


@pytest.mark.parametrize("extra,world,message", [
    (["engine.ulysses_sequence_parallel_size=2", "model.use_remove_padding=false", "data.use_dynamic_bsz=false"], 2,
     "engine.ulysses_sequence_parallel_size > 1 needs model.use_remove_padding=true"),
    (["model.use_remove_padding=false"], 1, "data.use_dynamic_bsz=true needs model.use_remove_padding=true"),
    (["engine.fsdp_size=3"], 4, "engine.fsdp_size=3 must be -1"),
    (["optim.lr_warmup_steps_ratio=2"], 1, r"optim.lr_warmup_steps_ratio in \[0, 1\]"),
    (["optim.min_lr_ratio=1.5"], 1, r"optim.min_lr_ratio=1.5 must be in \[0, 1\]"),
    (["optim.betas=[0.9]"], 1, "must be two numbers"),
    (["engine.dtype=float16"], 1, "engine.dtype=float16 is not supported"),
    (["checkpoint.save_contents=[model,weights]"], 1, r"unknown item\(s\) \['weights'\]"),
    (["data.apply_chat_template_kwargs.enable_thinking=1"], 1, "enable_thinking=1 must be true or false"),
    (["data.custom_cls.path=my.py"], 1, "data.custom_cls is not supported"),
    ([], 1, "data file x does not exist"),
])
def test_combinations_name_the_current_keys(extra, world, message):
    args = cli.parse_args(["data.train_files=x", "model.path=y"] + extra)
    with pytest.raises(cli.ConfigError, match=message):
        cli.validate(args, world)


def test_accepted_current_keys_validate():
    args = cli.parse_args(["data.train_files=x", "model.path=y", "data.ignore_input_ids_mismatch=true",
                             "data.num_workers=0", "trainer.balance_batch=false", "engine=fsdp2",
                             "checkpoint.save_contents=[model,optimizer,extra,hf_model]", "engine.offload_policy=true"])
    with pytest.raises(cli.ConfigError, match="data file x does not exist"):  # every key check passed
        cli.validate(args, 2)
    with pytest.raises(cli.ConfigError, match="model.path is required"):
        cli.validate(cli.parse_args(["data.train_files=x", "data.messages_key=m"]), 1)


# --------------------------------------------------------------------------- schedules

def verl_cosine(step, warmup, total, min_lr_ratio, num_cycles):
    """verl's get_cosine_schedule_with_warmup after warmup (verl/utils/torch_functional.py), as written there."""
    progress = (step - warmup) / max(1, total - warmup)
    x = math.cos(math.pi * num_cycles * 2.0 * progress)
    return max(min_lr_ratio, x * (1 - min_lr_ratio) * 0.5 + (1 + min_lr_ratio) * 0.5)


@pytest.mark.parametrize("min_lr_ratio,num_cycles", [(0.0, 0.5), (0.1, 0.5), (0.2, 1.0), (0.0, 0.25)])
def test_cosine_is_verls_after_warmup(min_lr_ratio, num_cycles):
    f = train.lr_lambda(50, 0.2, "cosine", min_lr_ratio=min_lr_ratio, num_cycles=num_cycles)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])  # ours: first update > 0
    for s in range(10, 60):
        assert f(s) == pytest.approx(verl_cosine(s, 10, 50, min_lr_ratio, num_cycles), abs=1e-12), s


def test_constant_schedule_and_warmup_steps_win_over_the_ratio():
    f = train.lr_lambda(100, 0.0, "constant")
    assert {f(s) for s in range(100)} == {1.0}
    g = train.lr_lambda(100, 0.5, "constant", warmup_steps=4)
    assert [g(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    h = train.lr_lambda(100, 0.1, "cosine", warmup_steps=-1)  # -1: the ratio, as verl
    assert h(9) == 1.0 and h(8) == pytest.approx(0.9)


# --------------------------------------------------------------------------- end to end

WANDB_STUB = '''"""A stand-in for wandb in this test: records what train.py logs."""
import json
import os


class _Run:
    def log(self, rec, step=None):
        with open(os.environ["WANDB_STUB_LOG"], "a") as f:
            f.write(json.dumps({"step": step, **rec}) + "\\n")


def init(project=None, name=None, config=None):
    return _Run()
'''


def torchrun(argv, env):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_current_example_runs_unchanged_and_equals_the_old_dialect(tmp_path):
    """verl's current multi-turn example, 2 CPU processes with sp 2 (wandb logger included, via a stub):
    its resolved config is verl's defaults, and the old dialect with those defaults gives the same losses."""
    paths = demo.make_demo(tmp_path / "demo", train_rows=16, val_rows=4)
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "wandb.py").write_text(WANDB_STUB)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(stub), "WANDB_STUB_LOG": str(tmp_path / "wandb.jsonl")}
    # "$@": the demo is 16 rows and its model ships no chat template to recognise (both keys of both dialects)
    at = ["data.train_batch_size=8", "data.chat_template=qwen2.5"]
    new_out, old_out = tmp_path / "new", tmp_path / "old"
    p = torchrun(current_example(train=paths["train"], val=paths["val"], model=paths["model"], out=new_out) + at, env)
    assert p.stdout.splitlines()[0] == "command line: verl sft_trainer keys, with its defaults"
    resolved = json.loads((new_out / "run.json").read_text())
    given = dict(train_files=[str(paths["train"])], val_files=[str(paths["val"])], micro_batch_size_per_gpu=2,
                 sp_size=2, logger=["console", "wandb"], total_training_steps=2, train_batch_size=8,
                 project_name="multiturn-sft", experiment_name="qwen-sp2", partial_pretrain=str(paths["model"]))
    expected = {**VERL_CURRENT_DEFAULTS, **given}
    assert {k: resolved[k] for k in expected} == expected
    new = [json.loads(line) for line in (new_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in new] == [1, 2] and all(r["train/lr"] == 1e-3 for r in new)
    logged = [json.loads(line) for line in (tmp_path / "wandb.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in logged] == [r["train/loss"] for r in new]

    old_dialect = [f"data.train_files={paths['train']}", f"data.val_files={paths['val']}", "data.multiturn.enable=true",
                   "data.multiturn.messages_key=messages", "data.micro_batch_size_per_gpu=2",
                   f"model.partial_pretrain={paths['model']}", "use_remove_padding=true", "model.strategy=fsdp",
                   "ulysses_sequence_parallel_size=2", f"trainer.default_local_dir={old_out}",
                   "trainer.logger=['console']", "trainer.total_training_steps=2", *at,
                   # the current trainer's defaults, spelled in the old dialect
                   "optim.lr=1e-3", "optim.betas=[0.9,0.999]", "optim.warmup_steps_ratio=0", "optim.lr_scheduler=constant",
                   "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=8192"]
    p = torchrun(old_dialect, env)
    assert p.stdout.splitlines()[0] == "command line: verl fsdp_sft_trainer keys, with its defaults"
    old = [json.loads(line) for line in (old_out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(new, old, strict=True):
        assert ("val/loss" in a) == ("val/loss" in b) == (a["step"] == 2)
        for k in ("train/loss", "train/grad_norm", "train/lr", "train/trained_tokens", "val/loss"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-6), k
