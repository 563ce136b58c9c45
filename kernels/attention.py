"""Varlen (packed) causal attention with GQA: a plain-torch reference.

The Triton kernel with the same signature lives beside it (see flash_attn_varlen_func).
"""
import math

import torch


def attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        softmax_scale=None, causal=False):
    """Plain-torch varlen attention, same signature as flash-attn's flash_attn_varlen_func.

    q: (T, H, D), k/v: (T, Hkv, D) with H % Hkv == 0; cu_seqlens int32 (B+1,).
    Each sample attends only to itself. Differentiable; computes in the input dtype.
    """
    T, H, D = q.shape
    Hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    outs = []
    for i in range(len(bounds_q) - 1):
        qs = q[bounds_q[i]:bounds_q[i + 1]].transpose(0, 1)  # (H, Lq, D)
        ks = k[bounds_k[i]:bounds_k[i + 1]].transpose(0, 1)  # (Hkv, Lk, D)
        vs = v[bounds_k[i]:bounds_k[i + 1]].transpose(0, 1)
        ks = ks.repeat_interleave(H // Hkv, dim=0)  # (H, Lk, D): query head h uses kv head h // (H/Hkv)
        vs = vs.repeat_interleave(H // Hkv, dim=0)
        scores = (qs @ ks.transpose(1, 2)) * scale  # (H, Lq, Lk)
        if causal:
            Lq, Lk = scores.shape[-2:]
            # bottom-right aligned like flash-attn: query i sees keys j <= i + Lk - Lq
            keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        probs = torch.nan_to_num(probs)  # a fully masked row (Lk < Lq) outputs zeros
        outs.append((probs @ vs).transpose(0, 1))  # (Lq, H, D)
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0)
