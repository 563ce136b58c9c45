"""Against Hugging Face transformers: the same logits on the same weights, and our checkpoints load
in it as they are. Skipped where transformers is not installed (it is a test-only dependency)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
import model as M
from conftest import REFERENCE

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent

CFG = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=128, hidden_size=64,
           intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512, initializer_range=0.02,
           hidden_act="silu", bos_token_id=0, eos_token_id=1)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_transformers(tmp_path, tied):
    ours = M.build_random({**CFG, "tie_word_embeddings": tied}, seed=1)
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in ours.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    M.save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    lengths = [9, 1, 30]
    ids = torch.randint(0, 128, (sum(lengths),), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 9, 10, 40], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(ids, cu)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            ref = hf(input_ids=ids[None, a:b]).logits[0]
            torch.testing.assert_close(packed[a:b], ref, rtol=1e-5, atol=1e-5)


def test_trainer_checkpoint_loads_in_transformers(tmp_path):
    paths = demo.make_demo(tmp_path / "demo", train_rows=16, val_rows=4)
    out = tmp_path / "out"
    subprocess.run([sys.executable, "train.py", f"data.train_files={paths['train']}", "data.train_batch_size=8",
                    "data.micro_batch_size_per_gpu=4", "data.multiturn.enable=true", "trainer.device=cpu",
                    f"model.partial_pretrain={paths['model']}", "trainer.total_epochs=1", "use_remove_padding=true",
                    f"trainer.default_local_dir={out}", "optim.lr=1e-3",
                    "data.chat_template=qwen2.5"], cwd=ROOT, check=True, capture_output=True)
    hf_dir = out / "global_step_2" / "huggingface"
    assert json.loads((hf_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor(tok(text)["input_ids"])
    ours = M.load_pretrained(hf_dir)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, torch.tensor([0, len(ids)], dtype=torch.int32)),
                                   hf(input_ids=ids[None]).logits[0], rtol=1e-5, atol=1e-5)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in hf.generation_config.eos_token_id


# --------------------------------------------------------------------------- Qwen3 and config dialects

QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=128, hidden_size=64,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512, initializer_range=0.02,
             hidden_act="silu", attention_bias=False, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)


def hf_random(cfg, path, seed=0, **save_kwargs):
    """A transformers model of a config dict, every parameter randomised (norms and biases too),
    saved by transformers itself into path."""
    config = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(torch.randn(p.shape) * (0.1 if p.ndim == 1 else 0.02))
    hf.save_pretrained(path, **save_kwargs)
    return hf


def assert_same_logits(ours, hf, lengths, vocab, atol=1e-5):
    """Our packed stream of several samples == transformers on each sample alone."""
    ids = torch.randint(0, vocab, (sum(lengths),), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        packed = ours(ids, cu)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            torch.testing.assert_close(packed[a:b], hf(input_ids=ids[None, a:b]).logits[0], rtol=atol, atol=atol)


def hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


@pytest.mark.parametrize("variant", ["tied", "untied", "sharded", "attention_bias", "default_head_dim"])
def test_qwen3_logits_equal_transformers_both_ways(tmp_path, variant):
    cfg = dict(QWEN3)
    save_kwargs = {}
    if variant != "tied":
        cfg["tie_word_embeddings"] = False
    if variant == "sharded":
        save_kwargs["max_shard_size"] = "60KB"
    if variant == "attention_bias":  # q/k/v AND o biases in Qwen3
        cfg["attention_bias"] = True
    if variant == "default_head_dim":  # no head_dim in config: Qwen3's default 128, not hidden/heads = 16
        del cfg["head_dim"]
    hf = hf_random(cfg, tmp_path / "hf", **save_kwargs)
    if variant == "sharded":
        index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 3
    ours = M.load_pretrained(tmp_path / "hf")
    assert ours.model.layers[0].self_attn.q_proj.out_features == 4 * (32 if "head_dim" in cfg else 128)
    assert (ours.model.layers[0].self_attn.o_proj.bias is not None) == (variant == "attention_bias")
    assert_same_logits(ours, hf, [9, 1, 30], 128)
    # And back: what we save, transformers loads with the same logits.
    M.save_pretrained(ours, tmp_path / "ours")
    assert_same_logits(ours, hf_load(tmp_path / "ours"), [9, 1, 30], 128)


def test_qwen3_tied_checkpoint_that_stores_lm_head(tmp_path):
    """Qwen3-0.6B/1.7B are tied yet store lm_head.weight: equal loads, different stops in one sentence."""
    from safetensors.torch import load_file, save_file
    hf = hf_random(QWEN3, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = M.load_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert_same_logits(ours, hf, [5, 12], 128)
    tensors["lm_head.weight"][3, 7] += 1e-3
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(M.ModelError, match="stores an lm_head.weight that differs from model.embed_tokens.weight "
                                           "although config.json has tie_word_embeddings true"):
        M.load_pretrained(tmp_path)


def test_qwen3_fixture_logits():
    fixture = REFERENCE / "qwen3" / "tiny_random_fixture"
    if not fixture.is_dir():
        pytest.skip("../shared/reference not present")
    expected = torch.load(fixture / "expected_logits.pt")
    ours = M.load_pretrained(fixture)
    ids = expected["input_ids"]  # (2, 7): two samples, packed back to back here
    cu = torch.tensor([0, 7, 14], dtype=torch.int32)
    with torch.no_grad():
        logits = ours(ids.reshape(-1), cu).view(2, 7, -1)
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_qwen2_saved_by_transformers5(tmp_path):
    """transformers 5 writes rope_parameters (no top-level rope_theta) and dtype (not torch_dtype).
    Reading only the top-level key gave RoPE base 10000 instead of 1e6: logits visibly wrong."""
    hf = hf_random(CFG | {"tie_word_embeddings": True}, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"] == 1e6
    assert "dtype" in written and "torch_dtype" not in written
    ours = M.load_pretrained(tmp_path / "hf")
    assert_same_logits(ours, hf, [9, 1, 40], 128)
    # The old reading (top-level rope_theta, else 10000) is caught by the same comparison.
    old = M.Qwen2ForCausalLM({k: v for k, v in written.items() if k != "rope_parameters"})
    old.load_state_dict(ours.state_dict())
    with pytest.raises(AssertionError):
        assert_same_logits(old, hf, [9, 1, 40], 128)
    # Saved back in the dialect it was read in, and loaded by transformers the same.
    M.save_pretrained(ours, tmp_path / "ours")
    back = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert back["dtype"] == "float32" and "torch_dtype" not in back and back["rope_parameters"]["rope_theta"] == 1e6
    assert_same_logits(ours, hf_load(tmp_path / "ours"), [9, 1, 40], 128)


ROPE_SCALINGS = {
    # transformers 4's dialect: rope_scaling with "type", rope_theta at top level.
    "yarn_v4": dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    # transformers 5's dialect with the yarn knobs off their defaults, chosen so that the ramp spans
    # several dimensions (correction range 0.4..5.2 for D=32) and truncate=False changes it.
    "yarn_v5": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 8,
                                     "beta_slow": 0.5, "truncate": False, "original_max_position_embeddings": 64}),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}),
}


@pytest.mark.parametrize("scaling", sorted(ROPE_SCALINGS))
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_rope_scaling_equals_transformers(tmp_path, family, scaling):
    base = CFG if family == "qwen2" else QWEN3 | {"tie_word_embeddings": False}
    cfg = {**base, "max_position_embeddings": 128, **ROPE_SCALINGS[scaling]}
    if "rope_parameters" in cfg:
        del cfg["rope_theta"]
    ours = M.build_random(cfg, seed=2)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in ours.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    M.save_pretrained(ours, tmp_path)  # the config dict exactly as written above
    hf = hf_load(tmp_path)
    rotary = hf.model.rotary_emb
    assert rotary.rope_type == scaling.split("_")[0]
    assert torch.equal(ours.model.inv_freq, rotary.inv_freq)
    assert ours.model.attention_scaling == rotary.attention_scaling
    if scaling.startswith("yarn"):
        assert ours.model.attention_scaling > 1
    assert_same_logits(ours, hf, [70, 3, 45], 128)  # 70 and 45 pass original_max_position_embeddings


def test_real_qwen3_configs_build_hf_names_and_shapes():
    """Every official Qwen3 size on the meta device: our parameter names and shapes == transformers'."""
    configs = sorted((REFERENCE / "qwen3" / "configs").glob("*.config.json"))
    if not configs:
        pytest.skip("../shared/reference not present")
    for file in configs + [REFERENCE / "qwen3-instruct-2507" / "config.json"]:
        cfg = json.loads(file.read_text())
        with torch.device("meta"):
            ours = M.Qwen2ForCausalLM(cfg)
            hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
        theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs, file.name
        assert ours.model.inv_freq.device.type == "cpu"  # computed for real even under the meta device
