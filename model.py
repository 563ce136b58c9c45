"""Qwen2 / Qwen3 dense decoder written by hand, on packed (varlen) token streams.

One set of modules serves both families; config.json's model_type switches the differences:
Qwen2 (Qwen2.5) has q/k/v biases and head_dim = hidden / heads; Qwen3 (and Qwen3-2507) adds
q_norm/k_norm (RMSNorm per head over head_dim, before RoPE), takes q/k/v/o biases from
`attention_bias` (false in every released size) and head_dim from config (128).
Parameter names equal Hugging Face's `Qwen2ForCausalLM` / `Qwen3ForCausalLM`, so safetensors load
with strict=True and no renaming, and what we save loads in transformers and vLLM as it is.
config.json is read by hf_config.py in the dialects transformers 4 and 5 write; saving writes the dtype
back under the key it was read with (torch_dtype or dtype).
Qwen3.5 (model_type qwen3_5 / qwen3_5_text) reuses the same wrapper (Qwen2ForCausalLM: embedding, layers in
model.model.layers, final norm, LM head, fused loss) around Qwen3_5TextModel; see its section below.
This file knows nothing of process groups: parallel.py acts on a built model from outside.
"""
import functools
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from hf_config import (ModelError, head_dim_of, qwen3_5_inv_freq, qwen3_5_text_config,  # noqa: F401 (M.*)
                       read_config, rope_parameters)
from sft_kernels import attention
from sft_kernels.gated_delta_rule import chunk_gated_delta_rule
from sft_kernels.lm_head_loss import linear_cross_entropy_sum


def varlen_attention(q, k, v, cu_seqlens, max_seqlen):
    """Causal attention within each packed sample: q (T, H, D), k/v (T, Hkv, D) -> (T, H, D).

    The one switch between implementations: the Triton kernel on CUDA, plain torch elsewhere.
    """
    attn = attention.flash_attn_varlen_func if q.is_cuda else attention.attention_reference
    return attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)


# --------------------------------------------------------------------------- modules

