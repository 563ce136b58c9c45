"""Qwen3.5 text decoder (Gated DeltaNet + gated attention) against transformers' implementation on the same
weights: our packed stream == each sample run alone in transformers (fp32), the multimodal and text-only
checkpoint layouts, and the save that keeps the vision tower and the MTP layer byte for byte."""
import json

import pytest
import torch
from safetensors import safe_open

import model as M
from tests_util import qwen35 as Q

transformers = pytest.importorskip("transformers")

LENGTHS = [1, 64, 65, 150]  # around and across the delta rule's chunk of 64


def packed(lengths, vocab=128, seed=0):
    ids = torch.randint(0, vocab, (sum(lengths),), generator=torch.Generator().manual_seed(seed))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return ids, cu


def hf_multimodal(tied, seed=0):
    torch.manual_seed(seed)
    hf = transformers.Qwen3_5ForConditionalGeneration(transformers.Qwen3_5Config(**Q.multimodal_config(tied)))
    return Q.perturb_(hf.float().eval(), seed)


def multimodal_checkpoint(hf, path, tied):
    """The released layout: decoder fp32 here, vision tower and MTP in bf16 (a dtype the save must keep), 3 shards."""
    tensors = {k: (v.to(torch.bfloat16) if k.startswith("model.visual.") else v)
               for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    tensors.update(Q.mtp_tensors(Q.TEXT))
    return Q.write_sharded(path, tensors, Q.multimodal_config(tied))


def assert_packed_equals_alone(ours, hf_forward, lengths=LENGTHS):
    ids, cu = packed(lengths)
    with torch.no_grad():
        got = ours(ids, cu)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            want = hf_forward(ids[s:e][None])[0]
            torch.testing.assert_close(got[s:e], want, atol=1e-4, rtol=1e-4)
    return ids, cu, got


@pytest.mark.parametrize("tied", [False, True])
def test_multimodal_checkpoint_packed_equals_transformers_per_sample(tmp_path, tied):
    hf = hf_multimodal(tied)
    multimodal_checkpoint(hf, tmp_path, tied)
    ours = M.load_pretrained(tmp_path, torch.float32).eval()
    assert ours.config["tie_word_embeddings"] == tied
    assert [type(l.linear_attn if l.layer_type == "linear_attention" else l.self_attn).__name__
            for l in ours.model.layers] == ["Qwen3_5GatedDeltaNet"] * 3 + ["Qwen3_5Attention"]
    ids, cu, logits = assert_packed_equals_alone(ours, lambda x: hf(input_ids=x).logits)
    # The fused loss path sums the same cross-entropy as the logits give.
    labels = ids.roll(-1)
    labels[::3] = -100
    with torch.no_grad():
        loss = ours(ids, cu, labels=labels)
    want = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, want, atol=1e-3, rtol=1e-5)


def test_text_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    hf = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**Q.text_config()))
    Q.perturb_(hf.float().eval(), seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")  # sharded, decoder under model.*
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = M.load_pretrained(tmp_path, torch.float32).eval()
    assert_packed_equals_alone(ours, lambda x: hf(input_ids=x).logits, lengths=[3, 70, 1])
    # Saved without a source dir: a text-only dir that transformers loads to the same logits.
    M.save_pretrained(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = packed([20])[0][None]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def read_all(path):
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    out = {}
    for name in files:
        with safe_open(path / name, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_save_keeps_multimodal_layout_and_passthrough_bytes(tmp_path, tied):
    hf = hf_multimodal(tied, seed=2)
    src = multimodal_checkpoint(hf, tmp_path / "src", tied)
    ours = M.load_pretrained(src, torch.float32)
    with torch.no_grad():  # "training" changed the decoder
        ours.model.layers[0].linear_attn.in_proj_qkv.weight.add_(0.01)
        ours.model.embed_tokens.weight.mul_(1.1)
    M.save_pretrained(ours, tmp_path / "out", source=src)
    before, after = read_all(src), read_all(tmp_path / "out")
    assert set(after) == set(before)
    for k, v in before.items():
        if k.startswith(("model.visual.", "mtp.")):
            assert after[k].dtype == v.dtype == torch.bfloat16
            assert torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k
    assert torch.equal(after["model.language_model.embed_tokens.weight"], ours.model.embed_tokens.weight)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    source_cfg = Q.multimodal_config(tied)
    for key in ("model_type", "architectures", "text_config", "vision_config", "tie_word_embeddings"):
        assert written[key] == source_cfg[key], key
    # transformers loads it as the multimodal model, with no missing weight, and the text logits are ours.
    back, info = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
        tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(back.model.visual.blocks[0].attn.qkv.weight,
                               before["model.visual.blocks.0.attn.qkv.weight"].float())
    ids = packed([40], seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=ids[None]).logits[0],
                                   ours.eval()(ids, torch.tensor([0, 40], dtype=torch.int32)), atol=1e-4, rtol=1e-4)


def test_sdpa_fallback_equals_reference_at_head_dim_256():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(30, h, 256, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 1, 17, 30], dtype=torch.int32)
    want = M.attention.attention_reference(q, k, v, cu, cu, 16, 16, causal=True)
    torch.testing.assert_close(M.sdpa_varlen_attention(q, k, v, cu, 16), want, atol=1e-5, rtol=1e-5)
    # The kernel takes 256 (Qwen3.5's size); another size leaves it for SDPA, said once.
    note = M.attention_note(M.qwen3_5_text_config(Q.text_config(head_dim=96)))
    assert "head_dim 96" in note and M.attention_note(M.qwen3_5_text_config(Q.text_config(head_dim=256))) is None


@pytest.mark.parametrize("change, words", [
    (dict(model_type="qwen3_5_moe"), "mixture-of-experts"),
    (dict(model_type="qwen3_5", text_config=None), "no text_config"),
    (dict(layer_types=["linear_attention", "sliding_attention", "full_attention", "full_attention"]),
     "sliding_attention"),
    (dict(linear_num_value_heads=3), "multiple of linear_num_key_heads"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=2.0)), "RoPE type 'yarn'"),
    (dict(num_hidden_layers=5, layer_types=["full_attention"] * 4), "4 entries for 5 layers"),
])
def test_refusals_name_the_problem(tmp_path, change, words):
    (tmp_path / "config.json").write_text(json.dumps(Q.text_config(**change)))
    with pytest.raises(M.ModelError, match=words) as e:
        M.read_config(tmp_path)
    assert "\n" not in str(e.value)


def test_default_layer_types_and_random_build():
    cfg = M.qwen3_5_text_config({k: v for k, v in Q.text_config(num_hidden_layers=8).items()})
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"]
    m = M.build_random(Q.multimodal_config(tied=True), seed=0)  # the composite config is flattened
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.all(m.model.norm.weight == 0) and torch.all(m.model.layers[0].linear_attn.norm.weight == 1)


def test_packed_gradients_equal_transformers_per_sample():
    """Backward too: d(sum of per-token CE over the pack) == the sum of transformers' per-sample gradients."""
    torch.manual_seed(4)
    hf = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**Q.text_config()))
    Q.perturb_(hf.float(), seed=4)
    ours = M.load_state_dict_into(M.build_random(Q.text_config()), hf.state_dict())
    ids, cu = packed([5, 70])
    labels = ids.roll(-1)
    labels[cu[1:] - 1] = -100  # no target across a sample boundary
    ours(ids, cu, labels=labels).backward()
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        logits = hf(input_ids=ids[s:e][None]).logits[0]
        torch.nn.functional.cross_entropy(logits, labels[s:e], ignore_index=-100, reduction="sum").backward()
    grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)
