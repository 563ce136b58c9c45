"""Gated delta rule (Gated DeltaNet's linear attention) on packed varlen streams: Triton + torch, with a reference.

    o, final_state = chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                                            output_final_state=False, cu_seqlens=None)

The call flash-linear-attention users know. q, k (1, T, H, K), v (1, T, H, V) with H the value heads (q/k already
repeated to them), g (log decay, <= 0) and beta (1, T, H); cu_seqlens int32 (N+1,) marks the samples of the packed
stream (None: one sample). Per sample and head the state S (K x V, fp32) starts at zero (or initial_state[n]) and
for every token t
    S <- exp(g_t) S;   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = scale * S^T q_t
with scale K**-0.5 by default. Returns o (1, T, H, V) in v's dtype and the final states (N, H, K, V) fp32 (or None).
Tokens outside every sample (cu_seqlens[-1] < T) get o = 0.

Supported
- any sample length (0, 1, 63, 64, 65, ...), any number of samples; boundaries from cu_seqlens (read on the host
  once per call: the Triton path builds its chunk table from it).
- initial_state (N, H, K, V) and output_final_state, differentiable in both (dq, dk, dv, dg, dbeta, d initial_state).
- Triton: q/k/v fp16 or bf16 on CUDA (fp32 too: exact dots, slow, for tests), g/beta any float dtype; K and V in
  {16, 32, 64, 128}. The recurrent state and every accumulation in fp32; W, U, dU and the per-chunk states that the
  parallel kernels read are stored in the inputs' dtype (they only enter dots, whose operands are that dtype), and
  dk's first part passes through dk's own buffer (one extra rounding in bf16). Deterministic backward (no atomics:
  sums over V blocks run in a fixed order inside one program). Activations saved for backward: the inputs only;
  transient in one backward at Qwen3.5-27B shapes (H = 48, K = V = 128) and a 16k-token pack: about 1.6 GB.
- sm_90 (H100/H200): every shipped autotune config of every kernel compiles at K = V = 128 in bf16 without register
  spills and within the shared memory of an SM (tests/test_kernel_compile.py).
- torch path: any dtype and head dims; float64 in gives float64 math (the tests' exact mode).

Not supported: q/k L2-norm inside (the caller normalises), grouped q/k heads (repeat them to the value heads first),
batch > 1 (pack instead), head dims above 128 in Triton, the recurrent single-token decode kernel (generation runs
the torch path or the reference), sequence-parallel state passing between ranks, T * H * max(K, V) >= 2^31 (int32
row offsets in the Triton kernels).
Not measured yet: speed on a GPU (sft_kernels/bench_gdn.py is ready for the first lent one).

Three implementations of one function:
- gated_delta_rule_reference: token by token, in float64 when given float64 (the ground truth of the tests).
- chunk_gated_delta_rule_torch: the chunked WY/UT form in plain torch (chunks of 64), fp32 at least, differentiable
  by autograd, CPU or GPU. Each sample is padded to whole chunks; padding tokens have beta = 0 and g = 0, so they
  leave the state untouched.
- the Triton kernels (chunk_gated_delta_rule on CUDA tensors; chunk_gated_delta_rule_triton forces them, e.g. on
  CPU tensors under TRITON_INTERPRET=1 in tests).

The chunked form. In a chunk of C tokens starting from state S0, with b the cumulative log decay inside the chunk
(b_i = g_1 + ... + g_i), the deltas u_i = beta_i (v_i - (e^{b_i - b_{i-1}} S_{i-1})^T k_i) satisfy
(I + A) U = diag(beta) V - diag(beta e^b) K S0 with A strictly lower, A_ij = beta_i e^{b_i - b_j} k_i.k_j. With
T = (I + A)^-1 (the "UT transform"), W = T diag(beta e^b) K and U' = T diag(beta) V (the "WY" factors):
    U = U' - W S0
    O = scale (diag(e^b) Q S0 + tril(Q K^T * e^{b_i - b_j}) U)
    S1 = e^{b_C} S0 + (diag(e^{b_C - b}) K)^T U
Only the last two lines run sequentially over chunks; the rest is parallel matmuls.
"""
import math

import torch
import triton
import triton.language as tl

CHUNK = 64  # chunk length of the chunked form (the WY/UT systems are CHUNK x CHUNK)


# --------------------------------------------------------------------------------------------------------------------
# Argument checks (shared by every path)


def _check(q, k, v, g, beta, initial_state, cu_seqlens):
    """Raise one sentence for a wrong call; return (T, H, K, V, bounds) with bounds the host list of cu_seqlens."""
    if q.dim() != 4 or q.shape[0] != 1 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"chunk_gated_delta_rule: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "(1, T, H, K), (1, T, H, K), (1, T, H, V) (repeat q/k to the value heads first)")
    _, T, H, K = q.shape
    V = v.shape[-1]
    if g.shape != (1, T, H) or beta.shape != (1, T, H):
        raise ValueError(f"chunk_gated_delta_rule: g {tuple(g.shape)} and beta {tuple(beta.shape)} must be (1, T, H) "
                         f"= (1, {T}, {H})")
    bounds = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] > T or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"chunk_gated_delta_rule: cu_seqlens must start at 0, be non-decreasing and end at most at "
                         f"T = {T}; got {bounds[:8]}{'...' if len(bounds) > 8 else ''}")
    N = len(bounds) - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(f"chunk_gated_delta_rule: initial_state {tuple(initial_state.shape)} must be (N, H, K, V) = "
                         f"({N}, {H}, {K}, {V}), one state per sample")
    return T, H, K, V, bounds