class Qwen2RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, exactly as HF does (bf16 parity).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids, inv_freq, attention_scaling, dtype):
    """cos/sin tables (T, D) for the rotate-half RoPE convention, computed in fp32 like HF.

    inv_freq (D/2,) and attention_scaling come from rope_parameters (yarn scales cos/sin; 1.0 else).
    """
    freqs = position_ids.float()[:, None] * inv_freq[None, :].float()  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def apply_rotary(x, cos, sin):
    """x (T, H, D); cos/sin (T, D). Rotate-half: pairs are (i, i + D/2), not interleaved."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Qwen2Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg["num_key_value_heads"]
        self.head_dim = head_dim_of(cfg)
        qwen3 = cfg.get("model_type") == "qwen3"
        # Qwen2 always has q/k/v biases and none on o; Qwen3 puts attention_bias on all four.
        qkv_bias = bool(cfg.get("attention_bias", False)) if qwen3 else True
        o_bias = bool(cfg.get("attention_bias", False)) if qwen3 else False
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)
        if qwen3:  # one (D,) weight per projection, shared by all heads
            self.q_norm = Qwen2RMSNorm(self.head_dim, cfg["rms_norm_eps"])
            self.k_norm = Qwen2RMSNorm(self.head_dim, cfg["rms_norm_eps"])
        # Replaced from outside (parallel.apply_ulysses) to wrap attention in all-to-alls.
        self.attn_fn = varlen_attention

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)  # (T, H, D)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        if hasattr(self, "q_norm"):  # Qwen3: normalise each head of q and k before RoPE (not v)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = self.attn_fn(q, k, v, cu_seqlens, max_seqlen)  # (T, H, D)
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))  # (T, H*D) -> (T, C)


class Qwen2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = Qwen2RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        # Parsed once from the config. A plain fp32 CPU tensor, not a buffer: model.to(bf16) must
        # not round it, and meta-device construction must not leave it empty.
        self.inv_freq, self.attention_scaling = rope_parameters(cfg)

    def forward(self, input_ids, cu_seqlens, position_ids, max_seqlen):
        x = self.embed_tokens(input_ids)  # (T, C)
        if self.inv_freq.device != position_ids.device:  # moved once, on the first forward
            self.inv_freq = self.inv_freq.to(position_ids.device)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq, self.attention_scaling, x.dtype)
        for layer in self.layers:  # recompute (parallel.apply_recompute) wraps each layer from outside
            x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.get("model_type") in ("qwen3_5", "qwen3_5_text"):
            cfg = qwen3_5_text_config(cfg)  # the flat decoder config (a no-op on read_config's result)
        self.config = dict(cfg)
        self.model = Qwen3_5TextModel(cfg) if cfg["model_type"] == "qwen3_5_text" else Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self.tie_weights()

    def tie_weights(self):
        # Called again after any load that assigns parameters, since assignment breaks the tie.
        if self.config.get("tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids, cu_seqlens, position_ids=None, max_seqlen=None):
        """Final-norm hidden states (T, C) of a packed stream; see forward."""
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return self.model(input_ids, cu_seqlens, position_ids, max_seqlen)

    def forward(self, input_ids, cu_seqlens, position_ids=None, max_seqlen=None, labels=None, return_correct=False):
        """input_ids (T,) holds B samples back to back, bounded by cu_seqlens (B+1,) int32.

        Attention never crosses a boundary and positions restart at 0 per sample unless
        position_ids (T,) are given (Ulysses passes a slice of the full stream's positions).
        Returns logits (T, vocab_size), or with labels (T,) (-100 = ignore) the fp32 SUM of the
        cross-entropy over the labelled tokens. The loss goes through this forward (not a separate
        call on lm_head) so FSDP's hooks on the root module see the LM head being used. return_correct
        (evaluation, under no_grad): (loss, correct (T,) bool), whether each label is its row's argmax.
        """
        h = self.hidden_states(input_ids, cu_seqlens, position_ids, max_seqlen)
        if labels is None:
            return self.lm_head(h)
        # Fused LM head + CE: never holds (T, vocab) logits (9.3 GiB in fp32 for a 16k Qwen2.5 pack).
        return linear_cross_entropy_sum(h, self.lm_head.weight, labels, self.loss_chunk, return_correct=return_correct)

    loss_chunk = None  # labelled rows per LM-head chunk; None = about 1 GiB of fp32 logits


def positions_from_cu_seqlens(cu_seqlens):
    """0, 1, ... restarting at every sample start: (T,) int64."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)  # (T,) start of own sample
    return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts


# --------------------------------------------------------------------------- Qwen3.5: Gated DeltaNet + gated attention
# Qwen3.5 / 3.6 / 3.8 (model_type qwen3_5, dense). Each layer mixes tokens with either Gated DeltaNet
# (`linear_attn`: causal conv + the gated delta rule, a recurrent fp32 state per value head; 3 of every 4 layers)
# or gated full attention (`self_attn`), as config's layer_types says. Every packed sample starts with a zero conv
# window and a zero state, so a packed stream equals its samples run alone (transformers' torch path leaks both
# across packed samples). Names equal transformers' Qwen3_5TextModel; the vision tower and the MTP layer are
# never built: save_state_dict copies them from the source dir.

ATTENTION_KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)  # the head sizes sft_kernels/attention.py implements


class Qwen3_5RMSNorm(nn.Module):
    """Zero-centred RMSNorm: the stored weight is an offset from 1; norm and scale in fp32, then the cast back."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class Qwen3_5RMSNormGated(nn.Module):
    """DeltaNet's output norm per value head, w * norm(o) * silu(z): NOT zero-centred (the weight starts at 1)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, z):
        dtype = x.dtype
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * y.to(dtype)  # cast before the weight, as transformers does (bf16 parity)
        return (y * F.silu(z.float())).to(dtype)


