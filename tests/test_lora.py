"""LoRA: our hand-written adapters against peft on transformers' Qwen2, the merged and PEFT-layout
checkpoints, and the trainer's step equalities / resume with only the adapters training."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import demo
import lora
import model as M
import cli
from test_resume import job_args, metrics, run_train
from test_train import model_dir, one_step, save, tiny_model  # noqa: F401 (model_dir: a fixture)
from tests_util import distributed



def peft():
    """peft and transformers are test-only and imported late: the spawned workers below need neither
    (each import costs seconds per process)."""
    return pytest.importorskip("peft")

CFG = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=128, hidden_size=64,
           intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512, initializer_range=0.02,
           hidden_act="silu", bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
RANK, ALPHA = 4, 8


def set_lora_b(model, seed=0, std=0.05):
    """Non-zero B (trained adapters): with B = 0 the update and the gradient of A vanish."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def lora_model(base_dir, targets=("all-linear",)):
    """Our model on the weights of base_dir with LoRA (non-zero B) on the given targets."""
    m = lora.apply(M.load_pretrained(base_dir), RANK, ALPHA, list(targets), seed=5)
    set_lora_b(m)
    return m


def adapters(model):
    return {k: v for k, v in model.state_dict().items() if lora.is_lora_key(k)}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    m = M.build_random(CFG, seed=1)
    with torch.no_grad():  # non-trivial biases, so a wrong bias path would show
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    M.save_pretrained(m, path)
    return path


def hf_model(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


IDS = torch.randint(0, 128, (23,), generator=torch.Generator().manual_seed(0))
CU = torch.tensor([0, 23], dtype=torch.int32)


@pytest.mark.parametrize("targets", [("all-linear",), ("q_proj", "v_proj", "down_proj")])
def test_lora_equals_peft_logits_and_gradients(base_dir, targets):
    ours = lora_model(base_dir, targets)
    names = lora.target_names(list(targets))
    ref = peft().get_peft_model(hf_model(base_dir), peft().LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=names,
                                                                lora_dropout=0.0))
    # Our key `x.lora_A.weight` is peft's `base_model.model.x.lora_A.default.weight`.
    to_peft = {k: "base_model.model." + k.replace(".weight", ".default.weight") for k in adapters(ours)}
    result = ref.load_state_dict({to_peft[k]: v for k, v in adapters(ours).items()}, strict=False)
    assert not result.unexpected_keys
    peft_lora = {k for k, p in ref.named_parameters() if p.requires_grad}
    assert peft_lora == set(to_peft.values())  # the same adapters, nothing else trains in either
    assert {k for k, p in ours.named_parameters() if p.requires_grad} == set(to_peft)

    assert_same_logits_and_adapter_grads(ours, ref, IDS, to_peft, tol=(1e-5, 1e-4, 1e-6))


def assert_same_logits_and_adapter_grads(ours, ref, ids, to_peft, tol):
    """Our logits == peft's on one sample (ids (T,)), and after a loss touching every logit, every adapter
    gradient == peft's (to_peft: our name -> peft's); frozen parameters get none. tol: (logits, grad rtol, atol)."""
    w = torch.randn(len(ids), ours.config["vocab_size"], generator=torch.Generator().manual_seed(1))
    a, b = ours(ids, torch.tensor([0, len(ids)], dtype=torch.int32)), ref(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[0])
    (a * w).sum().backward()
    (b * w).sum().backward()
    grads = dict(ref.named_parameters())
    for k, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().max() > 0, k
            torch.testing.assert_close(p.grad, grads[to_peft[k]].grad, rtol=tol[1], atol=tol[2], msg=k)
        else:
            assert p.grad is None, k