def _compute_dtype(*xs):
    """fp32, or float64 when any input is float64 (the tests' exact mode)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


# --------------------------------------------------------------------------------------------------------------------
# Reference: token by token


def gated_delta_rule_reference(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None):
    """The recurrence as written, one token at a time (slow; the ground truth). Differentiable; float64 if given."""
    T, H, K, V, bounds = _check(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = K ** -0.5 if scale is None else scale
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    out_dtype = v.dtype
    q, k, v, g, beta = (x[0].to(dt) for x in (q, k, v, g, beta))  # (T, H, ...)
    outs, finals = [], []
    for n in range(len(bounds) - 1):
        S = q.new_zeros(H, K, V) if initial_state is None else initial_state[n].to(dt)
        for t in range(bounds[n], bounds[n + 1]):
            S = S * g[t].exp()[:, None, None]
            delta = beta[t][:, None] * (v[t] - torch.einsum("hkv,hk->hv", S, k[t]))  # (H, V)
            S = S + k[t][:, :, None] * delta[:, None, :]
            outs.append((t, scale * torch.einsum("hkv,hk->hv", S, q[t])))
        finals.append(S)
    o = q.new_zeros(T, H, V)
    if outs:
        rows = torch.tensor([t for t, _ in outs], device=q.device)
        o = o.index_put((rows,), torch.stack([x for _, x in outs]))
    final = torch.stack(finals).to(torch.float32 if dt != torch.float64 else dt) if output_final_state else None
    return o[None].to(out_dtype), final


# --------------------------------------------------------------------------------------------------------------------
# Torch chunked form (readable; what the model runs off CUDA)


def chunk_gated_delta_rule_torch(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                 cu_seqlens=None):
    """The chunked WY/UT form in plain torch; all samples advance together, one chunk per step."""
    T, H, K, V, bounds = _check(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = K ** -0.5 if scale is None else scale
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    dev = q.device
    N = len(bounds) - 1
    C = CHUNK
    starts = torch.tensor(bounds[:-1], device=dev)
    lens = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], device=dev)
    n_chunks = max(1, math.ceil(max(bounds[i + 1] - bounds[i] for i in range(N)) / C)) if N else 1
    L = n_chunks * C
    # Gather every sample into a zero-padded (N, L) grid; padding (beta = 0, g = 0, k = 0) never touches the state.
    t_idx = torch.arange(L, device=dev)
    valid = t_idx[None, :] < lens[:, None]  # (N, L)
    pos = torch.where(valid, starts[:, None] + t_idx[None, :], 0)  # (N, L)

    def grid(x):  # (1, T, H, ...) -> (N, H, n_chunks, C, ...) in the compute dtype, zero where not valid
        x = x[0].to(dt)[pos]  # (N, L, H, ...)
        x = x * valid.view(N, L, *([1] * (x.dim() - 2)))
        x = x.view(N, n_chunks, C, *x.shape[2:]).movedim(3, 1)  # (N, H, n_chunks, C, ...)
        return x

    out_dtype = v.dtype
    q, k, v, g, beta = grid(q), grid(k), grid(v), grid(g), grid(beta)
    b = g.cumsum(-1)  # (N, H, n, C) cumulative log decay inside each chunk
    i_idx = torch.arange(C, device=dev)
    strict = i_idx[:, None] > i_idx[None, :]
    causal = i_idx[:, None] >= i_idx[None, :]
    diff = b[..., :, None] - b[..., None, :]  # (N, H, n, C, C): b_i - b_j
    # exp only where i >= j (elsewhere b_i - b_j > 0 could overflow, and inf * 0 would poison the gradient)
    decay = torch.where(causal, diff, float("-inf")).exp()
    A = torch.where(strict, beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay, 0.0)
    eye = torch.eye(C, device=dev, dtype=dt)
    rhs = torch.cat([(beta * b.exp())[..., None] * k, beta[..., None] * v], -1)  # (N, H, n, C, K + V)
    wu = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    w, u_prime = wu[..., :K], wu[..., K:]  # W = T diag(beta e^b) K, U' = T diag(beta) V
    P = torch.where(causal, (q @ k.transpose(-1, -2)) * decay, 0.0)  # (N, H, n, C, C)
    q_dec = q * b.exp()[..., None]  # diag(e^b) Q
    b_last = b[..., -1:]  # (N, H, n, 1): padding has g = 0, so the last row holds the chunk's total decay
    k_dec = k * (b_last - b).exp()[..., None]  # diag(e^{b_C - b}) K

    S = (q.new_zeros(N, H, K, V) if initial_state is None else initial_state.to(dt))
    outs = []
    for c in range(n_chunks):
        u = u_prime[:, :, c] - w[:, :, c] @ S  # (N, H, C, V)
        outs.append(scale * (q_dec[:, :, c] @ S + P[:, :, c] @ u))
        S = b_last[:, :, c, :, None].exp() * S + k_dec[:, :, c].transpose(-1, -2) @ u
    o = torch.stack(outs, 2).movedim(1, 3).reshape(N, L, H, V)  # (N, L, H, V)
    out = o.new_zeros(T, H, V).index_put((pos[valid],), o[valid])  # back to the packed rows
    final = S.to(torch.float32 if dt != torch.float64 else dt) if output_final_state else None  # fp32 (f64 in tests)
    return out[None].to(out_dtype), final


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Seven kernels: two sequential over the chunks of a sample (the state slice (K, BV) in registers, nothing else),
# five parallel over chunks. Forward: prep -> fwd -> out. Backward: prep -> fwd (recompute) -> bwd_du -> bwd_state
# -> bwd_dqk -> bwd_wy.
#   _prep_kernel       (chunk, head)              T = (I + A)^-1, W = T diag(beta e^b) K, U' = T diag(beta) V
#   _fwd_kernel        (V block, sample, head)    U = U' - W S (in place of U'), S at every chunk start, S <- next
#   _out_kernel        (chunk, head)              O = scale (diag(e^b) Q S0 + P U)
#   _bwd_du_kernel     (chunk, head)              dU = scale P^T dO (its intra-chunk part)
#   _bwd_state_kernel  (V block, sample, head)    reverse over chunks: dU += diag(e^{b_C - b}) K dS1, dS at every
#                                                 chunk end, dS <- previous
#   _bwd_dqk_kernel    (chunk, head)              dq; the O and S1 paths of dk and of the log-decay gradient
#   _bwd_wy_kernel     (chunk, head)              the WY/UT path: dv, dbeta, the rest of dk; dg
# Sums over V run as loops over V blocks in a fixed order inside one program: no atomics, deterministic.
# Saved for backward: only the inputs (and cu_seqlens); the rest is recomputed, so activations stay O(T H D).
# Transient during one call: W, U, dU (T, H, K|V) and the states S, dS (n_chunks, H, K, V), all in the inputs'
# dtype (they only enter dots, whose operands are that dtype anyway), T (n_chunks, H, 64, 64) fp32.


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    # operands in the inputs' dtype (bf16 tensor cores on a GPU), fp32 accumulation; exact "ieee" for fp32 tests
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _load_rows(X, h, t0, end, col, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    # rows t0 .. t0 + BT, columns col .. col + BD of head h in a (T, H, D) tensor; rows >= end read as zero
    r, d = t0 + tl.arange(0, BT), col + tl.arange(0, BD)
    return tl.load(X + h * D + r[:, None] * (H * D) + d[None, :], mask=(r < end)[:, None], other=0.0)


@triton.jit
def _store_rows(X, x, h, t0, end, col, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    # the (BT, BD) tile x to the rows t0 .. min(t0 + BT, end) of _load_rows's window, in X's dtype
    r, d = t0 + tl.arange(0, BT), col + tl.arange(0, BD)
    tl.store(X + h * D + r[:, None] * (H * D) + d[None, :], x.to(X.dtype.element_ty), mask=(r < end)[:, None])


@triton.jit
def _state_ptrs(X, idx, col, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    # pointers to columns col .. col + BV of the idx-th (K, V) matrix of a (..., K, V) tensor: (K, BV)
    return X + idx.to(tl.int64) * (K * V) + tl.arange(0, K)[:, None] * V + (col + tl.arange(0, BV))[None, :]


# The UT transform and the WY factors of one chunk: A = strictly lower beta_i e^{b_i - b_j} k_i.k_j, T = (I + A)^-1,
# W = T diag(beta e^b) K (BT, K), U' = T diag(beta) V (BT, V); T itself (BT, BT) fp32 when STORE_T (the backward).
@triton.jit
def _prep_kernel(K_, V_, G, BETA, W, U, TM, CHUNKS, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                 STORE_T: tl.constexpr, DOT_PREC: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    t0, eos = tl.load(CHUNKS + 2 * c), tl.load(CHUNKS + 2 * c + 1)
    i = tl.arange(0, BT)
    rows = t0 + i
    ok = rows < eos
    dt = K_.dtype.element_ty
    k = _load_rows(K_, h, t0, eos, 0, H, K, BT, K)  # (BT, K)
    g = tl.load(G + rows * H + h, mask=ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + rows * H + h, mask=ok, other=0.0).to(tl.float32)
    b = tl.cumsum(g, 0)
    strict = i[:, None] > i[None, :]
    decay = tl.exp(tl.where(strict, b[:, None] - b[None, :], float("-inf")))
    A = beta[:, None] * _dot(k, tl.trans(k), DOT_PREC) * decay  # (BT, BT) strictly lower
    # T = (I + A)^-1 row by row: T_i = e_i - sum_{j<i} A_ij T_j (fp32; BT steps of (BT, BT) elementwise work)
    Tm = tl.where(i[:, None] == i[None, :], 1.0, 0.0)
    for r in range(1, BT):
        a_r = tl.sum(tl.where(i[:, None] == r, A, 0.0), 0)  # (BT,) row r of A, indexed by column j
        row = tl.sum(a_r[:, None] * Tm, 0)  # sum_j A_rj T_j
        Tm = Tm - tl.where(i[:, None] == r, row[None, :], 0.0)
    if STORE_T:
        tl.store(TM + (c * H + h).to(tl.int64) * BT * BT + i[:, None] * BT + i[None, :], Tm)
    Tm = Tm.to(dt)
    kb = (k.to(tl.float32) * (beta * tl.exp(b))[:, None]).to(dt)
    _store_rows(W, _dot(Tm, kb, DOT_PREC), h, t0, eos, 0, H, K, BT, K)  # (BT, K)
    v = _load_rows(V_, h, t0, eos, 0, H, V, BT, V)  # (BT, V)
    u = _dot(Tm, (v.to(tl.float32) * beta[:, None]).to(dt), DOT_PREC)  # (BT, V)
    _store_rows(U, u, h, t0, eos, 0, H, V, BT, V)


# The recurrence over the chunks of one sample for columns [vb BV, vb BV + BV) of the state (every update is
# separable in V): stores S at every chunk start (HBUF), overwrites U' with U = U' - W S, S <- e^{b_C} S +
# (diag(e^{b_C - b}) K)^T U. Only the (K, BV) state and one chunk's tiles are live: the outputs come in parallel.
@triton.jit
def _fwd_kernel(K_, G, W, U, H0, HT, HBUF, CU, FIRST, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, DOT_PREC: tl.constexpr):
    vb, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = tl.load(CU + n), tl.load(CU + n + 1)
    chunk = tl.load(FIRST + n)  # global index of this sample's first chunk (rows of HBUF)
    col = vb * BV
    i = tl.arange(0, BT)
    if HAS_H0:
        S = tl.load(_state_ptrs(H0, n * H + h, col, K, V, BV)).to(tl.float32)  # (K, BV)
    else:
        S = tl.zeros((K, BV), dtype=tl.float32)
    dt = K_.dtype.element_ty
    for t0 in range(bos, eos, BT):
        rows = t0 + i
        g = tl.load(G + rows * H + h, mask=rows < eos, other=0.0).to(tl.float32)
        b = tl.cumsum(g, 0)
        b_last = tl.sum(g, 0)  # = b at the last valid row (padding rows have g = 0)
        Sd = S.to(dt)
        tl.store(_state_ptrs(HBUF, chunk * H + h, col, K, V, BV), Sd)
        w = _load_rows(W, h, t0, eos, 0, H, K, BT, K)  # (BT, K)
        u = _load_rows(U, h, t0, eos, col, H, V, BT, BV)  # U' (BT, BV)
        u = (u.to(tl.float32) - _dot(w, Sd, DOT_PREC)).to(dt)  # U = U' - W S
        _store_rows(U, u, h, t0, eos, col, H, V, BT, BV)
        k = _load_rows(K_, h, t0, eos, 0, H, K, BT, K)  # (BT, K)
        kd = (k.to(tl.float32) * tl.exp(b_last - b)[:, None]).to(dt)  # diag(e^{b_C - b}) K
        S = tl.exp(b_last) * S + _dot(tl.trans(kd), u, DOT_PREC)
        chunk += 1
    if STORE_FINAL:
        tl.store(_state_ptrs(HT, n * H + h, col, K, V, BV), S)


@triton.jit
def _chunk_p(q, k, b, BT: tl.constexpr, DOT_PREC: tl.constexpr):
    # P = tril(Q K^T * e^{b_i - b_j}) of one chunk, fp32 (BT, BT); exp only where i >= j (elsewhere it may overflow)
    i = tl.arange(0, BT)
    causal = i[:, None] >= i[None, :]
    return _dot(q, tl.trans(k), DOT_PREC) * tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))


# The outputs of one chunk from its start state S0 and U: O = scale (diag(e^b) Q S0 + P U), V block by V block.
@triton.jit
def _out_kernel(Q, K_, G, U, HBUF, O, CHUNKS, scale, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BV: tl.constexpr, DOT_PREC: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    t0, eos = tl.load(CHUNKS + 2 * c), tl.load(CHUNKS + 2 * c + 1)
    rows = t0 + tl.arange(0, BT)
    dt = Q.dtype.element_ty
    g = tl.load(G + rows * H + h, mask=rows < eos, other=0.0).to(tl.float32)
    b = tl.cumsum(g, 0)
    q = _load_rows(Q, h, t0, eos, 0, H, K, BT, K)  # (BT, K)
    k = _load_rows(K_, h, t0, eos, 0, H, K, BT, K)
    P = _chunk_p(q, k, b, BT, DOT_PREC).to(dt)
    qd = (q.to(tl.float32) * tl.exp(b)[:, None]).to(dt)
    for col in range(0, V, BV):
        s0 = tl.load(_state_ptrs(HBUF, c * H + h, col, K, V, BV))  # (K, BV)
        u = _load_rows(U, h, t0, eos, col, H, V, BT, BV)
        o = scale * (_dot(qd, s0, DOT_PREC) + _dot(P, u, DOT_PREC))  # (BT, BV)
        _store_rows(O, o, h, t0, eos, col, H, V, BT, BV)


# The intra-chunk part of dU, scale P^T dO (BT, V), for the state kernel to complete.
@triton.jit
def _bwd_du_kernel(Q, K_, G, DO, DU, CHUNKS, scale, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BV: tl.constexpr, DOT_PREC: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    t0, eos = tl.load(CHUNKS + 2 * c), tl.load(CHUNKS + 2 * c + 1)
    rows = t0 + tl.arange(0, BT)
    g = tl.load(G + rows * H + h, mask=rows < eos, other=0.0).to(tl.float32)
    b = tl.cumsum(g, 0)
    q = _load_rows(Q, h, t0, eos, 0, H, K, BT, K)  # (BT, K)
    k = _load_rows(K_, h, t0, eos, 0, H, K, BT, K)
    Pt = tl.trans(_chunk_p(q, k, b, BT, DOT_PREC).to(Q.dtype.element_ty))  # (BT, BT)
    for col in range(0, V, BV):
        do = _load_rows(DO, h, t0, eos, col, H, V, BT, BV)
        _store_rows(DU, scale * _dot(Pt, do, DOT_PREC), h, t0, eos, col, H, V, BT, BV)


# The reverse recurrence for columns [vb BV, vb BV + BV): from dS1 (the state gradient at a chunk's end),
# dU = scale P^T dO (already in DU) + diag(e^{b_C - b}) K dS1 and dS0 = e^{b_C} dS1 + scale (diag(e^b) Q)^T dO
# - W^T dU. Completes dU in place, stores every dS1 (DHBUF) and the gradient of the initial state.
@triton.jit
def _bwd_state_kernel(Q, K_, G, W, DO, DHT, DH0, DU, DHBUF, CU, FIRST, scale, H, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr, DOT_PREC: tl.constexpr):
    vb, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = tl.load(CU + n), tl.load(CU + n + 1)
    first = tl.load(FIRST + n)
    col = vb * BV
    i = tl.arange(0, BT)
    if HAS_DHT:
        dS = tl.load(_state_ptrs(DHT, n * H + h, col, K, V, BV)).to(tl.float32)  # (K, BV)
    else:
        dS = tl.zeros((K, BV), dtype=tl.float32)
    dt = Q.dtype.element_ty
    n_chunks = tl.cdiv(eos - bos, BT)
    for back in range(0, n_chunks):
        ci = n_chunks - 1 - back
        t0 = bos + ci * BT
        rows = t0 + i
        g = tl.load(G + rows * H + h, mask=rows < eos, other=0.0).to(tl.float32)
        b = tl.cumsum(g, 0)
        b_last = tl.sum(g, 0)
        dSd = dS.to(dt)
        tl.store(_state_ptrs(DHBUF, (first + ci) * H + h, col, K, V, BV), dSd)
        k = _load_rows(K_, h, t0, eos, 0, H, K, BT, K)  # (BT, K)
        kd = (k.to(tl.float32) * tl.exp(b_last - b)[:, None]).to(dt)
        du = _load_rows(DU, h, t0, eos, col, H, V, BT, BV)
        du = (du.to(tl.float32) + _dot(kd, dSd, DOT_PREC)).to(dt)  # (BT, BV)
        _store_rows(DU, du, h, t0, eos, col, H, V, BT, BV)
        q = _load_rows(Q, h, t0, eos, 0, H, K, BT, K)
        qd = (q.to(tl.float32) * (scale * tl.exp(b))[:, None]).to(dt)
        do = _load_rows(DO, h, t0, eos, col, H, V, BT, BV)
        w = _load_rows(W, h, t0, eos, 0, H, K, BT, K)
        dS = tl.exp(b_last) * dS + _dot(tl.trans(qd), do, DOT_PREC) - _dot(tl.trans(w), du, DOT_PREC)
    tl.store(_state_ptrs(DH0, n * H + h, col, K, V, BV), dS)


# Backward inside one chunk, part 1: the paths through O and S1. With dP = scale dO U^T (causal), from
# O = scale (diag(e^b) Q S0 + P U): dq = scale diag(e^b) dO S0^T + (dP * gamma) K (stored), dk_1 = (dP * gamma)^T Q;
# from S1 = e^{b_C} S0 + (diag(e^{b_C - b}) K)^T U: dk_1 += diag(e^{b_C - b}) U dS1^T. dk_1 goes to DK and the
# gradient of b (log-decay cumsum) of these paths to DG, for _bwd_wy_kernel to complete.
@triton.jit
def _bwd_dqk_kernel(Q, K_, G, HBUF, DHBUF, U, DO, DQ, DK, DG, CHUNKS, scale, H, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    t0, eos = tl.load(CHUNKS + 2 * c), tl.load(CHUNKS + 2 * c + 1)
    i = tl.arange(0, BT)
    rows = t0 + i
    ok = rows < eos
    dt = Q.dtype.element_ty
    g = tl.load(G + rows * H + h, mask=ok, other=0.0).to(tl.float32)
    b = tl.cumsum(g, 0)
    b_last = tl.sum(g, 0)
    causal = i[:, None] >= i[None, :]
    gamma = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))  # e^{b_i - b_j}, i >= j
    s_idx = c * H + h  # this chunk's (K, V) state in HBUF / DHBUF
    # pass 1 over V blocks: dP and dO S0^T
    dP = tl.zeros((BT, BT), dtype=tl.float32)
    dqs = tl.zeros((BT, K), dtype=tl.float32)
    for col in range(0, V, BV):
        do = _load_rows(DO, h, t0, eos, col, H, V, BT, BV)
        u = _load_rows(U, h, t0, eos, col, H, V, BT, BV)
        s0 = tl.load(_state_ptrs(HBUF, s_idx, col, K, V, BV))  # (K, BV)
        dP += _dot(do, tl.trans(u), DOT_PREC)
        dqs += _dot(do, tl.trans(s0), DOT_PREC)
    q = _load_rows(Q, h, t0, eos, 0, H, K, BT, K)  # (BT, K)
    k = _load_rows(K_, h, t0, eos, 0, H, K, BT, K)
    dP = tl.where(causal, scale * dP, 0.0)
    dqi = (scale * tl.exp(b))[:, None] * dqs  # (BT, K)
    dPg = (dP * gamma).to(dt)
    _store_rows(DQ, dqi + _dot(dPg, k, DOT_PREC), h, t0, eos, 0, H, K, BT, K)
    M = dP * _dot(q, tl.trans(k), DOT_PREC) * gamma  # d/d(b_i - b_j) of P_ij
    db = tl.sum(dqi * q.to(tl.float32), 1) + tl.sum(M, 1) - tl.sum(M, 0)
    # pass 2 over V blocks: dkd = U dS1^T and the e^{b_C} S0 term of S1
    dkd = tl.zeros((BT, K), dtype=tl.float32)
    dS_S0 = tl.zeros((BV,), dtype=tl.float32)
    for col in range(0, V, BV):
        u = _load_rows(U, h, t0, eos, col, H, V, BT, BV)
        s0 = tl.load(_state_ptrs(HBUF, s_idx, col, K, V, BV))  # (K, BV)
        ds1 = tl.load(_state_ptrs(DHBUF, s_idx, col, K, V, BV))
        dkd += _dot(u, tl.trans(ds1), DOT_PREC)
        dS_S0 += tl.sum(s0.to(tl.float32) * ds1.to(tl.float32), 0)
    kdec = tl.exp(b_last - b)
    _store_rows(DK, _dot(tl.trans(dPg), q, DOT_PREC) + dkd * kdec[:, None], h, t0, eos, 0, H, K, BT, K)
    m = tl.sum(dkd * k.to(tl.float32), 1) * kdec
    # b_C is b at the last valid row
    last = tl.minimum(eos - t0, BT) - 1
    db = tl.where(i == last, db - m + tl.exp(b_last) * tl.sum(dS_S0, 0) + tl.sum(m, 0), db - m)
    tl.store(DG + rows * H + h, db, mask=ok)


# Backward inside one chunk, part 2: the WY path. U' = T X, W = T Y with X = diag(beta) V, Y = diag(beta e^b) K,
# T = (I + A)^-1, and from U = U' - W S0: dW = -dU S0^T. Gives dv, dbeta, the rest of dk (added to DK) and of the
# gradient of b (added to DG), then dg_j = sum_{i >= j} db_i.
@triton.jit
def _bwd_wy_kernel(K_, V_, G, BETA, TM, HBUF, DU, DK, DV, DG, DBETA, CHUNKS, H, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    t0, eos = tl.load(CHUNKS + 2 * c), tl.load(CHUNKS + 2 * c + 1)
    i = tl.arange(0, BT)
    rows = t0 + i
    ok = rows < eos
    dt = K_.dtype.element_ty
    g = tl.load(G + rows * H + h, mask=ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + rows * H + h, mask=ok, other=0.0).to(tl.float32)
    b = tl.cumsum(g, 0)
    eb = tl.exp(b)
    s_idx = c * H + h
    Tm = tl.load(TM + s_idx.to(tl.int64) * BT * BT + i[:, None] * BT + i[None, :]).to(dt)  # (BT, BT)
    # over V blocks: dW = -dU S0^T, dX = T^T dU (dv, dbeta), dT = dU X^T
    dw = tl.zeros((BT, K), dtype=tl.float32)
    dT = tl.zeros((BT, BT), dtype=tl.float32)
    dbeta = tl.zeros((BT,), dtype=tl.float32)
    for col in range(0, V, BV):
        du = _load_rows(DU, h, t0, eos, col, H, V, BT, BV)  # (BT, BV)
        v = _load_rows(V_, h, t0, eos, col, H, V, BT, BV)
        s0 = tl.load(_state_ptrs(HBUF, s_idx, col, K, V, BV))  # (K, BV)
        dw -= _dot(du, tl.trans(s0), DOT_PREC)
        dT += _dot(du, tl.trans((v.to(tl.float32) * beta[:, None]).to(dt)), DOT_PREC)
        dX = _dot(tl.trans(Tm), du, DOT_PREC)  # (BT, BV)
        _store_rows(DV, beta[:, None] * dX, h, t0, eos, col, H, V, BT, BV)
        dbeta += tl.sum(dX * v.to(tl.float32), 1)
    k = _load_rows(K_, h, t0, eos, 0, H, K, BT, K)  # (BT, K)
    dwd = dw.to(dt)
    dY = _dot(tl.trans(Tm), dwd, DOT_PREC)  # (BT, K)
    y = tl.sum(dY * k.to(tl.float32), 1)
    dbeta += eb * y
    db = beta * eb * y
    dT += _dot(dwd, tl.trans((k.to(tl.float32) * (beta * eb)[:, None]).to(dt)), DOT_PREC)  # (BT, BT)
    # dA = -T^T dT T^T on the strictly lower part; A_ij = beta_i e^{b_i - b_j} k_i.k_j
    strict = i[:, None] > i[None, :]
    dA = -_dot(_dot(tl.trans(Tm), dT.to(dt), DOT_PREC).to(dt), tl.trans(Tm), DOT_PREC)
    gamma = tl.exp(tl.where(strict, b[:, None] - b[None, :], float("-inf")))
    dA = tl.where(strict, dA, 0.0)
    G_ = _dot(k, tl.trans(k), DOT_PREC) * gamma
    dbeta += tl.sum(dA * G_, 1)
    MA = dA * G_ * beta[:, None]
    db += tl.sum(MA, 1) - tl.sum(MA, 0)
    dAk = (dA * gamma * beta[:, None]).to(dt)
    dk = (beta * eb)[:, None] * dY + _dot(dAk, k, DOT_PREC) + _dot(tl.trans(dAk), k, DOT_PREC)
    dk += _load_rows(DK, h, t0, eos, 0, H, K, BT, K).to(tl.float32)  # _bwd_dqk_kernel's part
    _store_rows(DK, dk, h, t0, eos, 0, H, K, BT, K)
    db = tl.where(ok, db + tl.load(DG + rows * H + h, mask=ok, other=0.0), 0.0)
    dg = tl.sum(db, 0) - tl.cumsum(db, 0) + db  # b = cumsum(g)
    tl.store(DG + rows * H + h, dg, mask=ok)
    tl.store(DBETA + rows * H + h, dbeta, mask=ok)


# Launch configurations


def _cfg(warps, stages, **kwargs):
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


# Hopper (H100/H200: 228 KiB shared memory per SM) at K = V = 128, BT = 64; every config here compiles for sm_90
# without register spills (tests/test_kernel_compile.py). On sm_90 a dot with 64 rows runs on one warpgroup, so a
# (64, N) fp32 accumulator costs N / 2 registers a thread whatever num_warps is: the kernels keep few of them live.
# The sequential kernels hold the state slice (K, BV) fp32; BV = 32 doubles the programs (parallelism when
# samples x heads is small), BV = 64 halves the loads of the (BT, K) tiles per program.
_TUNE = {
    "prep": [_cfg(4, 1), _cfg(8, 1)],
    "fwd": [_cfg(4, 1, BV=32), _cfg(4, 2, BV=32), _cfg(4, 1, BV=64), _cfg(8, 2, BV=64)],
    "out": [_cfg(4, 1, BV=64), _cfg(4, 2, BV=64), _cfg(8, 1, BV=128)],
    "bwd_du": [_cfg(4, 1, BV=64), _cfg(4, 2, BV=64), _cfg(8, 1, BV=128)],
    "bwd_state": [_cfg(8, 1), _cfg(8, 2)],
    "bwd_dqk": [_cfg(8, 1, BV=32), _cfg(8, 2, BV=32), _cfg(8, 1, BV=64), _cfg(8, 2, BV=64)],
    "bwd_wy": [_cfg(8, 1, BV=32), _cfg(8, 2, BV=32), _cfg(8, 1, BV=64)],
}
# CPU interpreter (tests): any config computes the same; BV = 32 gives two V blocks at V = 64.
_INTERP = {name: _cfg(4, 1, BV=32) for name in _TUNE}
_KERNELS = {"prep": _prep_kernel, "fwd": _fwd_kernel, "out": _out_kernel, "bwd_du": _bwd_du_kernel,
            "bwd_state": _bwd_state_kernel, "bwd_dqk": _bwd_dqk_kernel, "bwd_wy": _bwd_wy_kernel}
# The state kernel's BV is not tuned but chosen on the host (_state_bv): 32 or 64; the compile test tries both.
_KEYS = {"prep": ["STORE_T"], "fwd": ["HAS_H0", "STORE_FINAL"], "bwd_state": ["BV"]}
# Kernels that update a buffer in place: the autotuner restores it after each timed trial.
_IN_PLACE = {"fwd": ["U"], "bwd_state": ["DU"], "bwd_wy": ["DK", "DG"]}


def _fit_bv(configs, named_args, **kwargs):
    """Autotuner pruning: V blocks no wider than V (V = 16 or 32 turns BV = 64 into BV = V), duplicates dropped."""
    fitted = {}
    for c in configs:
        kw = dict(c.kwargs, BV=min(c.kwargs["BV"], kwargs["V"])) if "BV" in c.kwargs else c.kwargs
        fitted.setdefault((tuple(sorted(kw.items())), c.num_warps, c.num_stages),
                          triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(fitted.values())


# Every autotuned kernel we launch, for the sm_90 compile test: name -> autotuner (.configs); _RAW: name -> kernel.
AUTOTUNED = {name: triton.autotune(_TUNE[name], key=["K", "V"] + _KEYS.get(name, []),
                                   prune_configs_by={"early_config_prune": _fit_bv},
                                   restore_value=_IN_PLACE.get(name, []))(fn)
             for name, fn in _KERNELS.items()}
_RAW = _KERNELS


def _launch(kind, grid, on_gpu, *args, **constexprs):
    """Autotuned on a GPU with bf16/fp16; one fixed config otherwise (interpreter tests, fp32 on a GPU)."""
    if on_gpu:
        AUTOTUNED[kind][grid](*args, **constexprs)
    else:
        c = _INTERP[kind]
        kw = {name: min(val, constexprs["V"]) for name, val in c.kwargs.items()  # BV <= V
              if name in _RAW[kind].arg_names and name not in constexprs}
        _RAW[kind][grid](*args, **constexprs, **kw, num_warps=c.num_warps, num_stages=c.num_stages)


def _state_bv(N, H, V, device):
    """V block of the backward state kernel: 32 when N * H * V / 64 programs would leave SMs idle, else 64."""
    if device.type != "cuda":
        return min(32, V)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(32 if N * H * max(V // 64, 1) < sms else 64, V)


# --------------------------------------------------------------------------------------------------------------------
# Autograd wrapper


def _chunk_table(bounds, device):
    """(n_chunks, 2) int32 [start, sample end] of every chunk, and (N,) int32 index of each sample's first chunk."""
    table, first = [], []
    for a, b in zip(bounds, bounds[1:]):
        first.append(len(table))
        table.extend([t, b] for t in range(a, b, CHUNK))
    return (torch.tensor(table or [[0, 0]], dtype=torch.int32, device=device).view(-1, 2)[:len(table)],
            torch.tensor(first, dtype=torch.int32, device=device))