def sdpa_varlen_attention(q, k, v, cu_seqlens, max_seqlen):
    """Causal attention per packed sample through torch's scaled_dot_product_attention (flash / memory-efficient
    backends on CUDA at any head_dim up to 256): q (T, H, D), k/v (T, Hkv, D) -> (T, H, D)."""
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))  # (1, H or Hkv, L, D)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))  # (L, H, D)
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def full_attention(q, k, v, cu_seqlens, max_seqlen):
    """varlen_attention where our kernel supports the head size (and on CPU); per-sample SDPA on CUDA otherwise."""
    if q.shape[-1] in ATTENTION_KERNEL_HEAD_DIMS or not q.is_cuda:
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    return sdpa_varlen_attention(q, k, v, cu_seqlens, max_seqlen)


def attention_note(cfg):
    """One line for the log when full attention leaves the Triton kernel (Qwen3.5's head_dim 256), else None."""
    d = head_dim_of(cfg)
    if d in ATTENTION_KERNEL_HEAD_DIMS:
        return None
    return (f"full attention at head_dim {d} runs on torch's scaled_dot_product_attention, one sample at a time "
            f"(the Triton kernel supports head_dim {', '.join(map(str, ATTENTION_KERNEL_HEAD_DIMS))}): exact, slower.")


class Qwen3_5Attention(nn.Module):
    """Gated full attention: q_proj gives per head a query and an output gate; q_norm/k_norm before a partial RoPE."""

    def __init__(self, cfg):
        super().__init__()
        hidden, bias = cfg["hidden_size"], bool(cfg.get("attention_bias", False))
        self.num_heads, self.num_kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.head_dim = cfg["head_dim"]
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim * 2, bias=bias)  # per head: query, then gate
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = Qwen3_5RMSNorm(self.head_dim, cfg["rms_norm_eps"])
        self.k_norm = Qwen3_5RMSNorm(self.head_dim, cfg["rms_norm_eps"])
        # Replaced from outside (parallel.apply_ulysses); same signature as Qwen2Attention.attn_fn.
        self.attn_fn = full_attention

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        T, D = x.shape[0], self.head_dim
        q, gate = self.q_proj(x).view(T, self.num_heads, 2 * D).chunk(2, dim=-1)  # (T, H, D) each
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).view(T, self.num_kv_heads, D))  # (T, Hkv, D)
        v = self.v_proj(x).view(T, self.num_kv_heads, D)  # (T, Hkv, D)
        r = cos.shape[-1]  # RoPE turns only the first partial_rotary_factor * D dims; the rest pass through
        q = torch.cat([apply_rotary(q[..., :r], cos, sin), q[..., r:]], dim=-1)
        k = torch.cat([apply_rotary(k[..., :r], cos, sin), k[..., r:]], dim=-1)
        o = self.attn_fn(q, k, v, cu_seqlens, max_seqlen) * torch.sigmoid(gate)  # (T, H, D)
        return self.o_proj(o.reshape(T, self.num_heads * D))  # (T, H*D) -> (T, C)


def causal_conv1d_varlen(x, weight, cu_seqlens):
    """Depthwise causal conv then SiLU over a packed stream: x (T, C), weight (C, K) -> (T, C).

    out[t] = silu(sum_j weight[:, K-1-j] * x[t-j]) over the taps j that stay inside t's own sample, i.e. each
    sample starts from a zero window. Summed in fp32, as a conv kernel accumulates.
    """
    T, K = x.shape[0], weight.shape[-1]
    pos = positions_from_cu_seqlens(cu_seqlens)  # (T,) position inside the own sample
    w = weight.float()
    out = x.float() * w[:, K - 1]
    for j in range(1, K):
        shifted = F.pad(x, (0, 0, j, 0))[:T]  # (T, C): row t holds x[t - j] (zeros before the stream)
        out = out + shifted.float() * w[:, K - 1 - j] * (pos >= j)[:, None]  # tap j reaches back into the sample
    return F.silu(out).to(x.dtype)


