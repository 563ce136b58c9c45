import numpy as np
import pytest
import torch

import batches
import lora
import model as M
import parallel
import checkpoint
import generate
import cli
import train
from tests_util import distributed

REFERENCE_COMMAND = """
data.train_files=/d/train.parquet data.val_files=/d/train.parquet data.max_length=16384
data.train_batch_size=16 data.multiturn.enable=true data.multiturn.messages_key=messages
data.multiturn.tools_key=tools data.micro_batch_size_per_gpu=2
model.partial_pretrain=/m/Qwen2.5-0.5B-Instruct model.strategy=fsdp
trainer.default_local_dir=/s/ckpt trainer.project_name=wuxibin-multiturn-sft
trainer.experiment_name=multiturn-sft-Qwen2.5-0.5B-Instruct trainer.logger=["console"] trainer.total_epochs=2
ulysses_sequence_parallel_size=2 use_remove_padding=true
""".split()


def test_reference_command_parses():
    a = cli.parse_args(REFERENCE_COMMAND)
    assert a.train_files == ["/d/train.parquet"] and a.val_files == ["/d/train.parquet"]
    assert (a.max_length, a.train_batch_size, a.micro_batch_size_per_gpu) == (16384, 16, 2)
    assert a.multiturn is True and a.messages_key == "messages" and a.tools_key == "tools"
    assert a.partial_pretrain == "/m/Qwen2.5-0.5B-Instruct" and a.strategy == "fsdp"
    assert a.default_local_dir == "/s/ckpt" and a.logger == ["console"] and a.total_epochs == 2
    assert a.sp_size == 2 and a.use_remove_padding is True
    # defaults of SPEC §2
    assert (a.lr, a.betas, a.weight_decay, a.clip_grad, a.warmup_steps_ratio) == (1e-5, [0.9, 0.95], 0.01, 1.0, 0.1)
    assert (a.seed, a.save_freq, a.test_freq, a.resume_mode, a.truncation) == (1, -1, -1, "auto", "error")
    assert a.enable_gradient_checkpointing is True and a.lr_scheduler == "cosine"


def test_argument_forms_aliases_and_later_wins():
    a = cli.parse_args(["--data.max_length", "64", "--optim.lr=2e-4", "+data.micro_batch_size=3",
                          "optim.lr_warmup_steps_ratio=0.5", "data.max_length=128", "trainer.logger=[console,wandb]",
                          "optim.betas=[0.8, 0.9]", "trainer.total_training_steps=null", "data.val_files=None"])
    assert a.max_length == 128 and a.lr == 2e-4 and a.micro_batch_size_per_gpu == 3
    assert a.warmup_steps_ratio == 0.5 and a.logger == ["console", "wandb"] and a.betas == [0.8, 0.9]
    assert a.total_training_steps is None and a.val_files is None
    assert cli.parse_args([]).default_local_dir == "checkpoints/gsm8k-sft/test"


@pytest.mark.parametrize("argv,message", [
    (["data.max_lenght=5"], "unknown key 'data.max_lenght' (did you mean data.max_length?)"),
    (["use_remove_padding=maybe"], "use_remove_padding: 'maybe' is not a boolean"),
    (["optim.betas=[0.9,x]"], "is not a list of numbers"),
    (["trainer.logger=[console"], "is not a list"),
    (["data.truncation=middle"], "invalid choice"),
    (["stray"], "argument 'stray' is not key=value"),
])
def test_bad_command_lines(argv, message):
    with pytest.raises(cli.ConfigError) as e:
        cli.parse_args(argv)
    assert message in str(e.value)


