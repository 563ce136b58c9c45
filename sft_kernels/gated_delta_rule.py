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
  {16, 32, 64, 128}; state and all intermediate factors in fp32. Deterministic backward (no atomics: per-V-block
  partial sums are added in a fixed order). Activations saved for backward: the inputs only.
- torch path: any dtype and head dims; float64 in gives float64 math (the tests' exact mode).

Not supported: q/k L2-norm inside (the caller normalises), grouped q/k heads (repeat them to the value heads first),
batch > 1 (pack instead), head dims above 128 in Triton, the recurrent single-token decode kernel (generation runs
the torch path or the reference), sequence-parallel state passing between ranks.
Known gap: at K = V = 128 every autotune config compiles for sm_90 but ptxas reports register spills (STACK > 0);
the per-element pointer tensors of the (64, 128) tiles are the likely cause (block pointers would remove them).

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
# Four kernels, two of them sequential over the chunks of a sample (state in registers), two parallel over chunks:
#   _prep_kernel       (chunk, head)              the UT transform T = (I + A)^-1 by forward substitution, then
#                                                 W = T diag(beta e^b) K and U' = T diag(beta) V (fp32, (T, H, K|V)).
#   _fwd_kernel        (V block, sample, head)    U = U' - W S, O, S <- next state; the backward re-runs it to store
#                                                 the state at every chunk start and U (transient, freed after).
#   _bwd_state_kernel  (V block, sample, head)    reverse over chunks: dU and dS, and the parts of dq, dW, dk that
#                                                 need the state (fp32 partials per V block, summed in fixed order).
#   _bwd_intra_kernel  (chunk, head)              everything inside a chunk: dq, dk, dv, dbeta, dg.
# Saved for backward: only the inputs (and cu_seqlens); the rest is recomputed, so activations stay O(T H D).


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    # operands in the inputs' dtype (bf16 tensor cores on a GPU), fp32 accumulation; exact "ieee" for fp32 tests
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _prep_kernel(K_, V_, G, BETA, W, U, TM, CHUNKS, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                 STORE_T: tl.constexpr, DOT_PREC: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    t0, eos = tl.load(CHUNKS + 2 * c), tl.load(CHUNKS + 2 * c + 1)
    rows = t0 + tl.arange(0, BT)
    ok = rows < eos
    ik, iv, i = tl.arange(0, K), tl.arange(0, V), tl.arange(0, BT)
    k = tl.load(K_ + (rows[:, None] * H + h) * K + ik[None, :], mask=ok[:, None], other=0.0)  # (BT, K)
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
    dt = K_.dtype.element_ty
    kb = (k.to(tl.float32) * (beta * tl.exp(b))[:, None]).to(dt)
    w = _dot(Tm.to(dt), kb, DOT_PREC)  # (BT, K)
    tl.store(W + (rows[:, None] * H + h) * K + ik[None, :], w, mask=ok[:, None])
    v = tl.load(V_ + (rows[:, None] * H + h) * V + iv[None, :], mask=ok[:, None], other=0.0)
    u = _dot(Tm.to(dt), (v.to(tl.float32) * beta[:, None]).to(dt), DOT_PREC)  # (BT, V)
    tl.store(U + (rows[:, None] * H + h) * V + iv[None, :], u, mask=ok[:, None])
    if STORE_T:
        tl.store(TM + ((c * H + h) * BT + i[:, None]) * BT + i[None, :], Tm)


@triton.jit
def _fwd_kernel(Q, K_, G, W, UP, O, H0, HT, HBUF, UBUF, CU, FIRST, scale, H, K: tl.constexpr, V: tl.constexpr,
                BT: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_O: tl.constexpr,
                STORE_FINAL: tl.constexpr, STORE_STATES: tl.constexpr, DOT_PREC: tl.constexpr):
    vb, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = tl.load(CU + n), tl.load(CU + n + 1)
    chunk = tl.load(FIRST + n)  # global index of this sample's first chunk (rows of HBUF)
    ik, iv, i = tl.arange(0, K), vb * BV + tl.arange(0, BV), tl.arange(0, BT)
    s_off = ik[:, None] * V + iv[None, :]  # (K, BV) slice of a (K, V) state
    if HAS_H0:
        S = tl.load(H0 + (n * H + h) * K * V + s_off).to(tl.float32)
    else:
        S = tl.zeros((K, BV), dtype=tl.float32)
    causal = i[:, None] >= i[None, :]
    dt = Q.dtype.element_ty
    for t0 in range(bos, eos, BT):
        rows = t0 + i
        ok = rows < eos
        qk_off = (rows[:, None] * H + h) * K + ik[None, :]
        v_off = (rows[:, None] * H + h) * V + iv[None, :]
        q = tl.load(Q + qk_off, mask=ok[:, None], other=0.0)
        k = tl.load(K_ + qk_off, mask=ok[:, None], other=0.0)
        g = tl.load(G + rows * H + h, mask=ok, other=0.0).to(tl.float32)
        b = tl.cumsum(g, 0)
        b_last = tl.sum(g, 0)  # = b at the last valid row (padding rows have g = 0)
        if STORE_STATES:
            tl.store(HBUF + (chunk * H + h) * K * V + s_off, S)
        w = tl.load(W + qk_off, mask=ok[:, None], other=0.0)
        u = tl.load(UP + v_off, mask=ok[:, None], other=0.0) - _dot(w.to(dt), S.to(dt), DOT_PREC)  # U' - W S
        if STORE_STATES:
            tl.store(UBUF + v_off, u, mask=ok[:, None])
        if STORE_O:
            P = _dot(q, tl.trans(k), DOT_PREC) * tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
            qd = (q.to(tl.float32) * tl.exp(b)[:, None]).to(dt)
            o = scale * (_dot(qd, S.to(dt), DOT_PREC) + _dot(P.to(dt), u.to(dt), DOT_PREC))
            tl.store(O + v_off, o.to(O.dtype.element_ty), mask=ok[:, None])
        kd = (k.to(tl.float32) * tl.exp(b_last - b)[:, None]).to(dt)  # diag(e^{b_C - b}) K
        S = tl.exp(b_last) * S + _dot(tl.trans(kd), u.to(dt), DOT_PREC)
        chunk += 1
    if STORE_FINAL:
        tl.store(HT + (n * H + h) * K * V + s_off, S)


@triton.jit
def _bwd_state_kernel(Q, K_, G, W, UBUF, HBUF, DO, DHT, DH0, DU, DQI, DW, DKD, DBC, CU, FIRST, scale, T, H,
                      K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    vb, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = tl.load(CU + n), tl.load(CU + n + 1)
    first = tl.load(FIRST + n)
    ik, iv, i = tl.arange(0, K), vb * BV + tl.arange(0, BV), tl.arange(0, BT)
    s_off = ik[:, None] * V + iv[None, :]
    if HAS_DHT:
        dS = tl.load(DHT + (n * H + h) * K * V + s_off).to(tl.float32)
    else:
        dS = tl.zeros((K, BV), dtype=tl.float32)
    causal = i[:, None] >= i[None, :]
    dt = Q.dtype.element_ty
    n_chunks = tl.cdiv(eos - bos, BT)
    part = vb * T * H * K  # this V block's slice of the (NV, T, H, K) partial sums
    for back in range(0, n_chunks):
        ci = n_chunks - 1 - back
        chunk = first + ci
        rows = bos + ci * BT + i
        ok = rows < eos
        qk_off = (rows[:, None] * H + h) * K + ik[None, :]
        v_off = (rows[:, None] * H + h) * V + iv[None, :]
        q = tl.load(Q + qk_off, mask=ok[:, None], other=0.0)
        k = tl.load(K_ + qk_off, mask=ok[:, None], other=0.0)
        g = tl.load(G + rows * H + h, mask=ok, other=0.0).to(tl.float32)
        b = tl.cumsum(g, 0)
        b_last = tl.sum(g, 0)
        S0 = tl.load(HBUF + (chunk * H + h) * K * V + s_off)  # state at the chunk start, fp32 (K, BV)
        do = tl.load(DO + v_off, mask=ok[:, None], other=0.0)
        u = tl.load(UBUF + v_off, mask=ok[:, None], other=0.0)
        P = _dot(q, tl.trans(k), DOT_PREC) * tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
        kd = (k.to(tl.float32) * tl.exp(b_last - b)[:, None]).to(dt)
        # dU = scale P^T dO + diag(e^{b_C - b}) K dS1
        du = scale * _dot(tl.trans(P.to(dt)), do, DOT_PREC) + _dot(kd, dS.to(dt), DOT_PREC)  # (BT, BV)
        tl.store(DU + v_off, du, mask=ok[:, None])
        S0t = tl.trans(S0.to(dt))  # (BV, K)
        dqi = scale * tl.exp(b)[:, None] * _dot(do, S0t, DOT_PREC)  # from O = scale diag(e^b) Q S0
        tl.store(DQI + part + qk_off, dqi, mask=ok[:, None])
        tl.store(DW + part + qk_off, -_dot(du.to(dt), S0t, DOT_PREC), mask=ok[:, None])  # U = U' - W S0
        tl.store(DKD + part + qk_off, _dot(u.to(dt), tl.trans(dS.to(dt)), DOT_PREC), mask=ok[:, None])
        # d(e^{b_C}) S0 term of S1, per (chunk, head, V block): (n_chunks, H, NV)
        tl.store(DBC + (chunk * H + h) * tl.num_programs(0) + vb, tl.exp(b_last) * tl.sum(tl.sum(S0 * dS, 1), 0))
        w = tl.load(W + qk_off, mask=ok[:, None], other=0.0)
        qd = (q.to(tl.float32) * tl.exp(b)[:, None]).to(dt)
        dS = (tl.exp(b_last) * dS + scale * _dot(tl.trans(qd), do, DOT_PREC)
              - _dot(tl.trans(w.to(dt)), du.to(dt), DOT_PREC))
    tl.store(DH0 + (n * H + h) * K * V + s_off, dS)


@triton.jit
def _bwd_intra_kernel(Q, K_, V_, G, BETA, TM, UBUF, DO, DU, DQI, DW, DKD, DBC, DQ, DK, DV, DG, DBETA, CHUNKS, scale,
                      T, H, NV, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, DOT_PREC: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    t0, eos = tl.load(CHUNKS + 2 * c), tl.load(CHUNKS + 2 * c + 1)
    i, ik, iv = tl.arange(0, BT), tl.arange(0, K), tl.arange(0, V)
    rows = t0 + i
    ok = rows < eos
    qk_off = (rows[:, None] * H + h) * K + ik[None, :]
    v_off = (rows[:, None] * H + h) * V + iv[None, :]
    dt = Q.dtype.element_ty
    q = tl.load(Q + qk_off, mask=ok[:, None], other=0.0)
    k = tl.load(K_ + qk_off, mask=ok[:, None], other=0.0)
    g = tl.load(G + rows * H + h, mask=ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + rows * H + h, mask=ok, other=0.0).to(tl.float32)
    b = tl.cumsum(g, 0)
    b_last = tl.sum(g, 0)
    causal = i[:, None] >= i[None, :]
    strict = i[:, None] > i[None, :]
    gamma = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))  # e^{b_i - b_j}, i >= j
    # fp32 partial sums of the state kernel's V blocks, added in a fixed order (deterministic)
    dqi = tl.zeros((BT, K), dtype=tl.float32)
    dw = tl.zeros((BT, K), dtype=tl.float32)
    dkd = tl.zeros((BT, K), dtype=tl.float32)
    db_last = 0.0
    for vb in range(0, NV):
        dqi += tl.load(DQI + vb * T * H * K + qk_off, mask=ok[:, None], other=0.0)
        dw += tl.load(DW + vb * T * H * K + qk_off, mask=ok[:, None], other=0.0)
        dkd += tl.load(DKD + vb * T * H * K + qk_off, mask=ok[:, None], other=0.0)
        db_last += tl.load(DBC + (c * H + h) * NV + vb)

    # O_intra = scale tril(Q K^T * gamma) U  and  O_inter = scale diag(e^b) Q S0 (its dq came as dqi)
    do = tl.load(DO + v_off, mask=ok[:, None], other=0.0)
    u = tl.load(UBUF + v_off, mask=ok[:, None], other=0.0)
    P = _dot(q, tl.trans(k), DOT_PREC) * gamma
    dP = tl.where(causal, scale * _dot(do, tl.trans(u.to(dt)), DOT_PREC), 0.0)
    dPg = (dP * gamma).to(dt)
    dq = dqi + _dot(dPg, k, DOT_PREC)
    dk = _dot(tl.trans(dPg), q, DOT_PREC)
    db = tl.sum(dqi * q.to(tl.float32), 1)
    M = dP * P  # d/d(b_i - b_j) of P_ij
    db += tl.sum(M, 1) - tl.sum(M, 0)
    # S1 = e^{b_C} S0 + (diag(e^{b_C - b}) K)^T U (the dS0-term of e^{b_C} came as db_last)
    kdec = tl.exp(b_last - b)
    dk += dkd * kdec[:, None]
    m = tl.sum(dkd * k.to(tl.float32), 1) * kdec
    db -= m
    db_last += tl.sum(m, 0)
    # WY factors: U' = T X, W = T Y with X = diag(beta) V, Y = diag(beta e^b) K, T = (I + A)^-1
    Tm = tl.load(TM + ((c * H + h) * BT + i[:, None]) * BT + i[None, :]).to(dt)
    du = tl.load(DU + v_off, mask=ok[:, None], other=0.0).to(dt)
    v = tl.load(V_ + v_off, mask=ok[:, None], other=0.0)
    dX = _dot(tl.trans(Tm), du, DOT_PREC)  # (BT, V)
    dv = beta[:, None] * dX
    dbeta = tl.sum(dX * v.to(tl.float32), 1)
    dY = _dot(tl.trans(Tm), dw.to(dt), DOT_PREC)  # (BT, K)
    eb = tl.exp(b)
    dk += (beta * eb)[:, None] * dY
    y = tl.sum(dY * k.to(tl.float32), 1)
    dbeta += eb * y
    db += beta * eb * y
    X = (v.to(tl.float32) * beta[:, None]).to(dt)
    Y = (k.to(tl.float32) * (beta * eb)[:, None]).to(dt)
    dT = _dot(du, tl.trans(X), DOT_PREC) + _dot(dw.to(dt), tl.trans(Y), DOT_PREC)  # (BT, BT)
    # dA = -T^T dT T^T on the strictly lower part; A_ij = beta_i e^{b_i - b_j} k_i.k_j
    dA = -_dot(_dot(tl.trans(Tm), dT.to(dt), DOT_PREC).to(dt), tl.trans(Tm), DOT_PREC)
    G_ = tl.where(strict, _dot(k, tl.trans(k), DOT_PREC) * gamma, 0.0)
    dA = tl.where(strict, dA, 0.0)
    dbeta += tl.sum(dA * G_, 1)
    MA = dA * G_ * beta[:, None]
    db += tl.sum(MA, 1) - tl.sum(MA, 0)
    dAk = (dA * gamma * beta[:, None]).to(dt)
    dk += _dot(dAk, k, DOT_PREC) + _dot(tl.trans(dAk), k, DOT_PREC)
    # b_C is b at the last valid row; then g -> b = cumsum(g) means dg_j = sum_{i >= j} db_i
    last = tl.minimum(eos - t0, BT) - 1
    db = tl.where(i == last, db + db_last, db)
    db = tl.where(ok, db, 0.0)
    dg = tl.sum(db, 0) - tl.cumsum(db, 0) + db
    tl.store(DQ + qk_off, dq.to(DQ.dtype.element_ty), mask=ok[:, None])
    tl.store(DK + qk_off, dk.to(DK.dtype.element_ty), mask=ok[:, None])
    tl.store(DV + v_off, dv.to(DV.dtype.element_ty), mask=ok[:, None])
    tl.store(DG + rows * H + h, dg, mask=ok)
    tl.store(DBETA + rows * H + h, dbeta, mask=ok)


# --------------------------------------------------------------------------------------------------------------------
# Launch configurations


def _cfg(warps, stages, **kwargs):
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


# Hopper (H100/H200: 228 KiB shared memory per SM) at K = V = 128, BT = 64. The sequential kernels hold the state
# slice (K, BV) fp32 in registers; BV = 32 doubles the programs (parallelism when samples x heads is small), BV = 64
# halves the redundant (BT, BT) work per program. The parallel kernels hold a few (BT, 128) tiles: 8 warps.
_TUNE = {
    "prep": [_cfg(4, 1), _cfg(8, 1), _cfg(8, 2)],
    "fwd": [_cfg(4, 2, BV=32), _cfg(8, 2, BV=64), _cfg(4, 2, BV=64), _cfg(8, 1, BV=32)],
    "bwd_state": [_cfg(4, 1), _cfg(8, 1), _cfg(8, 2)],
    "bwd_intra": [_cfg(8, 1), _cfg(8, 2), _cfg(4, 1)],
}
# CPU interpreter (tests): any config computes the same; BV = 32 gives two V blocks at V = 64.
_INTERP = {"prep": _cfg(4, 1), "fwd": _cfg(4, 1, BV=32), "bwd_state": _cfg(4, 1), "bwd_intra": _cfg(4, 1)}
_KEY = ["K", "V"]
_prep_tuned = triton.autotune(_TUNE["prep"], key=_KEY + ["STORE_T"])(_prep_kernel)
_fwd_tuned = triton.autotune(_TUNE["fwd"], key=_KEY + ["STORE_O", "STORE_STATES"])(_fwd_kernel)
_bwd_state_tuned = triton.autotune(_TUNE["bwd_state"], key=_KEY + ["BV"])(_bwd_state_kernel)
_bwd_intra_tuned = triton.autotune(_TUNE["bwd_intra"], key=_KEY)(_bwd_intra_kernel)
# Every autotuned kernel we launch, for the sm_90 compile test: name -> (kernel, its configs).
AUTOTUNED = {"prep": _prep_tuned, "fwd": _fwd_tuned, "bwd_state": _bwd_state_tuned, "bwd_intra": _bwd_intra_tuned}
_RAW = {"prep": _prep_kernel, "fwd": _fwd_kernel, "bwd_state": _bwd_state_kernel, "bwd_intra": _bwd_intra_kernel}


def _launch(kind, grid, on_gpu, *args, **constexprs):
    """Autotuned on a GPU with bf16/fp16; one fixed config otherwise (interpreter tests, fp32 on a GPU)."""
    if on_gpu:
        AUTOTUNED[kind][grid](*args, **constexprs)
    else:
        c = _INTERP[kind]
        _RAW[kind][grid](*args, **constexprs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _state_bv(N, H, V, device):
    """V block of the backward state kernel: 32 when N * H * V / 64 programs would leave SMs idle, else 64."""
    if device.type != "cuda":
        return min(32, V)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return 32 if N * H * max(V // 64, 1) < sms else min(64, V)


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
        f32 = dict(device=q.device, dtype=torch.float32)
        o = torch.zeros_like(v)  # rows outside every sample stay 0
        final = torch.empty(N, H, K, V, **f32) if output_final_state else o
        h0c = h0.contiguous().float() if h0 is not None else o
        if len(chunks):
            w, up = torch.empty(T, H, K, **f32), torch.empty(T, H, V, **f32)
            _launch("prep", (len(chunks), H), on_gpu, k, v, g, beta, w, up, w, chunks, H, K=K, V=V, BT=CHUNK,
                    STORE_T=False, DOT_PREC=prec)
            _launch("fwd", lambda meta: (V // meta["BV"], N, H), on_gpu, q, k, g, w, up, o, h0c, final, o, o,
                    cu_seqlens, first, scale, H, K=K, V=V, BT=CHUNK, HAS_H0=h0 is not None, STORE_O=True,
                    STORE_FINAL=output_final_state, STORE_STATES=False, DOT_PREC=prec)
        elif output_final_state:
            final = h0c.clone() if h0 is not None else torch.zeros(N, H, K, V, **f32)
        ctx.save_for_backward(q, k, v, g, beta, h0c if h0 is not None else None, cu_seqlens, chunks, first)
        ctx.args = (scale, h0 is not None, N)
        return o[None], (final if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, cu_seqlens, chunks, first = ctx.saved_tensors
        scale, has_h0, N = ctx.args
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
            # recompute: WY factors and T, then the state at every chunk start and U (transient, this layer only)
            w, up = torch.empty(T, H, K, **f32), torch.empty(T, H, V, **f32)
            tm = torch.empty(n_chunks, H, CHUNK, CHUNK, **f32)
            _launch("prep", (n_chunks, H), on_gpu, k, v, g, beta, w, up, tm, chunks, H, K=K, V=V, BT=CHUNK,
                    STORE_T=True, DOT_PREC=prec)
            hbuf = torch.empty(n_chunks, H, K, V, **f32)
            ubuf = torch.empty(T, H, V, **f32)
            h0c = h0 if h0 is not None else w
            _launch("fwd", lambda meta: (V // meta["BV"], N, H), on_gpu, q, k, g, w, up, v, h0c, w, hbuf, ubuf,
                    cu_seqlens, first, scale, H, K=K, V=V, BT=CHUNK, HAS_H0=has_h0, STORE_O=False,
                    STORE_FINAL=False, STORE_STATES=True, DOT_PREC=prec)
            BV = _state_bv(N, H, V, q.device)
            NV = V // BV
            du = torch.empty(T, H, V, **f32)
            dqi, dw, dkd = (torch.zeros(NV, T, H, K, **f32) for _ in range(3))
            dbc = torch.empty(n_chunks, H, NV, **f32)
            dht_c = dht.float().contiguous() if dht is not None else dh0
            _launch("bwd_state", (NV, N, H), on_gpu, q, k, g, w, ubuf, hbuf, do, dht_c, dh0, du, dqi, dw, dkd, dbc,
                    cu_seqlens, first, scale, T, H, K=K, V=V, BT=CHUNK, BV=BV, HAS_DHT=dht is not None,
                    DOT_PREC=prec)
            _launch("bwd_intra", (n_chunks, H), on_gpu, q, k, v, g, beta, tm, ubuf, do, du, dqi, dw, dkd, dbc, dq,
                    dk, dv, dg, dbeta, chunks, scale, T, H, NV, K=K, V=V, BT=CHUNK, DOT_PREC=prec)
        g_dtype, beta_dtype, h0_dtype = ctx.dtypes
        return (dq[None], dk[None], dv[None], dg[None].to(g_dtype), dbeta[None].to(beta_dtype), None,
                dh0.to(h0_dtype) if has_h0 else None, None, None, None)


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