def l2norm(x, eps=1e-6):
    """x / sqrt(sum x^2 + eps) over the last dim, in fp32 (as transformers and flash-linear-attention do)."""
    y = x.float()
    return (y * torch.rsqrt(y.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def delta_rule_inputs(qkv, b, a, A_log, dt_bias, head_k_dim, head_v_dim):
    """After the conv: qkv (T, 2*Hk*Dk + Hv*Dv), b/a (T, Hv) -> q, k (1, T, Hv, Dk), v (1, T, Hv, Dv), g, beta (1, T, Hv)
    as the delta rule takes them. Head counts come from the shapes (a Ulysses head shard passes as it is)."""
    T, Hv = b.shape
    Hk = (qkv.shape[1] - Hv * head_v_dim) // (2 * head_k_dim)
    q, k, v = qkv.split([Hk * head_k_dim, Hk * head_k_dim, Hv * head_v_dim], dim=-1)
    # Key head i serves the Hv/Hk consecutive value heads i*Hv/Hk ...; the delta rule wants one q/k per value head.
    q = l2norm(q.reshape(T, Hk, head_k_dim)).repeat_interleave(Hv // Hk, dim=1)  # (T, Hv, Dk)
    k = l2norm(k.reshape(T, Hk, head_k_dim)).repeat_interleave(Hv // Hk, dim=1)  # (T, Hv, Dk)
    v = v.reshape(T, Hv, head_v_dim)  # (T, Hv, Dv)
    beta = b.sigmoid()  # how much of each token's correction is written to the state
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())  # (T, Hv) log-decay <= 0, fp32
    return q[None], k[None], v[None], g[None], beta[None]


def gated_delta_mix(qkv, b, a, conv_weight, A_log, dt_bias, cu_seqlens, head_k_dim, head_v_dim):
    """The token-mixing core of a Gated DeltaNet layer: qkv (T, 2*Hk*Dk + Hv*Dv), b/a (T, Hv) -> o (T, Hv, Dv).

    The head counts come from the shapes, so Ulysses can call it on a head shard (its slices of qkv's q/k/v
    channels, of conv_weight (C, 1, K) and of A_log/dt_bias (Hv,)) over the whole stream.
    """
    qkv = causal_conv1d_varlen(qkv, conv_weight.squeeze(1), cu_seqlens)
    o, _ = chunk_gated_delta_rule(*delta_rule_inputs(qkv, b, a, A_log, dt_bias, head_k_dim, head_v_dim),
                                  scale=head_k_dim ** -0.5, cu_seqlens=cu_seqlens)  # zero state at every sample start
    return o[0]  # (T, Hv, Dv)


class Qwen3_5GatedDeltaNet(nn.Module):
    """Linear attention with a recurrent state: projections, then gated_delta_mix, a gated norm and out_proj."""

    def __init__(self, cfg):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_k_heads, self.num_v_heads = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
        self.head_k_dim, self.head_v_dim = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
        key_dim, value_dim = self.num_k_heads * self.head_k_dim, self.num_v_heads * self.head_v_dim
        conv_dim = 2 * key_dim + value_dim
        self.in_proj_qkv = nn.Linear(hidden, conv_dim, bias=False)  # channels: q (Hk*Dk), k (Hk*Dk), v (Hv*Dv)
        self.in_proj_z = nn.Linear(hidden, value_dim, bias=False)  # the output gate
        self.in_proj_b = nn.Linear(hidden, self.num_v_heads, bias=False)  # beta = sigmoid(b)
        self.in_proj_a = nn.Linear(hidden, self.num_v_heads, bias=False)  # decay input
        # Depthwise, weight (C, 1, K); only the weight is used (by causal_conv1d_varlen), never this module's forward.
        K = cfg["linear_conv_kernel_dim"]
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, K, groups=conv_dim, bias=False, padding=K - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = Qwen3_5RMSNormGated(self.head_v_dim, cfg["rms_norm_eps"])
        self.out_proj = nn.Linear(value_dim, hidden, bias=False)
        # Replaced from outside (Ulysses: all-to-all q/k/v/b/a to head shards around it; z stays local).
        self.mix_fn = gated_delta_mix

    def forward(self, x, cu_seqlens):
        T = x.shape[0]
        o = self.mix_fn(self.in_proj_qkv(x), self.in_proj_b(x), self.in_proj_a(x), self.conv1d.weight,
                        self.A_log, self.dt_bias, cu_seqlens, self.head_k_dim, self.head_v_dim)  # (T, Hv, Dv)
        z = self.in_proj_z(x).view(T, self.num_v_heads, self.head_v_dim)  # (T, Hv, Dv)
        return self.out_proj(self.norm(o, z).reshape(T, -1))  # (T, Hv*Dv) -> (T, C)


class Qwen3_5DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_type):
        super().__init__()
        self.layer_type = layer_type  # "linear_attention" (holds linear_attn) or "full_attention" (self_attn)
        self.input_layernorm = Qwen3_5RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        if layer_type == "linear_attention":
            self.linear_attn = Qwen3_5GatedDeltaNet(cfg)
        else:
            self.self_attn = Qwen3_5Attention(cfg)
        self.post_attention_layernorm = Qwen3_5RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = Qwen2MLP(cfg)  # the same bias-free SwiGLU under the same names

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            x = x + self.linear_attn(h, cu_seqlens)
        else:
            x = x + self.self_attn(h, cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3_5TextModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Qwen3_5DecoderLayer(cfg, t) for t in cfg["layer_types"])
        self.norm = Qwen3_5RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.inv_freq = qwen3_5_inv_freq(cfg)  # plain fp32 CPU tensor, as in Qwen2Model

    def forward(self, input_ids, cu_seqlens, position_ids, max_seqlen):
        x = self.embed_tokens(input_ids)  # (T, C)
        if self.inv_freq.device != position_ids.device:  # moved once, on the first forward
            self.inv_freq = self.inv_freq.to(position_ids.device)
        # Text only: the three multimodal RoPE axes carry the same 1-D positions, so mrope is plain RoPE.
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq, 1.0, x.dtype)  # (T, rotary dims)
        for layer in self.layers:
            x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(x)


def qwen3_5_our_name(key, prefix):
    """A Qwen3.5 checkpoint's name -> ours (model.language_model.X -> model.X); None for the vision tower and MTP."""
    if key.startswith(("model.visual.", "mtp.")):
        return None
    return "model." + key[len(prefix):] if key.startswith(prefix) else key


def qwen3_5_prefix(path):
    """Where a Qwen3.5 model dir keeps the decoder's weights: 'model.language_model.' in the multimodal layout
    (beside model.visual.* and mtp.*), 'model.' in a text-only one; None for a dir of another family."""
    file = Path(path) / "config.json"
    kind = json.loads(file.read_text()).get("model_type") if file.is_file() else None
    return {"qwen3_5": "model.language_model.", "qwen3_5_text": "model."}.get(kind)


# --------------------------------------------------------------------------- build, load, save

def init_weights(model, seed=0, std=0.02):
    """HF's Qwen2/3 init: normal(0, initializer_range) for matrices, zeros for biases, ones for norms
    (q_norm/k_norm included). Qwen3.5: zero-centred norms 0 (i.e. scale 1), dt_bias 1, A = U(0.01, 16)."""
    gen = torch.Generator().manual_seed(seed)
    std = model.config.get("initializer_range", std)
    zero_centred = model.config["model_type"] == "qwen3_5_text"
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head appears once, as the embedding
            if name.endswith("norm.weight"):
                p.fill_(0.0 if zero_centred and not name.endswith("linear_attn.norm.weight") else 1.0)
            elif name.endswith("dt_bias"):
                p.fill_(1.0)
            elif name.endswith("A_log"):
                p.copy_((torch.rand(p.shape, generator=gen) * 15.99 + 0.01).log())
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_random(config, seed=0, dtype=torch.float32, device="cpu"):
    """A randomly initialised model of the given config dict (tests and demos); deterministic in seed."""
    model = Qwen2ForCausalLM(config)
    init_weights(model, seed)
    return model.to(device=device, dtype=dtype)


def read_safetensors(path, rename=None):
    """All tensors of model.safetensors or of a sharded checkpoint listed in model.safetensors.index.json.

    rename(name) -> the name to keep it under, or None to leave it unread (a Qwen3.5 dir's vision tower and MTP).
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):  # bad JSON, no weight_map, wrong types
            raise ModelError(f"{index} is not a valid safetensors index (a JSON object whose weight_map maps "
                             "tensor names to files); download the checkpoint's index file again.") from None
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"no model.safetensors or model.safetensors.index.json in {path}; "
                         "model.partial_pretrain must hold the weights in safetensors format.")
    tensors = {}
    for name in files:
        if not (path / name).is_file():
            raise ModelError(f"{path / name} is listed in model.safetensors.index.json but missing; "
                             "download the complete checkpoint.")
        try:  # a truncated or corrupt file fails in the header check or when a tensor is read
            with safe_open(path / name, framework="pt") as f:
                for key in f.keys():
                    ours = rename(key) if rename else key
                    if ours is not None:
                        tensors[ours] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type (and OSError) for damaged files
            raise ModelError(f"{path / name} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                             "the download is damaged or incomplete, fetch the file again.") from None
    return tensors


def load_state_dict_into(model, tensors, where="the checkpoint"):
    """Strict load of HF-named tensors into a (possibly meta) model; keeps dtype/device of the model.

    A tied checkpoint has no lm_head.weight; some also store one (Qwen3-0.6B and 1.7B), which must
    then equal the embedding and is dropped.
    """
    tensors = dict(tensors)
    if model.config.get("tie_word_embeddings", False) and "lm_head.weight" in tensors:
        head, embed = tensors.pop("lm_head.weight"), tensors.get("model.embed_tokens.weight")
        if embed is None or head.shape != embed.shape or not torch.equal(head.to(embed.dtype), embed):
            raise ModelError(f"{where} stores an lm_head.weight that differs from model.embed_tokens.weight although "
                             "config.json has tie_word_embeddings true; set it to false if the head is separate.")
    expected = {k: p for k, p in model.state_dict().items()
                if not (k == "lm_head.weight" and model.config.get("tie_word_embeddings", False))}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{where} does not match config.json (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); the weights and config.json must be of the same model.")
    for k, p in expected.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise ModelError(f"{where}: {k} has shape {tuple(tensors[k].shape)} but config.json implies "
                             f"{tuple(p.shape)}; the weights and config.json must be of the same model.")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if device.type == "meta":
        device = torch.device("cpu")
    state = {k: tensors[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model


def load_pretrained(path, dtype=torch.float32, device="cpu"):
    """Qwen2ForCausalLM (Qwen2 or Qwen3) with the weights of a Hugging Face model dir (config.json + safetensors)."""
    cfg = read_config(path)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)  # no memory or init work: every tensor is assigned below
    model = model.to(dtype=dtype)
    prefix = qwen3_5_prefix(path)
    rename = None if prefix is None else functools.partial(qwen3_5_our_name, prefix=prefix)
    load_state_dict_into(model, read_safetensors(path, rename), where=str(path))
    return model.to(device=device)


def save_state_dict(state_dict, config, path, dtype=None, source=None):
    """Write config.json + model.safetensors in the HF layout (a tied lm_head omitted, as HF does).

    source: the model dir trained from. A Qwen3.5 one keeps its layout and its config.json, and gets its
    untrained tensors (vision tower, MTP) back unchanged: see save_qwen3_5_layout.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tied = config.get("tie_word_embeddings", False)
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
               for k, v in state_dict.items() if not (tied and k == "lm_head.weight")}
    prefix = qwen3_5_prefix(source) if source is not None else None
    if prefix is None:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        config = save_qwen3_5_layout(tensors, source, prefix, path)
    config = dict(config)
    # The dtype under the key(s) the config was read with: torch_dtype (transformers 4, also read by 5)
    # or dtype (transformers 5); the rest of the config is written back as it was read.
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
        config[key] = dtype_name
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_pretrained(model, path, dtype=None, source=None):
    save_state_dict(model.state_dict(), model.config, path, dtype, source=source)


