import json
import math

import pytest
import torch
from safetensors.torch import save_file

import model as M
from conftest import REFERENCE

TINY = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=96, hidden_size=48,
            intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=256)


def tiny(seed=0, **over):
    m = M.build_random({**TINY, **over}, seed=seed)
    with torch.no_grad():  # non-trivial norms and biases so the reference checks them too
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return m


def reference_logits(sd, cfg, ids):
    """An independent float64 Qwen2 forward of ONE sample, written from the architecture's equations
    with explicit per-head loops (no code shared with model.py)."""
    sd = {k: v.double() for k, v in sd.items()}
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg["hidden_size"] // H
    L = len(ids)

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg["rms_norm_eps"])

    def rope(x):  # x (L, D); rotation of pairs (j, j + D/2) by angle pos * theta^(-2j/D)
        out = x.clone()
        for pos in range(L):
            for j in range(D // 2):
                a = pos * cfg["rope_theta"] ** (-2 * j / D)
                x1, x2 = x[pos, j], x[pos, j + D // 2]
                out[pos, j] = x1 * math.cos(a) - x2 * math.sin(a)
                out[pos, j + D // 2] = x2 * math.cos(a) + x1 * math.sin(a)
        return out

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = h @ sd[p + "self_attn.q_proj.weight"].T + sd[p + "self_attn.q_proj.bias"]
        k = h @ sd[p + "self_attn.k_proj.weight"].T + sd[p + "self_attn.k_proj.bias"]
        v = h @ sd[p + "self_attn.v_proj.weight"].T + sd[p + "self_attn.v_proj.bias"]
        heads = []
        for hd in range(H):
            g = hd // (H // Hkv)
            qh, kh = rope(q[:, hd * D:(hd + 1) * D]), rope(k[:, g * D:(g + 1) * D])
            s = qh @ kh.T / math.sqrt(D)
            s = s + torch.triu(torch.full((L, L), float("-inf"), dtype=s.dtype), 1)
            heads.append(torch.softmax(s, -1) @ v[:, g * D:(g + 1) * D])
        x = x + torch.cat(heads, -1) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = h @ sd[p + "mlp.gate_proj.weight"].T
        x = x + ((gate * torch.sigmoid(gate)) * (h @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ head.T


def packed(lengths, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return ids, cu


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_independent_reference(tied):
    m = tiny(tie_word_embeddings=tied)
    ids, cu = packed([7, 1, 12])
    with torch.no_grad():
        logits = m(ids, cu)
    sd = m.state_dict()
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = reference_logits(sd, m.config, ids[a:b])
        torch.testing.assert_close(logits[a:b].double(), ref, rtol=1e-4, atol=1e-4)


def test_packed_equals_each_sample_alone():
    m = tiny()
    ids, cu = packed([5, 13, 1, 9])
    with torch.no_grad():
        together = m(ids, cu)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = m(ids[a:b], torch.tensor([0, b - a], dtype=torch.int32))
            torch.testing.assert_close(together[a:b], alone, rtol=1e-5, atol=1e-5)


def test_positions_restart_per_sample():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert M.positions_from_cu_seqlens(cu).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_gradient_checkpointing_same_loss_and_grads():
    ids, cu = packed([9, 6])
    grads = []
    for ckpt in (False, True):
        m = tiny()
        if ckpt:  # recompute applied from outside, as the trainer applies it
            import parallel
            parallel.apply_recompute(m)
        m(ids, cu).logsumexp(-1).sum().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_exact(tmp_path, tied):
    m = tiny(tie_word_embeddings=tied)
    M.save_pretrained(m, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "float32"
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)
    m2 = M.load_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    if tied:
        assert m2.lm_head.weight is m2.model.embed_tokens.weight
    ids, cu = packed([4, 6])
    with torch.no_grad():
        assert torch.equal(m(ids, cu), m2(ids, cu))


def test_sharded_checkpoint_loads(tmp_path):
    m = tiny()
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(tmp_path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(m.config))
    m2 = M.load_pretrained(tmp_path)
    for k in sd:
        assert torch.equal(m2.state_dict()[k], sd[k])


def test_bf16_save(tmp_path):
    m = tiny()
    M.save_pretrained(m, tmp_path, dtype=torch.bfloat16)
    m2 = M.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert m2.lm_head.weight.dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_model_dir_errors(tmp_path):
    with pytest.raises(M.ModelError, match="config.json not found"):
        M.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "llama"}))
    with pytest.raises(M.ModelError, match="only Qwen2"):
        M.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(M.ModelError, match="no model.safetensors"):
        M.load_pretrained(tmp_path)
    M.save_pretrained(tiny(hidden_size=24, num_attention_heads=6), tmp_path / "other")
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(M.ModelError, match="has shape"):
        M.load_pretrained(tmp_path)


def test_flops_per_token_matches_spec():
    if not (REFERENCE / "qwen2.5-0.5b-instruct" / "config.json").is_file():
        pytest.skip("../shared/reference not present")
    cfg = M.read_config(REFERENCE / "qwen2.5-0.5b-instruct")
    assert abs(M.flops_per_token(cfg, 0) - 2.964e9) / 2.964e9 < 1e-3
    assert M.flops_per_token(cfg, 1000) - M.flops_per_token(cfg, 0) == 129_024 * 1000


def test_real_config_builds_on_meta():
    if not (REFERENCE / "qwen2.5-0.5b-instruct" / "config.json").is_file():
        pytest.skip("../shared/reference not present")
    cfg = M.read_config(REFERENCE / "qwen2.5-0.5b-instruct")
    with torch.device("meta"):
        m = M.Qwen2ForCausalLM(cfg)
    assert 494_000_000 < M.num_params(m) < 495_000_000  # Qwen2.5-0.5B: 494M with tied embeddings


def test_fused_loss_in_forward_equals_plain_loss_and_grads():
    ids, cu = packed([9, 6, 11])
    labels = torch.where(torch.arange(26) % 3 == 0, -100, torch.roll(ids, -1))
    results = []
    for chunk in (5, 10_000):  # 5: chunk boundaries fall inside samples
        m = tiny()
        m.loss_chunk = chunk
        loss = m(ids, cu, labels=labels)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    m = tiny()
    plain = torch.nn.functional.cross_entropy(m(ids, cu), labels, ignore_index=-100, reduction="sum")
    plain.backward()
    for loss, grads in results:
        torch.testing.assert_close(loss, plain.detach(), rtol=1e-6, atol=1e-6)
        for k, p in m.named_parameters():
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-6)


def _kernel_attention(q, k, v, cu_seqlens, max_seqlen):
    from sft_kernels.attention import flash_attn_varlen_func
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)


def _reference_attention(q, k, v, cu_seqlens, max_seqlen):
    from sft_kernels.attention import attention_reference
    return attention_reference(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)


def test_model_on_triton_kernel_matches_reference_path():
    """The Triton kernel inside the model (interpreter on CPU, fp32; the GPU in bf16 below)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels need CUDA tensors
    m = tiny(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).to(device)  # head_dim 16
    ids, cu = (t.to(device) for t in packed([5, 17, 1, 9]))
    labels = torch.roll(ids, -1)
    for layer in m.model.layers:  # the reference path on either device
        layer.self_attn.attn_fn = _reference_attention
    ref = m(ids, cu, labels=labels)
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    for layer in m.model.layers:
        layer.self_attn.attn_fn = _kernel_attention
    out = m(ids, cu, labels=labels)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_model_logits_on_gpu_kernel_match_reference_bf16(family):
    if family == "qwen2":
        m = tiny(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64
    else:
        m = tiny(**{**QWEN3_TINY, "num_hidden_layers": 2})  # head_dim 128, q_norm/k_norm
    m = m.cuda().bfloat16()
    ids, cu = packed([300, 17, 1, 700])
    ids, cu = ids.cuda(), cu.cuda()
    with torch.no_grad():
        kernel = m(ids, cu).float()  # CUDA -> Triton kernel
        for layer in m.model.layers:
            layer.self_attn.attn_fn = _reference_attention
        reference = m(ids, cu).float()
    assert (kernel - reference).abs().max() < 0.05 * reference.abs().max()


# --------------------------------------------------------------------------- Qwen3, config dialects, refusals

QWEN3_TINY = dict(TINY, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=128, hidden_size=64,
                  num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1, attention_bias=False)


def test_qwen3_model_on_triton_kernel_matches_reference_path():
    """A Qwen3-like layer (q_norm/k_norm, head_dim 128 from config) on the Triton kernel (interpreter, fp32)."""
    m = tiny(**QWEN3_TINY)
    assert m.model.layers[0].self_attn.q_norm.weight.shape == (128,)
    ids, cu = packed([5, 9, 1])
    labels = torch.roll(ids, -1)
    results = []
    for attn_fn in (_reference_attention, _kernel_attention):
        m.zero_grad()
        for layer in m.model.layers:
            layer.self_attn.attn_fn = attn_fn
        loss = m(ids, cu, labels=labels)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5)


def write_config(path, **over):
    (path / "config.json").write_text(json.dumps({**TINY, **over}))
    return path


def test_config_dialects_give_the_same_rope(tmp_path):
    """rope_theta at top level (transformers 4), inside rope_parameters (5) or rope_scaling: one base."""
    dialects = [dict(rope_theta=1e6, torch_dtype="bfloat16"),
                dict(rope_theta=None, rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, dtype="bfloat16"),
                dict(rope_theta=1e6, rope_scaling={"type": "default"})]
    freqs = [M.Qwen2ForCausalLM(M.read_config(write_config(tmp_path, **over))).model.inv_freq for over in dialects]
    assert all(torch.equal(f, freqs[0]) for f in freqs)
    torch.testing.assert_close(freqs[0][1], torch.tensor(1e6 ** (-2 / 8)))  # head_dim 8: theta^(-2j/D), j=1


def test_config_refusals(tmp_path):
    cases = [
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "asks for RoPE type 'dynamic'; this trainer computes "
         "only 'default', 'linear' and 'yarn'"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0}), "RoPE type 'llama3'"),
        (dict(use_sliding_window=True, sliding_window=16, max_window_layers=1), "turns on sliding-window attention"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "turns on sliding-window attention"),
        (dict(model_type="qwen3_moe"), "builds only Qwen2 and dense Qwen3 models"),
    ]
    for over, message in cases:
        with pytest.raises(M.ModelError, match=message):
            M.read_config(write_config(tmp_path, **over))
    # transformers' rule: layers from max_window_layers on slide, so none of 2 layers here; and a
    # window without use_sliding_window is off.
    M.read_config(write_config(tmp_path, use_sliding_window=True, sliding_window=16, max_window_layers=2))
    M.read_config(write_config(tmp_path, use_sliding_window=False, sliding_window=16, max_window_layers=0))
    M.read_config(write_config(tmp_path, layer_types=["full_attention"] * 2, use_sliding_window=True))


def test_damaged_weight_files(tmp_path):
    m = tiny()
    M.save_pretrained(m, tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    for damaged in (data[: len(data) - 100], data[:5], b"\xff" * 64 + data[64:]):  # truncated, header cut, corrupt
        file.write_bytes(damaged)
        with pytest.raises(M.ModelError, match=f"{file} is not a readable safetensors file .*fetch the file again"):
            M.load_pretrained(tmp_path)
    file.rename(tmp_path / "model-00001-of-00001.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    for bad in ("{not json", json.dumps({"metadata": {}}), json.dumps({"weight_map": ["x"]})):
        index.write_text(bad)
        with pytest.raises(M.ModelError, match=f"{index} is not a valid safetensors index"):
            M.load_pretrained(tmp_path)


def test_qwen3_sizes_flops_and_sp():
    """Official Qwen3 configs: flops use head_dim 128 (4B: q_proj 2560 -> 4096, not 2560), and
    Ulysses takes Qwen3-4B's 32/8 heads at sp=4 as in verl's ReTool recipe."""
    import parallel
    file = REFERENCE / "qwen3" / "configs" / "Qwen3-4B.config.json"
    if not file.is_file():
        pytest.skip("../shared/reference not present")
    cfg = json.loads(file.read_text())
    with torch.device("meta"):
        m = M.Qwen2ForCausalLM(cfg)
    assert m.model.layers[0].self_attn.q_proj.weight.shape == (4096, 2560)
    matmul = sum(p.numel() for n, p in m.named_parameters() if p.ndim == 2 and "embed" not in n) + 151936 * 2560
    assert M.flops_per_token(cfg, 0) == 6 * matmul  # the LM head counts even though tied
    assert M.flops_per_token(cfg, 100) - M.flops_per_token(cfg, 0) == 6 * 36 * 32 * 128 * 100
    assert 4_020_000_000 < M.num_params(m) < 4_030_000_000  # Qwen3-4B: 4.02B with tied embeddings
    parallel.check_sp_heads(4, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    with pytest.raises(parallel.ParallelError, match="use one of"):
        parallel.check_sp_heads(3, cfg["num_attention_heads"], cfg["num_key_value_heads"])


