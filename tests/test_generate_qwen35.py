"""generate.py on Qwen3.5 (Gated DeltaNet + gated attention, layers L, L, L, F): decoding with the cache (each
DeltaNet layer's conv window and recurrent state, the attention layer's keys and values) == recomputing the whole
prefix every step == transformers' own greedy `generate` on the same weights, for prompts below, at and across
the delta rule's chunk of 64 tokens, with a tied and an untied LM head."""
import pytest
import torch

import generate
import model as M
from test_generate import greedy_without_cache
from tests_util import qwen35 as Q

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = [1, 5, 64, 65, 150]  # the prefill runs 1, 1, 1, 2 and 3 chunks of the delta rule
NEW = 12


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
    """(transformers' Qwen3_5ForCausalLM, ours loaded from its save): the same tiny random weights."""
    tied = request.param
    torch.manual_seed(0)
    hf = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**Q.text_config(tie_word_embeddings=tied)))
    Q.perturb_(hf.float().eval())
    with torch.no_grad():  # small embeddings, so the layers' output (not the token's own residual) picks the next token
        hf.model.embed_tokens.weight.mul_(0.05)
    path = tmp_path_factory.mktemp("qwen35")
    hf.save_pretrained(path)
    ours = M.load_pretrained(path, torch.float32).eval()
    assert ours.config["tie_word_embeddings"] == tied
    return hf, ours


def prompt(length):
    return torch.randint(0, Q.TEXT["vocab_size"], (length,), generator=torch.Generator().manual_seed(length)).tolist()


def hf_greedy(hf, ids, n):
    """transformers' generate, greedy; the explicit mask stops it from masking prompt tokens equal to pad_token_id."""
    x = torch.tensor(ids)[None]
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_cached_greedy_equals_recompute_and_transformers(pair):
    hf, ours = pair
    replies = []
    for length in PROMPT_LENGTHS:
        ids = prompt(length)
        cached = generate.generate(ours, ids, NEW)
        assert cached == greedy_without_cache(ours, ids, NEW), length
        assert cached == hf_greedy(hf, ids, NEW), length
        replies.append(cached)
    assert len({t for r in replies for t in r}) > 12  # varied replies, not one token repeated


def test_each_step_equals_the_full_forward_and_the_model_is_restored(pair):
    _, ours = pair
    layers = ours.model.layers

    def mixers():
        return [l.linear_attn.mix_fn if l.layer_type == "linear_attention" else l.self_attn.attn_fn for l in layers]
    assert mixers() == [M.gated_delta_mix] * 3 + [M.full_attention]
    ids = torch.tensor(prompt(70))  # prefill 65 tokens (two chunks), then 5 steps of one token
    with torch.no_grad():
        want = ours.hidden_states(ids, torch.tensor([0, 70], dtype=torch.int32))  # (70, C)
    cache = generate.Cache(len(layers), 70)
    restore = generate.swap_in(ours, cache)
    try:
        with torch.no_grad():
            for s, e in [(0, 65)] + [(t, t + 1) for t in range(65, 70)]:
                h = ours.hidden_states(ids[s:e], torch.tensor([0, e - s], dtype=torch.int32), torch.arange(s, e))
                cache.advance(e - s)
                torch.testing.assert_close(h, want[s:e], atol=2e-5, rtol=1e-5)
    finally:
        restore()
    assert mixers() == [M.gated_delta_mix] * 3 + [M.full_attention]
    la = layers[0].linear_attn
    conv_dim, K = la.conv1d.weight.shape[0], la.conv1d.weight.shape[-1]
    # The window is the last K-1 q/k/v rows before the conv; the state one (Hv, Dk, Dv) fp32 per DeltaNet layer.
    with torch.no_grad():
        x = layers[0].input_layernorm(ours.model.embed_tokens(ids))
        torch.testing.assert_close(cache.conv[0], la.in_proj_qkv(x)[-(K - 1):])
    assert cache.conv[1].shape == (K - 1, conv_dim) and cache.conv[3] is None and cache.state[3] is None
    assert [tuple(s.shape) for s in cache.state[:3]] == [(1, la.num_v_heads, la.head_k_dim, la.head_v_dim)] * 3
    assert cache.state[0].dtype == torch.float32
    assert cache.k[3].shape == (70, 2, 32) and all(k is None for k in cache.k[:3])  # GQA: 2 kv heads of head_dim 32