def test_init_is_peft_default(base_dir):
    """A: kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)), the same law as peft's; B = 0."""
    ours = lora.apply(M.load_pretrained(base_dir), 16, ALPHA, ["all-linear"], seed=0)
    torch.manual_seed(0)
    ref = peft().get_peft_model(hf_model(base_dir), peft().LoraConfig(r=16, lora_alpha=ALPHA, target_modules="all-linear"))
    theirs = {k.removeprefix("base_model.model.").replace(".default", ""): v for k, v in ref.state_dict().items()}
    ours_sd = adapters(ours)
    assert set(ours_sd) == {k for k in theirs if lora.is_lora_key(k)}
    for k, a in ours_sd.items():
        if ".lora_B." in k:
            assert a.dtype == torch.float32 and not a.any() and not theirs[k].any()
            continue
        bound = 1 / math.sqrt(a.shape[1])
        for x in (a, theirs[k]):
            assert x.shape == theirs[k].shape and x.abs().max() <= bound
            assert x.abs().max() > 0.95 * bound  # fills the interval
            assert x.std() == pytest.approx(bound / math.sqrt(3), rel=0.12)  # std of U(-b, b)
            assert abs(float(x.mean())) < 0.1 * bound
    # The seed decides A; different layers get different draws.
    again = lora.apply(M.load_pretrained(base_dir), 16, ALPHA, ["all-linear"], seed=0)
    assert all(torch.equal(v, adapters(again)[k]) for k, v in ours_sd.items())
    qa = [v for k, v in ours_sd.items() if k.endswith("q_proj.lora_A.weight")]
    assert not torch.equal(qa[0], qa[1])


def test_merged_and_adapter_load_without_and_with_peft(base_dir, tmp_path):
    ours = lora_model(base_dir)
    with torch.no_grad():
        want = ours(IDS, CU)
    state = ours.state_dict()

    # Merged: a plain model (ours, and transformers' without peft) computes the adapted logits.
    merged = lora.merge(state, RANK, ALPHA)
    assert not any(lora.is_lora_key(k) for k in merged) and set(merged) == set(M.load_pretrained(base_dir).state_dict())
    plain = M.load_state_dict_into(M.build_random(CFG), merged)
    M.save_state_dict(merged, CFG, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS, CU), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf_model(tmp_path / "merged")(input_ids=IDS[None]).logits[0], want,
                                   rtol=1e-5, atol=1e-5)

    # Adapter: PEFT's layout; PeftModel.from_pretrained on the base gives the same logits.
    lora.save_adapter(state, tmp_path / "adapter", RANK, ALPHA, ["all-linear"], base_model=base_dir)
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 7 * 2
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == \
        ("LORA", "CAUSAL_LM", RANK, ALPHA, "none")
    assert cfg["base_model_name_or_path"] == str(base_dir)
    loaded = peft().PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS[None]).logits[0], want, rtol=1e-5, atol=1e-5)


def test_bf16_base_with_fp32_adapters_without_fsdp(base_dir):
    ours = lora.apply(M.load_pretrained(base_dir, dtype=torch.bfloat16), RANK, ALPHA, ["all-linear"])
    dtypes = {k: p.dtype for k, p in ours.named_parameters()}
    assert all(d == (torch.float32 if lora.is_lora_key(k) else torch.bfloat16) for k, d in dtypes.items())
    assert ours(IDS, CU).dtype == torch.bfloat16


# --------------------------------------------------------------------------- trainer: step equalities

