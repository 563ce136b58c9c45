"""Varlen (packed) flash attention in Triton, forward + backward, with GQA; plus a plain-torch reference.

    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale=None, causal=False)

q (T, H, D), k/v (Tk, Hkv, D), cu_seqlens int32 (B+1,): sample b is rows cu_seqlens[b]:cu_seqlens[b+1] and attends
only to itself. Differentiable wrt q, k, v. The algorithm is FlashAttention-2 (online softmax in base 2, fp32
accumulation, log-sum-exp saved for backward) laid out like Triton's fused-attention tutorial (06).

Supported
- fp16 and bf16 on CUDA (tensor-core dots); fp32 too (exact "ieee" dots, slow: meant for tests).
- head_dim D in {16, 32, 64, 128}; H % Hkv == 0 (GQA / MQA; query head h reads kv head h // (H / Hkv)).
- any sample length, including 1, 0 and lengths that are not a multiple of a block.
- causal or not. For causal self-attention pass cu_seqlens_q == cu_seqlens_k (what the trainer does). Different
  q/k lengths per sample also work, with flash-attn's bottom-right alignment: query i sees keys j <= i + Lk - Lq;
  a query row that sees no key outputs zeros.
- deterministic backward (no atomics): a dk/dv program loops over the H/Hkv query heads of its kv head, summing in
  registers; when that gives too few programs for the GPU (small Hkv) the heads are split over a few programs
  whose fp32 partial sums are added afterwards in a fixed order.
- CPU tensors run under TRITON_INTERPRET=1 (tests) with one small fixed block config.

Not supported: dropout, sliding windows, ALiBi, softcap, kv cache / paged kv, head_dim outside the set above, fp8.
max_seqlen_q / max_seqlen_k must be >= every sample length (they size the grid, as in flash-attn); nothing checks
this on the GPU, to avoid a host sync.

Launch layout: forward and dq use one program per (query block, sample, head), heaviest (last) causal block first;
dk/dv use one program per (key block, sample, kv head[, split of its query heads]), heaviest (first) block first.
Block sizes are autotuned on CUDA from a short list per head_dim: the
first call per (head_dim, causal, dtype, length bucket) compiles and times a few configs (seconds).
"""
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the native instruction


# --------------------------------------------------------------------------------------------------------------------
# Reference


def attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        softmax_scale=None, causal=False):
    """Plain-torch varlen attention, same signature as flash-attn's flash_attn_varlen_func.

    q: (T, H, D), k/v: (T, Hkv, D) with H % Hkv == 0; cu_seqlens int32 (B+1,).
    Each sample attends only to itself. Differentiable; computes in the input dtype (softmax in fp32).
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
        Lq, Lk = scores.shape[-2:]
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
        if causal:
            # bottom-right aligned like flash-attn: query i sees keys j <= i + Lk - Lq
            keep = keep.tril(Lk - Lq)
        seen = keep.any(-1, keepdim=True)  # (Lq, 1): False for a row that sees no key (only when Lk < Lq)
        # an all -inf row would give NaN (and NaN gradients); give it finite scores, then zero its probabilities
        scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~seen, 0.0)
        probs = (torch.softmax(scores.float(), dim=-1) * seen).to(q.dtype)
        outs.append((probs @ vs).transpose(0, 1))  # (Lq, H, D)
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0)


# --------------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, lo, hi, offs_m, offs_n, k_len, diag, qk_scale, stride_kt,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    # Keys [lo, hi) in steps of BLOCK_N. MASKED blocks straddle the causal diagonal or the end of the sample;
    # the others are fully visible to every row of the query block and skip all masking.
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASKED:
            kT = tl.load(k_ptrs + start_n * stride_kt, mask=cols[None, :] < k_len, other=0.0)
        else:
            kT = tl.load(k_ptrs + start_n * stride_kt)
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            keep = cols[None, :] < k_len
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # a row with no visible key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)  # rescales what was accumulated under the old running max
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_kt, mask=cols[:, None] < k_len, other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_kt)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["T_Q"])
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, qk_scale, stride_qt, stride_qh, stride_kt, stride_kh, T_Q, GROUP,
                SEQ_BUCKET, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    k_len = tl.load(CU_K + b + 1) - k_start
    n_blocks = tl.cdiv(q_len, BLOCK_M)
    if pid >= n_blocks:  # the grid is sized for max_seqlen; shorter samples have idle programs
        return
    start_m = (n_blocks - 1 - pid) * BLOCK_M  # last (heaviest under causal) blocks are scheduled first
    diag = k_len - q_len  # bottom-right causal alignment; 0 for self-attention

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    Q += q_start.to(tl.int64) * stride_qt + h * stride_qh
    O += q_start.to(tl.int64) * stride_qt + h * stride_qh
    K += k_start.to(tl.int64) * stride_kt + (h // GROUP) * stride_kh
    V += k_start.to(tl.int64) * stride_kt + (h // GROUP) * stride_kh
    row_ok = offs_m < q_len
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_ptrs = K + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N): K^T
    v_ptrs = V + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BLOCK_N, D)

    # keys [0, full_end) are visible to every row of this block; [full_end, hi) need the mask
    if CAUSAL:
        hi = tl.minimum(k_len, start_m + BLOCK_M + diag)
        full_end = tl.minimum(k_len, start_m + diag + 1)
    else:
        hi = k_len
        full_end = k_len
    hi = tl.maximum(hi, 0)
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, 0, full_end, offs_m, offs_n, k_len, diag,
                               qk_scale, stride_kt, CAUSAL, False, DOT_PREC, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, full_end, hi, offs_m, offs_n, k_len, diag,
                               qk_scale, stride_kt, CAUSAL, True, DOT_PREC, BLOCK_N)

    seen = l_i > 0.0  # False only for rows that see no key (Lk < Lq under causal): output 0, lse +inf
    l_i = tl.where(seen, l_i, 1.0)
    acc = acc / l_i[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(l_i), float("inf"))  # base-2 log-sum-exp of the scaled scores
    tl.store(O + offs_m[:, None] * stride_qt + offs_d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + h * T_Q + q_start + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O), then dk/dv over query blocks, then dq over key blocks. Both recompute
# P = exp2(S - lse). Rows past the end of a sample load lse = +inf, so their P is 0 without a mask.


@triton.jit(do_not_specialize=["T_Q"])
def _bwd_preprocess(O, DO, DELTA, stride_qt, stride_qh, T_Q, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    ok = rows < T_Q
    o = tl.load(O + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + h * T_Q + rows, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, lo, hi, offs_n, q_len, diag, qk_scale, stride_qt,
                HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    # Query rows [lo, hi) in steps of BLOCK_M against one key block; works on transposed tiles (keys x queries)
    # so dk and dv come out of plain dots.
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        qT = tl.load(Q + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
        pT = tl.math.exp2(tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED:
            pT = tl.where(offs_m[None, :] + diag >= offs_n[:, None], pT, 0.0)
        do = tl.load(DO + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])  # dS = P * (dP - rowsum(dO * O))
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["T_Q"])
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, qk_scale, sm_scale, stride_qt, stride_qh,
                     stride_kt, stride_kh, T_Q, GROUP, SEQ_BUCKET, SPLITS, stride_split, HEAD_DIM: tl.constexpr,
                     CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    hkv = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS  # this program covers query heads [split, split+1) * GROUP // SPLITS
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    k_len = tl.load(CU_K + b + 1) - k_start
    start_n = pid * BLOCK_N  # under causal the first key blocks are the heaviest, and they are scheduled first
    if start_n >= k_len:
        return
    diag = k_len - q_len
    offs_d = tl.arange(0, HEAD_DIM)
    K += k_start.to(tl.int64) * stride_kt + hkv * stride_kh
    V += k_start.to(tl.int64) * stride_kt + hkv * stride_kh
    DK += split.to(tl.int64) * stride_split + k_start.to(tl.int64) * stride_kt + hkv * stride_kh
    DV += split.to(tl.int64) * stride_split + k_start.to(tl.int64) * stride_kt + hkv * stride_kh
    Q += q_start.to(tl.int64) * stride_qt
    DO += q_start.to(tl.int64) * stride_qt
    LSE += q_start
    DELTA += q_start

    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < k_len
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Query rows that see part of this key block, [m_lo, m_full), get the causal mask; rows from m_full on see all
    # of it. Keys past k_len need no mask here: their dk/dv rows are simply not stored.
    if CAUSAL:
        m_lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_full = 0
    heads = GROUP // SPLITS
    for g in range(split * heads, split * heads + heads):  # query heads sharing this kv head: summed in registers
        h = hkv * GROUP + g
        if CAUSAL:
            dk, dv = _dkdv_inner(dk, dv, k, v, Q + h * stride_qh, DO + h * stride_qh, LSE + h * T_Q,
                                 DELTA + h * T_Q, m_lo, tl.minimum(m_full, q_len), offs_n, q_len, diag, qk_scale,
                                 stride_qt, HEAD_DIM, True, DOT_PREC, BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q + h * stride_qh, DO + h * stride_qh, LSE + h * T_Q, DELTA + h * T_Q,
                             m_full, q_len, offs_n, q_len, diag, qk_scale, stride_qt, HEAD_DIM, False, DOT_PREC,
                             BLOCK_M)
    out_ptrs = offs_n[:, None] * stride_kt + offs_d[None, :]
    tl.store(DV + out_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])
    # S was computed as q.k; dS/dk carries the softmax scale once (the log2e lives only inside exp2)
    tl.store(DK + out_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, lo, hi, offs_m, offs_n, k_len, diag, qk_scale, stride_kt,
              CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASKED:
            kT = tl.load(k_ptrs + start_n * stride_kt, mask=cols[None, :] < k_len, other=0.0)
            vT = tl.load(v_ptrs + start_n * stride_kt, mask=cols[None, :] < k_len, other=0.0)
        else:
            kT = tl.load(k_ptrs + start_n * stride_kt)
            vT = tl.load(v_ptrs + start_n * stride_kt)
        p = tl.math.exp2(tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale - lse[:, None])
        if MASKED:
            keep = cols[None, :] < k_len
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["T_Q"])
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K, qk_scale, sm_scale, stride_qt, stride_qh, stride_kt,
                   stride_kh, T_Q, GROUP, SEQ_BUCKET, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    k_len = tl.load(CU_K + b + 1) - k_start
    n_blocks = tl.cdiv(q_len, BLOCK_M)
    if pid >= n_blocks:
        return
    start_m = (n_blocks - 1 - pid) * BLOCK_M  # heaviest first, as in the forward
    diag = k_len - q_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q_off = q_start.to(tl.int64) * stride_qt + h * stride_qh
    kv_off = k_start.to(tl.int64) * stride_kt + (h // GROUP) * stride_kh
    q_ptrs = offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(Q + q_off + q_ptrs, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_off + q_ptrs, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + h * T_Q + q_start + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + h * T_Q + q_start + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + kv_off + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N): K^T
    v_ptrs = V + kv_off + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N): V^T

    if CAUSAL:  # same split as the forward
        hi = tl.minimum(k_len, start_m + BLOCK_M + diag)
        full_end = tl.minimum(k_len, start_m + diag + 1)
    else:
        hi = k_len
        full_end = k_len
    hi = tl.maximum(hi, 0)
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, 0, full_end, offs_m, offs_n, k_len, diag, qk_scale,
                   stride_kt, CAUSAL, False, DOT_PREC, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, full_end, hi, offs_m, offs_n, k_len, diag, qk_scale,
                   stride_kt, CAUSAL, True, DOT_PREC, BLOCK_N)
    tl.store(DQ + q_off + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------------------------
# Launch configurations


def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Candidates for Hopper (H100/H200: 228 KB shared memory, wgmma wants M >= 64 per warpgroup), keyed by head_dim
# class (<= 64, 128, 256). BLOCK_M is the query tile, BLOCK_N the key tile. dk/dv hold k, v and two (BLOCK_N, D)
# fp32 accumulators in registers, so its tiles are small or get 8 warps. Every candidate compiles for sm_90 with
# Triton 3.9 without register spills and within 227 KiB of shared memory per block (tests/test_kernel_compile.py
# compiles each one, bf16, causal or not), which ruled out e.g. dk/dv (32, 128) with 4 warps, the D=128 causal
# dk/dv (32, 64) with 3 stages and the D=128 forward (128, 64) with 4 warps. At D=256 one (128, 256) fp32
# accumulator is already 128 registers a thread at 8 warps: forward and dq keep 8 warps (4 only with 64 x 32
# tiles; the forward's (128, 64) spills when not causal), and dk/dv spill at every 64-key tile, every 4-warp tile
# and at 16 warps (capped at 128 registers), which leaves (<= 32, 32) with 8 warps. Triton 3.6 (another supported
# version) makes every causal D<=128 dk/dv candidate spill except the 2-stage ones, which are in the list for that
# reason. The last entry is the pick for short samples. The autotuner drops a config that does not fit
# (OutOfResources), and on pre-Hopper GPUs the deep pipelines are pruned first.
_TUNE = {
    "fwd": {64: [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3)],
            128: [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(64, 64, 4, 3)],
            256: [_cfg(128, 32, 8, 3), _cfg(128, 32, 8, 2), _cfg(64, 64, 8, 2), _cfg(64, 32, 4, 3)]},
    "dkdv": {64: [_cfg(32, 128, 8, 3), _cfg(32, 128, 8, 4), _cfg(32, 128, 8, 2), _cfg(32, 64, 4, 3)],
             128: [_cfg(16, 128, 8, 3), _cfg(16, 64, 8, 3), _cfg(16, 128, 8, 2), _cfg(32, 64, 8, 2)],
             256: [_cfg(32, 32, 8, 3), _cfg(16, 32, 8, 3), _cfg(32, 32, 8, 2), _cfg(16, 32, 8, 2)]},
    "dq": {64: [_cfg(128, 32, 4, 5), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
           128: [_cfg(128, 32, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3)],
           256: [_cfg(128, 32, 8, 2), _cfg(64, 32, 8, 3), _cfg(64, 32, 8, 2)]},
}
# fp32 on a GPU (tests only): exact fp32 dots run on CUDA cores and need small tiles (they still spill at D=128).
_FP32 = {"fwd": _cfg(32, 32, 4, 2), "dkdv": _cfg(32, 32, 4, 2), "dq": _cfg(32, 32, 4, 2)}
# CPU interpreter: small tiles so short test sequences still span several blocks; unequal M and N on purpose.
_INTERP = {"fwd": _cfg(32, 16, 4, 1), "dkdv": _cfg(16, 32, 4, 1), "dq": _cfg(32, 16, 4, 1)}


def _candidates(kind, head_dim):
    """The Hopper block configs of one kernel ("fwd", "dkdv", "dq") at one head_dim (tests compile each for sm_90)."""
    return _TUNE[kind][min(c for c in _TUNE[kind] if c >= head_dim)]


def _pruner(kind):
    def prune(configs, named_args, **kwargs):
        candidates = _candidates(kind, kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM")))
        if torch.cuda.get_device_capability(named_args["Q"].device)[0] < 9:
            candidates = [c for c in candidates if c.num_stages <= 3] or candidates[-1:]
        if kwargs.get("SEQ_BUCKET", named_args.get("SEQ_BUCKET")) <= 256:
            candidates = candidates[-1:]  # short samples: the smallest tiles, no timing (nothing much to gain)
        return candidates
    return prune


def _autotuned(kernel, kind, key):
    # Tuned once per key (+ dtype); the kernels only store their outputs, so re-running them while timing is harmless.
    configs = [c for cs in _TUNE[kind].values() for c in cs]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _pruner(kind)})(kernel)


_KEY = ["HEAD_DIM", "CAUSAL", "SEQ_BUCKET"]
_fwd_tuned = _autotuned(_fwd_kernel, "fwd", _KEY)
_dkdv_tuned = _autotuned(_bwd_dkdv_kernel, "dkdv", _KEY + ["SPLITS"])
_dq_tuned = _autotuned(_bwd_dq_kernel, "dq", _KEY)


def _launch(kernel, tuned, kind, n_rows, n_samples, n_heads, args, **constexprs):
    """Launch on a grid (row blocks of the longest sample, samples, heads) with the right block config."""
    q = args[0]
    if q.is_cuda and q.dtype != torch.float32:
        fn, cfg = tuned, {}
    else:
        c = (_FP32 if q.is_cuda else _INTERP)[kind]
        fn, cfg = kernel, dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    rows_per_block = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"

    def grid(meta):
        return (triton.cdiv(n_rows, meta[rows_per_block]), n_samples, n_heads)

    fn[grid](*args, **constexprs, **cfg)


def _seq_bucket(max_seqlen):
    # autotune key: the best tiles differ for short samples; everything from 4k up shares one choice
    return min(triton.next_power_of_2(max(int(max_seqlen), 64)), 4096)


def _dkdv_splits(k, group):
    """How many programs share the query heads of one kv head in the dk/dv kernel (a divisor of group).

    One program per (key block, kv head) is few programs when Hkv is small (Qwen2.5-0.5B: 2, or 1 per rank under
    Ulysses): a 16k pack gives ~256 programs of very unequal causal work for 132 SMs. Splitting the group over
    programs restores parallelism; each split writes fp32 partial dk/dv, summed afterwards (deterministic, no atomics).
    """
    if not k.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(k.device).multi_processor_count
    block_n = max(c.kwargs["BLOCK_N"] for c in _candidates("dkdv", k.shape[2]))  # 128, or 32 at D=256
    programs = triton.cdiv(k.shape[0], block_n) * k.shape[1]
    for splits in range(1, group + 1):
        if group % splits == 0 and programs * splits >= 4 * sms:  # ~4 programs per SM: balances the causal tail
            return splits
    return group


# --------------------------------------------------------------------------------------------------------------------
# Autograd wrapper


class _FlashAttnVarlen(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                dkdv_splits):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        T, H, D = q.shape
        B = cu_seqlens_q.numel() - 1
        o = torch.zeros_like(q)  # rows outside every sample stay 0
        lse = torch.empty((H, T), device=q.device, dtype=torch.float32)  # base-2 log-sum-exp per (head, row)
        common = dict(HEAD_DIM=D, CAUSAL=causal, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
        if T > 0 and B > 0 and max_seqlen_q > 0:
            _launch(_fwd_kernel, _fwd_tuned, "fwd", max_seqlen_q, B, H,
                    (q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale * LOG2E, q.stride(0), q.stride(1),
                     k.stride(0), k.stride(1), T, H // k.shape[1], _seq_bucket(max_seqlen_q)), **common)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, common, dkdv_splits)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, softmax_scale, common, splits = ctx.args
        do = do.contiguous()
        T, H, D = q.shape
        Hkv = k.shape[1]
        B = cu_seqlens_q.numel() - 1
        dq = torch.zeros_like(q)  # rows outside every sample get 0
        if T == 0 or B == 0 or max_seqlen_q == 0 or k.shape[0] == 0:
            return dq, torch.zeros_like(k), torch.zeros_like(v), *([None] * 7)
        splits = splits or _dkdv_splits(k, H // Hkv)
        part = (splits,) if splits > 1 else ()  # fp32 partial sums, one per split of the query heads
        dk = torch.zeros(part + k.shape, device=k.device, dtype=torch.float32 if part else k.dtype)
        dv = torch.zeros_like(dk)

        delta = torch.empty_like(lse)
        block = 128 if q.is_cuda else 32
        _bwd_preprocess[(triton.cdiv(T, block), H)](o, do, delta, q.stride(0), q.stride(1), T, HEAD_DIM=D,
                                                     BLOCK=block)
        shared = (softmax_scale * LOG2E, softmax_scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), T,
                  H // Hkv)
        _launch(_bwd_dkdv_kernel, _dkdv_tuned, "dkdv", max_seqlen_k, B, Hkv * splits,
                (q, k, v, do, dk, dv, lse, delta, cu_seqlens_q, cu_seqlens_k, *shared, _seq_bucket(max_seqlen_k),
                 splits, k.numel()), **common)
        _launch(_bwd_dq_kernel, _dq_tuned, "dq", max_seqlen_q, B, H,
                (q, k, v, do, dq, lse, delta, cu_seqlens_q, cu_seqlens_k, *shared, _seq_bucket(max_seqlen_q)),
                **common)
        if part:
            dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
        return dq, dk, dv, *([None] * 7)


def _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                       causal=False, dkdv_splits=None):
    T, H, D = q.shape
    if k.shape != v.shape or k.dim() != 3 or k.shape[2] != D or H % k.shape[1] != 0:
        raise ValueError(f"flash_attn_varlen_func: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must "
                         "be (T, H, D), (Tk, Hkv, D), (Tk, Hkv, D) with H % Hkv == 0")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"flash_attn_varlen_func: head_dim {D} is not supported (16, 32, 64, 128 or 256)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attn_varlen_func: q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} must be equal and "
                         "one of fp16, bf16, fp32")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("flash_attn_varlen_func: cu_seqlens_q and cu_seqlens_k must have the same length (B+1)")
    if dkdv_splits is not None and (H // k.shape[1]) % dkdv_splits != 0:
        raise ValueError(f"dkdv_splits {dkdv_splits} must divide H / Hkv = {H // k.shape[1]}")
    cu_seqlens_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32)  # no-ops for the usual int32 input
    cu_seqlens_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale, bool(causal),
            dkdv_splits)
    if q.is_cuda:
        with torch.cuda.device(q.device):  # Triton launches on the current device, which a caller may not have set
            return _FlashAttnVarlen.apply(*args)
    return _FlashAttnVarlen.apply(*args)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False):
    """Varlen attention on packed (T, H, D) q and (Tk, Hkv, D) k/v; see the module docstring for what is supported."""
    return _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                              causal)