def save_qwen3_5_layout(tensors, source, prefix, path):
    """Our decoder tensors under the source's names (prefix) in one shard, and every other tensor of the source's
    files (model.visual.*, mtp.*; not a tied head's stale copy) in a second, read from those files now and written
    as they are (same dtype, same bytes), never via the GPU; an index over both. Returns the source's config.json
    (text_config's dtype set to ours), so the dir loads as the source did (Qwen3_5ForConditionalGeneration).
    """
    ours = {prefix + k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in tensors.items()}
    rest = read_safetensors(source, rename=lambda k: None if k in ours or k == "lm_head.weight" else k)
    shards = [ours, rest] if rest else [ours]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] if rest else [
        "model.safetensors"]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    if rest:
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((Path(source) / "config.json").read_text())
    text = config.get("text_config")
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    for key in [k for k in ("torch_dtype", "dtype") if isinstance(text, dict) and k in text]:
        text[key] = dtype_name
    return config


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config, mean_seqlen):
    """Training FLOPs per token (fwd + bwd = 3x fwd): 6 x matmul params + causal attention.

    Matmul params exclude the embedding lookup but include the LM head. Causal attention costs
    6 * 2 * L * H * D * s / 2 per token (QK^T and PV, half the pairs).
    """
    if config.get("model_type") == "qwen3_5_text":
        return qwen3_5_flops_per_token(config, mean_seqlen)
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = head_dim_of(config)
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * config["intermediate_size"]
    matmul = layers * per_layer + h * config["vocab_size"]
    return 6 * matmul + 6 * layers * heads * d * mean_seqlen