def _lora_step_worker(rank, world_size, model_dir, variants, save_dir):
    real_apply = lora.apply

    def apply_with_trained_b(*a, **k):  # the trainer's own build path, with B as after some training
        set_lora_b(real_apply(*a, **k), seed=7)
        return a[0]
    lora.apply = apply_with_trained_b
    results = []
    for v in variants:
        args = cli.parse_args([f"model.partial_pretrain={model_dir}", f"data.train_files={model_dir}",
                                 "data.train_batch_size=8", "data.max_length=20", "use_remove_padding=true",
                                 f"ulysses_sequence_parallel_size={v['sp']}", f"data.micro_batch_size_per_gpu={v['mbs']}",
                                 "trainer.device=cpu", f"model.enable_gradient_checkpointing={v.get('ckpt', False)}",
                                 f"model.fsdp_config.model_dtype={v.get('dtype', 'fp32')}", "model.lora_rank=4",
                                 "model.lora_alpha=8", "model.target_modules=[q_proj,v_proj,o_proj,up_proj,down_proj]",
                                 f"trainer.default_local_dir={save_dir}", "optim.lr=1e-2", "optim.weight_decay=0.1"])
        cli.validate(args, world_size)
        model, rank_batches = tiny_model(args, world_size)
        loss, n_tokens = one_step(model, rank_batches)
        trained = [p for p in model.parameters() if p.requires_grad]
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trained, 1e9).full_tensor())  # (all ranks)
        grads = {k: p.grad.full_tensor() for k, p in model.named_parameters() if p.requires_grad}
        results.append(dict(loss=loss, n_tokens=n_tokens, grad_norm=grad_norm, grads=grads))
        if v.get("save"):
            def full():
                return {k: t.full_tensor().clone() for k, t in model.state_dict().items()}  # (all ranks)
            before = full()
            optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1)
            optimizer.step()
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            position = dict(step=1, epoch=0, next_batch=1, skipped=0, consecutive_skips=0)
            save(args, model, optimizer, scheduler, M.read_config(model_dir), position)
            results[-1].update(before=before, after=full(),
                               optim_keys=sorted(checkpoint.get_state_dict(model, optimizer)[1]["state"]))
    return results


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
    variants = [dict(sp=1, mbs=4), dict(sp=1, mbs=1), dict(sp=1, mbs=2, ckpt=True)]
    return distributed.run(_lora_step_worker, 1, model_dir, variants, tmp_path_factory.mktemp("s1"))[0]