@pytest.mark.parametrize("extra,world,message", [
    (["ulysses_sequence_parallel_size=2"], 2, "needs use_remove_padding=true"),
    (["ulysses_sequence_parallel_size=3", "use_remove_padding=true"], 2, "must divide the number of processes"),
    (["data.train_batch_size=15"], 2, "not divisible by the data-parallel size 2"),
    (["data.train_batch_size=16", "data.micro_batch_size_per_gpu=3"], 2, "must divide the per-rank batch 8"),
    (["model.lora_rank=-1"], 1, "model.lora_rank=-1 must be >= 0"),
    (["model.lora_rank=8", "model.lora_alpha=0"], 1, "model.lora_alpha=0 must be > 0"),
    (["model.lora_rank=8", "model.target_modules=[q_proj,lm_head]"], 1,
     "model.target_modules has unknown module\\(s\\) \\['lm_head'\\]; use all-linear or a list of q_proj, k_proj"),
    (["model.lora_rank=8", "model.target_modules=[]"], 1, "model.target_modules is empty"),
    (["model.use_liger=true"], 1, "use_liger=true is not supported"),
    (["model.trust_remote_code=true"], 1, "trust_remote_code"),
    (["trainer.logger=[console,mlflow]"], 1, "has an unknown logger"),
    (["data.use_dynamic_bsz=true"], 1, "needs use_remove_padding=true"),
    (["data.use_dynamic_bsz=true", "use_remove_padding=true", "data.max_token_len_per_gpu=512"], 1,
     "data.max_length=1024 exceeds the micro-batch token budget 512"),
    ([], 1, "data file x does not exist"),
    (["data.max_length=0"], 1, "data.max_length=0 must be at least 1"),
    (["optim.warmup_steps_ratio=2"], 1, "warmup_steps_ratio in \\[0, 1\\]"),
    (["model.fsdp_config.fsdp_size=3"], 4, r"fsdp_size=3 must be -1 \(shard over all 4 processes\) or one of \[1, 2, 4\]"),
    (["model.fsdp_config.fsdp_size=0"], 2, r"fsdp_size=0 must be -1"),
    (["model.fsdp_config.fsdp_size=4", "data.train_batch_size=4", "data.micro_batch_size_per_gpu=1"], 2,
     r"fsdp_size=4 must be -1"),
])
def test_bad_combinations(extra, world, message):
    # each combination error comes before the file checks, so the paths need not exist
    args = cli.parse_args(["data.train_files=x", "model.partial_pretrain=y"] + extra)
    with pytest.raises(cli.ConfigError, match=message):
        cli.validate(args, world)


def test_schedule_first_update_nonzero_and_cosine_to_zero():
    f = train.lr_lambda(100, 0.1, "cosine")
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(10) == 1.0
    assert f(55) == pytest.approx(0.5) and 0 < f(99) < 0.001
    w = train.lr_lambda(100, 0.1, "wsd")
    assert w(50) == 1.0 and w(89) == 1.0 and w(95) == pytest.approx(0.5)


# --------------------------------------------------------------------------- step equalities

TINY = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=64, hidden_size=32,
            intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=128)
LENGTHS = [7, 12, 3, 20, 9, 15, 4, 11]


def samples():
    g = np.random.default_rng(0)
    out = []
    for L in LENGTHS:
        mask = (g.random(L) < 0.6).astype(np.uint8)
        mask[-1] = 1
        out.append((g.integers(0, 64, L), mask))
    return out


def tiny_model(args, world_size, fsdp_size=-1, compute_dtype=None):
    """The training model and this rank's batching, built as train.run builds them (compute_dtype
    bf16 runs the GPU recipe on CPU)."""
    world_mesh, dp_sp = parallel.build_meshes("cpu", world_size, args.sp_size, fsdp_size)
    master_dtype = torch.float32 if args.model_dtype in ("fp32", "float32") else torch.bfloat16
    model = M.load_pretrained(args.partial_pretrain, dtype=master_dtype)
    if args.lora_rank > 0:
        lora.apply(model, args.lora_rank, args.lora_alpha, args.target_modules, seed=args.seed)
    model = parallel.parallelize(model, world_mesh, dp_sp["sp"].get_group(), args.sp_size,
                                 param_dtype=compute_dtype or torch.float32, recompute=args.enable_gradient_checkpointing)
    return model, train.batcher(args, dp_sp, 0, torch.device("cpu"))


def one_step(model, rank_batches, batch=np.arange(8)):
    micro, _ = rank_batches(samples(), batch)
    return train.forward_backward(model, micro, torch.distributed.get_world_size())


def save(args, model, optimizer, scheduler, cfg, position):
    """checkpoint.save_checkpoint as train.run calls it."""
    return checkpoint.save_checkpoint(args.default_local_dir, model, optimizer, scheduler, position, cfg=cfg,
                                      base_model=args.partial_pretrain, config=train.resume_config(args),
                                      lora=train.lora_spec(args), keep=args.max_ckpt_to_keep)


def load(args, path, model, optimizer, scheduler):
    """checkpoint.load_checkpoint as train.run calls it."""
    return checkpoint.load_checkpoint(path, model, optimizer, scheduler, config=train.resume_config(args),
                                      lora=train.lora_spec(args))