def _states(k, v, g, beta, h0, cu_seqlens, chunks, first, N, on_gpu, prec, final=None, store_t=False):
    """prep + fwd: W (T, H, K), U (T, H, V), the state at every chunk start (n_chunks, H, K, V) in k's dtype, and
    T (n_chunks, H, 64, 64) fp32 if store_t; the final states into `final` (N, H, K, V) fp32 if given."""
    T, H, K = k.shape
    V = v.shape[-1]
    w, u = torch.empty_like(k), torch.empty_like(v)
    tm = torch.empty(len(chunks), H, CHUNK, CHUNK, device=k.device, dtype=torch.float32) if store_t else w
    _launch("prep", (len(chunks), H), on_gpu, k, v, g, beta, w, u, tm, chunks, H, K=K, V=V, BT=CHUNK,
            STORE_T=store_t, DOT_PREC=prec)
    hbuf = torch.empty(len(chunks), H, K, V, device=k.device, dtype=k.dtype)
    _launch("fwd", lambda meta: (V // meta["BV"], N, H), on_gpu, k, g, w, u, h0 if h0 is not None else w,
            final if final is not None else w, hbuf, cu_seqlens, first, H, K=K, V=V, BT=CHUNK,
            HAS_H0=h0 is not None, STORE_FINAL=final is not None, DOT_PREC=prec)
    return w, u, hbuf, tm


class _ChunkGatedDeltaRule(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, h0, output_final_state, cu_seqlens, bounds):
        ctx.dtypes = (g.dtype, beta.dtype, h0.dtype if h0 is not None else None)
        q, k, v, g, beta = (x[0].contiguous() for x in (q, k, v, g, beta))  # (T, H, ...)
        T, H, K = q.shape
        V = v.shape[-1]
        N = len(bounds) - 1
        chunks, first = _chunk_table(bounds, q.device)
        on_gpu = q.is_cuda and q.dtype != torch.float32
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        o = torch.zeros_like(v)  # rows outside every sample stay 0
        h0c = h0.contiguous().float() if h0 is not None else None
        final = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
        if len(chunks):
            _, u, hbuf, _ = _states(k, v, g, beta, h0c, cu_seqlens, chunks, first, N, on_gpu, prec, final)
            _launch("out", (len(chunks), H), on_gpu, q, k, g, u, hbuf, o, chunks, scale, H, K=K, V=V, BT=CHUNK,
                    DOT_PREC=prec)
        elif output_final_state:
            final = h0c.clone() if h0 is not None else torch.zeros(N, H, K, V, device=q.device)
        ctx.save_for_backward(q, k, v, g, beta, h0c, cu_seqlens, chunks, first)
        ctx.args = (scale, N)
        return o[None], final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, cu_seqlens, chunks, first = ctx.saved_tensors
        scale, N = ctx.args
        T, H, K = q.shape
        V = v.shape[-1]
        on_gpu = q.is_cuda and q.dtype != torch.float32
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        f32 = dict(device=q.device, dtype=torch.float32)
        do = do[0].to(v.dtype).contiguous()
        n_chunks = len(chunks)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dg, dbeta = torch.zeros(T, H, **f32), torch.zeros(T, H, **f32)
        dh0 = dht.float().clone() if dht is not None else torch.zeros(N, H, K, V, **f32)
        if n_chunks:
            # recompute W, U, T and the state at every chunk start (transient, this layer only)
            w, u, hbuf, tm = _states(k, v, g, beta, h0, cu_seqlens, chunks, first, N, on_gpu, prec, store_t=True)
            du, dhbuf = torch.empty_like(v), torch.empty_like(hbuf)
            grid = (n_chunks, H)
            _launch("bwd_du", grid, on_gpu, q, k, g, do, du, chunks, scale, H, K=K, V=V, BT=CHUNK, DOT_PREC=prec)
            BV = _state_bv(N, H, V, q.device)
            dht_c = dht.float().contiguous() if dht is not None else dh0
            _launch("bwd_state", (V // BV, N, H), on_gpu, q, k, g, w, do, dht_c, dh0, du, dhbuf, cu_seqlens, first,
                    scale, H, K=K, V=V, BT=CHUNK, BV=BV, HAS_DHT=dht is not None, DOT_PREC=prec)
            del w
            _launch("bwd_dqk", grid, on_gpu, q, k, g, hbuf, dhbuf, u, do, dq, dk, dg, chunks, scale, H, K=K, V=V,
                    BT=CHUNK, DOT_PREC=prec)
            del dhbuf, u
            _launch("bwd_wy", grid, on_gpu, k, v, g, beta, tm, hbuf, du, dk, dv, dg, dbeta, chunks, H, K=K, V=V,
                    BT=CHUNK, DOT_PREC=prec)
        g_dtype, beta_dtype, h0_dtype = ctx.dtypes
        return (dq[None], dk[None], dv[None], dg[None].to(g_dtype), dbeta[None].to(beta_dtype), None,
                dh0.to(h0_dtype) if h0 is not None else None, None, None, None)


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None):
    """Gated delta rule on a packed stream; see the module docstring. Triton on CUDA tensors, torch elsewhere."""
    if q.is_cuda:
        return chunk_gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def chunk_gated_delta_rule_triton(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                  cu_seqlens=None):
    """The Triton kernels on any device (CPU tensors need TRITON_INTERPRET=1)."""
    T, H, K, V, bounds = _check(q, k, v, g, beta, initial_state, cu_seqlens)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"chunk_gated_delta_rule: q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} must be equal and one "
                         "of fp16, bf16, fp32 for the Triton kernels")
    if K not in (16, 32, 64, 128) or V not in (16, 32, 64, 128):
        raise ValueError(f"chunk_gated_delta_rule: head dims K={K}, V={V} must each be 16, 32, 64 or 128 for the "
                         "Triton kernels")
    scale = K ** -0.5 if scale is None else float(scale)
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    args = (q, k, v, g, beta, scale, initial_state, bool(output_final_state), cu, bounds)
    if q.is_cuda:
        with torch.cuda.device(q.device):  # Triton launches on the current device, which a caller may not have set
            return _ChunkGatedDeltaRule.apply(*args)
    return _ChunkGatedDeltaRule.apply(*args)