@pytest.fixture(scope="module")
def two_processes(model_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("s2")
    variants = [dict(sp=1, mbs=4, save=True), dict(sp=2, mbs=4), dict(sp=2, mbs=1, ckpt=True),
                dict(sp=2, mbs=2, dtype="bf16")]
    return distributed.run(_lora_step_worker, 2, model_dir, variants, save), save


def assert_same_step(a, b):
    assert a["n_tokens"] == b["n_tokens"] and set(a["grads"]) == set(b["grads"])
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for k in a["grads"]:
        torch.testing.assert_close(a["grads"][k], b["grads"][k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("i,what", [(1, "micro-batch 1 == 4"), (2, "recompute == none")])
def test_one_process_equalities(one_process, i, what):
    assert_same_step(one_process[i], one_process[0])


@pytest.mark.parametrize("i,what", [(0, "dp=2 == dp=1"), (1, "sp=2 == sp=1"), (2, "sp=2 mbs=1 recompute == sp=1")])
def test_two_process_equalities(one_process, two_processes, i, what):
    ref = one_process[0]
    assert ref["grad_norm"] > 0 and len(ref["grads"]) == 2 * 5 * 2  # A and B of 5 targets in 2 layers
    for rank_result in two_processes[0]:
        assert_same_step(rank_result[i], ref)


def test_bf16_base_fp32_adapters_under_fsdp(one_process, two_processes):
    """model_dtype=bf16: a bf16 frozen base, fp32 adapters and gradients, sp=2 - close to the fp32 step."""
    bf16, ref = two_processes[0][0][3], one_process[0]
    assert bf16["loss"] == pytest.approx(ref["loss"], rel=1e-2)
    for k in ref["grads"]:
        assert bf16["grads"][k].dtype == torch.float32
        assert (bf16["grads"][k] - ref["grads"][k]).norm() / ref["grads"][k].norm() < 0.05, k


def test_a_step_changes_only_the_adapters_and_saves_both_forms(two_processes, model_dir):
    results, save = two_processes
    r = results[0][0]
    for k, before in r["before"].items():
        if lora.is_lora_key(k):
            assert not torch.equal(r["after"][k], before), k
        else:
            assert torch.equal(r["after"][k], before), k  # the frozen base is bit-identical (no weight decay)
    assert r["optim_keys"] == sorted(r["grads"])  # AdamW state for the adapters only
    step = save / "global_step_1"
    # The resume state holds the adapters and their optimizer state, not the frozen base.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(step / "dcp", save / "full.pt")
    state = torch.load(save / "full.pt", weights_only=False)
    assert sorted(state["model"]) == sorted(r["grads"]) == sorted(state["optim"]["state"])
    # huggingface/ == the trained base + (alpha / r) B A in bf16, exactly; lora_adapter/ == the adapters.
    adapter = {k.removeprefix("base_model.model."): v
               for k, v in load_file(step / "lora_adapter" / "adapter_model.safetensors").items()}
    assert adapter.keys() == {k for k in r["after"] if lora.is_lora_key(k)}
    for k, v in adapter.items():
        assert torch.equal(v, r["after"][k])
    hf = load_file(step / "huggingface" / "model.safetensors")
    expect = lora.merge(r["after"], 4, 8)
    assert set(hf) == set(expect) - {"lm_head.weight"}  # tied
    for k, v in hf.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, expect[k].to(torch.bfloat16)), k
    meta = json.loads((step / "trainer_state.json").read_text())["config"]
    assert (meta["lora_rank"], meta["lora_alpha"], meta["target_modules"]) == \
        (4, 8, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


# --------------------------------------------------------------------------- trainer: whole runs

def test_resume_is_exact_and_checkpoints_load(tmp_path):
    paths = demo.make_demo(tmp_path / "demo", train_rows=48, val_rows=8)
    lora_flags = ["model.lora_rank=8", "model.lora_alpha=16", "trainer.total_epochs=1", "optim.lr=1e-2"]
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    p = run_train(job_args(paths, straight, *lora_flags, "ulysses_sequence_parallel_size=2", "model.fsdp_config.model_dtype=bf16"))
    assert "LoRA r=8: " in p.stdout and " parameters trained" in p.stdout
    # 6 steps: stop at 3 with sp=2, resume to 6 on one process (layout-free state).
    run_train(job_args(paths, pieces, *lora_flags, "ulysses_sequence_parallel_size=2", "model.fsdp_config.model_dtype=bf16",
                       "trainer.total_training_steps=3"))
    run_train(job_args(paths, pieces, *lora_flags, "model.fsdp_config.model_dtype=bf16"), nproc=1)
    a, b = metrics(straight), metrics(pieces)
    assert [r["step"] for r in b] == list(range(1, 7)) == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5), ra["step"]
        assert rb["train/grad_norm"] == pytest.approx(ra["train/grad_norm"], rel=1e-4), ra["step"]
    assert a[0]["train/loss"] > a[-1]["train/loss"] + 0.1  # the adapters learn
    wa = load_file(straight / "global_step_6" / "lora_adapter" / "adapter_model.safetensors")
    wb = load_file(pieces / "global_step_6" / "lora_adapter" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)

    # Both checkpoint forms load: huggingface/ in transformers without peft, lora_adapter/ with peft
    # on the base, and both give the trained LoRA model's logits.
    ours = lora.apply(M.load_pretrained(paths["model"]), 8, 16, ["all-linear"])
    ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in wa.items()}, strict=False)
    ids = torch.arange(40) % 900
    with torch.no_grad():
        want = ours(ids, torch.tensor([0, 40], dtype=torch.int32))
        peft_logits = peft().PeftModel.from_pretrained(hf_model(paths["model"]), straight / "global_step_6" / "lora_adapter")(
            input_ids=ids[None]).logits[0]
        merged_logits = hf_model(straight / "global_step_6" / "huggingface")(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(peft_logits, want, rtol=1e-5, atol=1e-5)
    assert (merged_logits - want).abs().max() < 0.05 * want.abs().max()  # bf16 weights

    # A resume that changes the adapter is refused, naming the change.
    p = run_train(job_args(paths, pieces, *lora_flags[1:], "model.lora_rank=16"), nproc=1, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "cannot resume from" in p.stderr and "lora_rank 8 -> 16 changes the LoRA adapter" in p.stderr