def _step_worker(rank, world_size, model_dir, variants, save_dir):
    results = []
    for v in variants:
        args = cli.parse_args([f"model.partial_pretrain={model_dir}", f"data.train_files={model_dir}", "data.train_batch_size=8", "data.max_length=20",
                                 f"ulysses_sequence_parallel_size={v['sp']}", f"use_remove_padding={v['packed']}",
                                 f"data.micro_batch_size_per_gpu={v['mbs']}", "trainer.device=cpu",
                                 f"model.enable_gradient_checkpointing={v.get('ckpt', False)}",
                                 f"trainer.default_local_dir={save_dir}", "optim.lr=1e-2",
                                 f"data.use_dynamic_bsz={'dynamic' in v}", f"data.max_token_len_per_gpu={v.get('dynamic', 20)}"])
        cli.validate(args, world_size)
        model, rank_batches = tiny_model(args, world_size, v.get("fsdp", -1), torch.bfloat16 if v.get("bf16") else None)
        loss, n_tokens = one_step(model, rank_batches)
        grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
        # clip_grad_norm_ over DTensor gradients (2-D on HSDP) must give the global norm
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        results.append((loss, n_tokens, grads, float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)))
        if v.get("save"):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            optimizer.step()
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            position = dict(step=1, epoch=0, next_batch=1, skipped=0, consecutive_skips=0)
            save(args, model, optimizer, scheduler, M.read_config(model_dir), position)
            full = {k: t.to(torch.bfloat16).float() for k, t in model.state_dict().items()}
            full = {k: (t.full_tensor() if hasattr(t, "full_tensor") else t) for k, t in full.items()}
            results.append(full)
    return results


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    M.save_pretrained(M.build_random(TINY, seed=3), path)
    return path


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
    variants = [dict(sp=1, mbs=4, packed=True), dict(sp=1, mbs=1, packed=True), dict(sp=1, mbs=4, packed=False),
                dict(sp=1, mbs=2, packed=True, ckpt=True), dict(sp=1, mbs=4, packed=True, dynamic=30)]
    return distributed.run(_step_worker, 1, model_dir, variants, tmp_path_factory.mktemp("s1"))[0]


