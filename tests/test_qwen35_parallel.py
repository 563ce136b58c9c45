"""Qwen3.5 (Gated DeltaNet + gated attention) under the trainer: Ulysses sp=2 == sp=1 == dp=2 and recompute ==
none in one step's loss and gradients (packed samples crossing the delta rule's chunk of 64), impossible sp sizes,
LoRA on every linear == peft on transformers' Qwen3_5ForCausalLM, and train.py's checkpoints of a multimodal
checkpoint (vision tower and MTP byte-identical; huggingface/ and lora_adapter/ load in transformers / peft)."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import demo
import lora
import model as M
import parallel
import cli
import train
from test_lora import assert_same_logits_and_adapter_grads, set_lora_b
from test_resume import job_args, run_train
from test_train import tiny_model
from tests_util import distributed
from tests_util import qwen35 as Q

LENGTHS = [70, 5, 130, 33, 64, 65, 9, 100]  # 476 tokens, several across a chunk boundary
RANK, ALPHA = 4, 8


def samples():
    g = np.random.default_rng(0)
    out = []
    for n in LENGTHS:
        mask = (g.random(n) < 0.6).astype(np.uint8)
        mask[-1] = 1
        out.append((g.integers(0, Q.TEXT["vocab_size"], n), mask))
    return out


def _step_worker(rank, world_size, model_dir, variants):
    real_apply = lora.apply
    lora.apply = lambda *a, **k: set_lora_b(real_apply(*a, **k), seed=7)  # the trainer's build path, trained B
    results = []
    for v in variants:
        argv = [f"model.partial_pretrain={model_dir}", f"data.train_files={model_dir}", "data.train_batch_size=8",
                "data.max_length=150", "use_remove_padding=true", f"ulysses_sequence_parallel_size={v['sp']}",
                f"data.micro_batch_size_per_gpu={v.get('mbs', 4)}", "trainer.device=cpu",
                f"model.enable_gradient_checkpointing={v.get('ckpt', False)}"]
        argv += ["model.lora_rank=4", "model.lora_alpha=8"] if v.get("lora") else []
        args = cli.parse_args(argv)
        cli.validate(args, world_size)
        model, rank_batches = tiny_model(args, world_size)
        loss, n_tokens = train.forward_backward(model, rank_batches(samples(), np.arange(8))[0], world_size)
        trained = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trained, 1e9)  # (all ranks)
        grads = {k: p.grad.full_tensor() for k, p in model.named_parameters() if p.requires_grad}
        results.append(dict(loss=loss, n_tokens=n_tokens, grad_norm=float(norm.full_tensor()), grads=grads))
    return results


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("q35")
    M.save_pretrained(Q.perturb_(M.build_random(Q.text_config(), seed=3)), path)
    return path


@pytest.fixture(scope="module")
def one_process(model_dir):
    variants = [dict(sp=1), dict(sp=1, ckpt=True, mbs=2), dict(sp=1, lora=True)]
    return distributed.run(_step_worker, 1, model_dir, variants)[0]


@pytest.fixture(scope="module")
def two_processes(model_dir):
    variants = [dict(sp=1), dict(sp=2), dict(sp=2, ckpt=True, mbs=1), dict(sp=2, lora=True)]
    return distributed.run(_step_worker, 2, model_dir, variants)


def assert_same_step(a, b):
    assert a["n_tokens"] == b["n_tokens"] and set(a["grads"]) == set(b["grads"])
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for k in a["grads"]:
        torch.testing.assert_close(a["grads"][k], b["grads"][k], rtol=1e-4, atol=1e-6, msg=k)


def test_recompute_equals_none(one_process):
    assert_same_step(one_process[1], one_process[0])


@pytest.mark.parametrize("i,ref,what", [(0, 0, "dp=2 == dp=1"), (1, 0, "sp=2 == sp=1"),
                                        (2, 0, "sp=2 mbs=1 recompute == sp=1"), (3, 2, "LoRA sp=2 == sp=1")])
def test_two_process_equalities(one_process, two_processes, i, ref, what):
    want = one_process[ref]
    names = set(want["grads"])
    # every parameter kind trains: the conv, A_log and dt_bias of the DeltaNet layers, the gated attention's q_proj
    assert ref == 2 or {"model.layers.0.linear_attn.conv1d.weight", "model.layers.1.linear_attn.A_log",
                        "model.layers.2.linear_attn.dt_bias", "model.layers.3.self_attn.q_proj.weight"} <= names
    assert ref == 0 or len(names) == 2 * (3 * 8 + 7)  # A and B of 5 + 3 linears x 3 DeltaNet, 4 + 3 x 1 attention
    for rank_result in two_processes:
        assert_same_step(rank_result[i], want)


def test_impossible_sp_sizes_name_the_linear_heads():
    # 4 / 2 attention heads allow sp 4; 2 key / 4 value linear heads do not
    with pytest.raises(parallel.ParallelError, match=r"linear_num_key_heads, linear_num_value_heads\); use one of "
                                                     r"\[1, 2\]\.$") as e:
        parallel.check_sp_heads(4, 4, 2, 2, 4)
    assert "4 query / 2 key-value heads and 2 key / 4 value heads" in str(e.value)
    with pytest.raises(parallel.ParallelError, match=r"use one of \[1, 2\]"):
        parallel.check_sp_heads(3, 6, 6, 2, 4)
    parallel.check_sp_heads(2, 4, 2, 2, 4)


def test_mtp_training_refused_in_one_sentence():
    with pytest.raises(cli.ConfigError, match=r"^model\.mtp\.enable_train=true asks for multi-token-prediction "
                                                r"training, .*remove the model\.mtp\.\* keys\.$"):
        cli.parse_args(["model.mtp.enable_train=true"])
    cli.parse_args(["model.mtp.enable=false", "model.mtp.mtp_loss_scaling_factor=0.1"])  # off: accepted


# --------------------------------------------------------------------------- LoRA against peft

def test_lora_equals_peft_logits_and_gradients(tmp_path):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    torch.manual_seed(0)
    hf = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**Q.text_config()))
    Q.perturb_(hf.float(), seed=1).save_pretrained(tmp_path)
    ours = set_lora_b(lora.apply(M.load_pretrained(tmp_path), RANK, ALPHA, ["all-linear"], seed=5), seed=7)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                  lora_dropout=0.0))
    ours_lora = {k: v for k, v in ours.state_dict().items() if lora.is_lora_key(k)}
    to_peft = {k: "base_model.model." + k.replace(".weight", ".default.weight") for k in ours_lora}
    # peft's all-linear adapts exactly our targets (every DeltaNet projection, not the conv)
    assert {k for k, p in ref.named_parameters() if p.requires_grad} == set(to_peft.values())
    assert any(".in_proj_a." in k for k in to_peft) and not any("conv1d" in k for k in to_peft)
    assert not ref.load_state_dict({to_peft[k]: v for k, v in ours_lora.items()}, strict=False).unexpected_keys

    ids = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(0))  # crosses a chunk
    assert_same_logits_and_adapter_grads(ours, ref, ids, to_peft, tol=(1e-4, 1e-3, 1e-5))


# --------------------------------------------------------------------------- train.py on a multimodal checkpoint

def read_all(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name in sorted(set(index.values())):
        with safe_open(path / name, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_train_keeps_multimodal_passthrough_full_and_lora(tmp_path):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    paths = demo.make_demo(tmp_path / "demo", train_rows=16, val_rows=4)
    src = paths["model"]
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    (src / "model.safetensors").unlink()
    torch.manual_seed(0)
    hf = transformers.Qwen3_5ForConditionalGeneration(transformers.Qwen3_5Config(**Q.multimodal_config(vocab_size=vocab)))
    tensors = {k: (v.to(torch.bfloat16) if k.startswith("model.visual.") else v) for k, v in hf.state_dict().items()}
    Q.write_sharded(src, {**tensors, **Q.mtp_tensors(Q.TEXT)}, Q.multimodal_config(vocab_size=vocab))
    before = read_all(src)
    runs = {"full": [], "lora": ["model.lora_rank=4", "model.lora_alpha=8", "optim.lr=1e-2"]}
    for name, extra in runs.items():
        run_train(job_args(paths, tmp_path / name, "trainer.total_epochs=1", *extra), nproc=1)
        out = tmp_path / name / "global_step_2" / "huggingface"
        after = read_all(out)
        assert set(after) == set(before)
        for k, v in before.items():
            if k.startswith(("model.visual.", "mtp.")):
                assert after[k].dtype == v.dtype and torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k
        qkv = "model.language_model.layers.0.linear_attn.in_proj_qkv.weight"
        assert not torch.equal(after[qkv], before[qkv].to(torch.bfloat16))  # trained
        back, info = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                                  output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
        assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    # The adapter loads in peft on the multimodal base (its names are the base's) and gives the merged model's logits.
    adapter = tmp_path / "lora" / "global_step_2" / "lora_adapter"
    base = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
    merged = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
        tmp_path / "lora" / "global_step_2" / "huggingface", dtype=torch.float32).eval()
    ids = torch.arange(40)[None] % 100
    with torch.no_grad():
        want, got = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (with_adapter.base_model.model.model.language_model.layers[0].linear_attn.in_proj_qkv.lora_B.default.weight
            .abs().max() > 0)
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # merged in bf16