def qwen3_5_flops_per_token(cfg, mean_seqlen):
    """flops_per_token for Qwen3.5: 6 x matmul params (gated q_proj is doubled; DeltaNet's projections) + causal
    attention in the full layers + the delta rule's state work in the others: reading (S^T k, S^T q) and writing
    (k u^T) a Dk x Dv state, 3 x 2 x Dk x Dv forward per token and value head (the chunked form's intra-chunk
    matmuls, a few percent at Dk = Dv = 128, are not counted)."""
    h, inter, kinds = cfg["hidden_size"], cfg["intermediate_size"], cfg["layer_types"]
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    Hk, Hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    Dk, Dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    n_full = kinds.count("full_attention")
    full = h * H * D * 2 + h * Hkv * D * 2 + H * D * h
    linear = h * (2 * Hk * Dk + Hv * Dv) + h * Hv * Dv + 2 * h * Hv + Hv * Dv * h  # qkv, z, b and a, out_proj
    matmul = n_full * full + (len(kinds) - n_full) * linear + len(kinds) * 3 * h * inter + h * cfg["vocab_size"]
    return 6 * matmul + 6 * n_full * H * D * mean_seqlen + 3 * (len(kinds) - n_full) * Hv * 6 * Dk * Dv


# Dense bf16 peak FLOP/s per GPU, for MFU (by a substring of torch.cuda.get_device_name).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device_name):
    """The GPU's dense bf16 peak, or None when unknown (MFU is then not shown)."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)