@pytest.fixture(scope="module")
def two_processes(model_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("s2")
    variants = [dict(sp=1, mbs=4, packed=True), dict(sp=2, mbs=4, packed=True), dict(sp=2, mbs=1, packed=True),
                dict(sp=1, mbs=2, packed=False, save=True), dict(sp=1, mbs=4, packed=True, dynamic=24),
                dict(sp=2, mbs=4, packed=True, dynamic=10), dict(sp=2, mbs=2, packed=True, bf16=True),
                dict(sp=1, mbs=4, packed=True, fsdp=1), dict(sp=1, mbs=1, packed=True, fsdp=1),
                dict(sp=1, mbs=2, packed=True, fsdp=2), dict(sp=2, mbs=2, packed=True, fsdp=1, dynamic=12)]
    return distributed.run(_step_worker, 2, model_dir, variants, save), save


def assert_same_step(a, b):
    assert a[1] == b[1]  # trained-token count
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    for k in a[2]:
        torch.testing.assert_close(a[2][k], b[2][k], rtol=1e-5, atol=1e-7)
    assert a[3] == pytest.approx(b[3], rel=1e-5)  # grad norm


@pytest.mark.parametrize("i,what", [(1, "micro-batch 1 == 4"), (2, "padded == packed"), (3, "recompute == none"),
                                    (4, "token budget == fixed micro-batches")])
def test_one_process_equalities(one_process, i, what):
    assert_same_step(one_process[i], one_process[0])


@pytest.mark.parametrize("i,what", [(0, "dp=2 == dp=1"), (1, "sp=2 == sp=1"), (2, "sp=2 mbs=1 == sp=1"),
                                    (3, "dp=2 padded mbs=2 == dp=1"), (5, "dp=2 token budget == dp=1"),
                                    (6, "sp=2 token budget == sp=1"), (8, "hsdp fsdp_size=1 (replicated) == dp=1"),
                                    (9, "fsdp_size=1 mbs=1 (no_sync skips the all-reduce) == dp=1"),
                                    (10, "fsdp_size=2 (= world, plain FSDP) == dp=1"),
                                    (11, "fsdp_size=1 sp=2 token budget == dp=1")])
def test_two_process_equalities(one_process, two_processes, i, what):
    for rank_result in two_processes[0]:
        assert_same_step(rank_result[i], one_process[0])


# --------------------------------------------------------------------------- validation metrics

def greedy_turn_samples(model_dir, n=10):
    """Val samples (ids, mask, turn, calls) whose turns the tiny model reproduces or not, by construction: each
    reply is the model's greedy continuation of everything before it, except in about 40% of the turns, where
    one reply token is swapped for another. Then, independently, greedy decoding (generate.generate) from each
    turn's prompt says which turns it reproduces token for token: [bool per turn, in global turn order]."""
    m = M.load_pretrained(model_dir).eval()
    g = np.random.default_rng(7)
    samples = []
    for j in range(n):
        ids, mask, turn = [], [], []
        for k in range(1 + j % 3):
            prompt = g.integers(0, TINY["vocab_size"], int(g.integers(2, 5))).tolist()
            reply = generate.generate(m, ids + prompt, 4)
            if g.random() < 0.4:
                i = int(g.integers(0, 4))
                reply[i] = (reply[i] + 1) % TINY["vocab_size"]  # not the argmax: this turn is not reproduced
            ids, mask, turn = ids + prompt + reply, mask + [0] * len(prompt) + [1] * 4, turn + [-1] * len(prompt) + [k] * 4
        samples.append((np.array(ids), np.array(mask, dtype=np.uint8), np.array(turn, dtype=np.int32),
                        (g.random(1 + j % 3) < 0.5).astype(np.uint8)))
    reproduced = []
    for ids, _, turn, _ in samples:
        for k in range(int(turn.max()) + 1):
            at = np.flatnonzero(turn == k)
            reproduced.append(generate.generate(m, ids[:at[0]].tolist(), len(at)) == ids[at].tolist())
    return samples, reproduced


def _val_worker(rank, world_size, model_dir, val, variants):
    calls = torch.from_numpy(np.concatenate([s[3] for s in val])).bool()
    out = []
    for v in variants:
        args = cli.parse_args([f"model.partial_pretrain={model_dir}", f"data.train_files={model_dir}",
                                 f"ulysses_sequence_parallel_size={v['sp']}", f"use_remove_padding={v['packed']}",
                                 f"data.micro_batch_size_per_gpu={v['mbs']}", "trainer.device=cpu"])
        model, rank_batches = tiny_model(args, world_size)
        micro = rank_batches(val, np.arange(len(val)), max_tokens=None)[0]
        out.append((train.evaluate(model, micro, calls), train.val_counts(model, micro, len(calls))[1]))
    return out


@pytest.fixture(scope="module")
def val_runs(model_dir):
    val, reproduced = greedy_turn_samples(model_dir)
    one = distributed.run(_val_worker, 1, model_dir, val, [dict(sp=1, mbs=4, packed=True), dict(sp=1, mbs=1, packed=False),
                                                          dict(sp=1, mbs=3, packed=True)])[0]
    two = distributed.run(_val_worker, 2, model_dir, val, [dict(sp=1, mbs=2, packed=True), dict(sp=2, mbs=4, packed=True),
                                                          dict(sp=2, mbs=1, packed=True), dict(sp=1, mbs=3, packed=False)])
    return val, reproduced, one, two


def test_turn_exact_is_what_greedy_decoding_reproduces(val_runs):
    val, reproduced, one, _ = val_runs
    rec, per_turn = one[0]
    exact = ((per_turn[0] > 0) & (per_turn[1] == 0)).tolist()
    assert exact == reproduced and 0 < sum(reproduced) < len(reproduced)  # both outcomes, turn by turn
    calls = np.concatenate([s[3] for s in val]).astype(bool)
    assert rec["val/turns"] == len(reproduced) and rec["val/tool_call_turns"] == calls.sum() > 0
    assert rec["val/turn_exact"] == pytest.approx(np.mean(reproduced))
    assert rec["val/tool_call_exact"] == pytest.approx(np.mean(np.array(reproduced)[calls]))
    assert 0 < rec["val/token_acc"] < 1


def test_val_metrics_identical_across_layouts(val_runs):
    """micro-batch 1 == 3 == 4, padded == packed, dp=2 and sp=2 == 1 process: the same counts, fractions and
    per-turn results (the loss to rounding)."""
    _, _, one, two = val_runs
    ref, ref_turns = one[0]
    for rec, per_turn in one[1:] + [r for rank in two for r in rank]:
        assert torch.equal(per_turn, ref_turns)
        assert {k: v for k, v in rec.items() if k != "val/loss"} == {k: v for k, v in ref.items() if k != "val/loss"}
        assert rec["val/loss"] == pytest.approx(ref["val/loss"], rel=1e-5)


def _resume_worker(rank, world_size, model_dir, out, layouts):
    """Per (a, b): two steps with fsdp_size=a, a checkpoint after the first; then the second step
    again after resuming that checkpoint into fsdp_size=b. Returns (loss, weights) of step 2 both ways."""
    results = []
    for a, b in layouts:
        args = cli.parse_args([f"model.partial_pretrain={model_dir}", f"data.train_files={model_dir}",
                                 "data.train_batch_size=4", "data.micro_batch_size_per_gpu=1", "use_remove_padding=true",
                                 "trainer.device=cpu", "model.enable_gradient_checkpointing=false",
                                 f"trainer.default_local_dir={out / f'{a}_to_{b}'}"])
        runs = []
        for fsdp_size, resumed in ((a, False), (b, True)):
            model, rank_batches = tiny_model(args, world_size, fsdp_size)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
            if resumed:
                load(args, out / f"{a}_to_{b}" / "global_step_1", model, optimizer, scheduler)
            for step in (1,) if resumed else (0, 1):
                loss, _ = one_step(model, rank_batches, batch=np.arange(4) + 4 * step)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # (all ranks) clips: the norm matters
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if step == 0:
                    position = dict(step=1, epoch=0, next_batch=1, skipped=0, consecutive_skips=0)
                    save(args, model, optimizer, scheduler, TINY, position)
            runs.append((loss, {k: t.full_tensor() for k, t in model.state_dict().items()}))
        results.append(runs)
    return results


def test_resume_across_hsdp_and_fsdp_layouts(model_dir, tmp_path):
    # world 2: fsdp_size=1 is HSDP (2 replicas of 1 shard), 2 and -1 are plain FSDP over both ranks
    layouts = [(1, 2), (-1, 1)]
    for rank_result in distributed.run(_resume_worker, 2, model_dir, tmp_path, layouts):
        for (a, b), ((loss_a, w_a), (loss_b, w_b)) in zip(layouts, rank_result):
            assert loss_b == pytest.approx(loss_a, rel=1e-6), (a, b)
            for k in w_a:
                torch.testing.assert_close(w_b[k], w_a[k], rtol=1e-6, atol=1e-8)


def test_loss_is_token_mean(one_process, model_dir):
    m = M.load_pretrained(model_dir)
    b = batches.pack(samples())
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(m(b["input_ids"], b["cu_seqlens"]), b["labels"], ignore_index=-100)
    assert one_process[0][0] == pytest.approx(float(ce), rel=1e-5)
    assert one_process[0][1] == int((b["labels"] != -100).sum())


def test_checkpoint_reloads_to_the_trained_weights(two_processes):
    results, save = two_processes
    trained = results[0][4]
    hf = save / "global_step_1" / "huggingface"
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (hf / "generation_config.json").is_file()
    loaded = M.load_pretrained(hf)
    ref = M.build_random(TINY)
    M.load_state_dict_into(ref, trained)
    b = batches.pack(samples())
    with torch.no_grad():
        assert torch.equal(loaded(b["input_ids"], b["cu_seqlens"]), ref(b["input_ids"], b["cu_seqlens"]))


def test_missing_logger_package_is_one_sentence():
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    args = cli.parse_args(["data.train_files=x", "model.partial_pretrain=y", "trainer.logger=['console','wandb']"])
    with pytest.raises(cli.ConfigError, match="includes wandb but it is not installed; pip install wandb"):
        cli.validate(args, 1)


def test_real_tokenizer_and_reference_parquet_end_to_end(tmp_path):
    """train.py on the real ReTool-layout parquet with the real Qwen2.5 tokenizer (a tiny random model
    with Qwen2.5's vocabulary), 1 process: one step trains, validates and saves."""
    import json
    import shutil
    import subprocess
    import sys
    from conftest import REFERENCE, ROOT
    qwen = REFERENCE / "qwen2.5-0.5b-instruct"
    if not qwen.is_dir():
        pytest.skip("../shared/reference not present")
    model_dir = tmp_path / "model"
    cfg = {**json.loads((qwen / "config.json").read_text()), "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
    M.save_pretrained(M.build_random(cfg), model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(qwen / name, model_dir / name)
    data_file = REFERENCE / "retool_like_sample.parquet"
    p = subprocess.run([sys.executable, "train.py", f"data.train_files={data_file}", f"data.val_files={data_file}",
                        "data.train_batch_size=8", "data.micro_batch_size_per_gpu=4", "data.max_length=2048",
                        "data.multiturn.enable=true", f"model.partial_pretrain={model_dir}", "trainer.total_epochs=1",
                        "use_remove_padding=true", "trainer.device=cpu", f"trainer.default_local_dir={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert rec["step"] == 1 and 11 < rec["train/loss"] < 13 and 11 < rec["val/loss"] < 13  # ~ln(151936) = 11.9
    assert rec["val/turns"] > rec["val/tool_call_turns"] > 0 and 0 <= rec["val/tool_call_exact"] <= 1
    assert f"turn_exact {rec['val/turn_exact']:.3f} of {rec['val/turns']}" in p.stdout
    hf = tmp_path / "out" / "global_step_1" / "huggingface"
    assert (hf / "tokenizer_config.json").read_text() == (qwen / "tokenizer_config.json").read_text()
    M.load_pretrained(hf)


def test_bf16_compute_recipe_is_close_to_fp32(one_process, two_processes):
    """The GPU recipe (bf16 compute weights, fp32 master weights and gradient reduction), run on CPU
    with sp=2: the same step to bf16 accuracy."""
    bf16, ref = two_processes[0][0][7], one_process[0]
    assert bf16[1] == ref[1]
    assert bf16[0] == pytest.approx(ref[0], rel=2e-2)
    for k in ref[2]:
        assert bf16[2][k].dtype == torch.float32
        err = (bf16[2][k] - ref[2][k]).norm() / ref[2][k].norm().clamp(min=1e-12)
        assert err < 0.05, k


def test_qwen3_real_tokenizer_sp2_equals_sp1_and_dp2(tmp_path):
    """A tiny random Qwen3 with the real Qwen3 tokenizer files (its template recognised from
    tokenizer_config.json) trained on the Qwen3 reference conversations (reasoning, tools, per-row
    enable_thinking) as JSONL: sp=2 and dp=2 on 2 gloo processes == 1 process, loss and grad norm."""
    import json
    import shutil
    from conftest import REFERENCE
    from test_resume import metrics, run_train
    qwen3 = REFERENCE / "qwen3"
    if not qwen3.is_dir():
        pytest.skip("../shared/reference not present")
    model_dir = tmp_path / "model"
    cfg = {**json.loads((qwen3 / "config.json").read_text()), "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    m = M.build_random(cfg, seed=5)
    with torch.no_grad():  # q_norm / k_norm away from ones so Ulysses must carry them right
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    M.save_pretrained(m, model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(qwen3 / name, model_dir / name)
    cases = json.loads((qwen3 / "chat_template_cases.json").read_text())["cases"]
    rows = [{"messages": c["messages"], "tools": c["tools"], "enable_thinking": c["kwargs"].get("enable_thinking")}
            for c in cases if c["messages"][-1]["role"] == "assistant"
            and all(isinstance(msg.get("content"), (str, type(None))) for msg in c["messages"])]
    assert len(rows) >= 16 and any(r["enable_thinking"] is False for r in rows)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for name, nproc, extra in (("sp1", 1, []), ("sp2", 2, ["ulysses_sequence_parallel_size=2"]), ("dp2", 2, [])):
        out = tmp_path / name
        p = run_train([f"data.train_files={train_file}", "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2",
                       "data.multiturn.enable=true", f"model.partial_pretrain={model_dir}", "trainer.total_epochs=1",
                       "trainer.total_training_steps=2", "use_remove_padding=true", "trainer.device=cpu",
                       "data.max_length=1024", "optim.lr=1e-3", f"trainer.default_local_dir={out}", *extra], nproc=nproc)
        assert "chat template: qwen3 (recognised in the model dir)" in p.stdout
        runs[name] = metrics(out)
    for name in ("sp2", "dp2"):
        assert [r["step"] for r in runs[name]] == [1, 2]
        for a, b in zip(runs[name], runs["sp1"]):
            assert a["train/trained_tokens"] == b["train/trained_tokens"]
            assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
            assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
