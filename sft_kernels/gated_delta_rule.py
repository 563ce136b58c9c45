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
    return o[None].to(v.dtype), final


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
    # Until the kernels land, CUDA runs the torch chunked form too (same results, slower).
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
