"""The gated delta rule: torch chunked form and Triton kernels == the float64 token-by-token recurrence."""
import pytest
import torch
import torch.nn.functional as F

from sft_kernels.gated_delta_rule import (chunk_gated_delta_rule, chunk_gated_delta_rule_torch,
                                          chunk_gated_delta_rule_triton, gated_delta_rule_reference)

LENS = [1, 63, 64, 65, 150]  # crosses every chunk-boundary case of CHUNK = 64


def make_inputs(lens, H, K, V, seed=0, with_state=False, extra=0):
    """Packed inputs like the model's: L2-normalised q/k, beta in (0, 1), g = log decay < 0 (float64)."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens) + extra
    q = F.normalize(torch.randn(1, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(1, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(1, T, H, V, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen, dtype=torch.float64) + 2)  # decays around e^-0.13
    beta = torch.rand(1, T, H, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32)
    h0 = torch.randn(len(lens), H, K, V, generator=gen, dtype=torch.float64) * 0.3 if with_state else None
    do = torch.randn(1, T, H, V, generator=gen, dtype=torch.float64)
    dh = torch.randn(len(lens), H, K, V, generator=gen, dtype=torch.float64)
    return (q, k, v, g, beta), h0, cu, do, dh


def run(fn, inputs, h0, cu, do, dh, dtype):
    """Outputs, final state and the gradients of q, k, v, g, beta (and h0) through o and the final state."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    h = h0.detach().clone().requires_grad_() if h0 is not None else None  # the state stays fp32/float64
    if h is not None and dtype != torch.float64:
        h = h0.detach().float().requires_grad_()
    o, final = fn(*xs, initial_state=h, output_final_state=True, cu_seqlens=cu)
    loss = (o.double() * do).sum() + (final.double() * dh).sum()
    grads = torch.autograd.grad(loss, xs + ([h] if h is not None else []))
    return [o.detach(), final.detach(), *grads]


NAMES = ["o", "final", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


def assert_close(ours, exact, atol, rtol=0.0):
    for name, a, e in zip(NAMES, ours, exact):
        err = (a.double() - e).abs().max().item()
        assert torch.allclose(a.double(), e, atol=atol, rtol=rtol), f"{name}: max |err| {err:.3e}"


@pytest.mark.parametrize("with_state", [False, True])
def test_torch_chunked_equals_recurrence_float64(with_state):
    inputs, h0, cu, do, dh = make_inputs(LENS, H=2, K=16, V=8, with_state=with_state)
    exact = run(gated_delta_rule_reference, inputs, h0, cu, do, dh, torch.float64)
    ours = run(chunk_gated_delta_rule_torch, inputs, h0, cu, do, dh, torch.float64)
    assert_close(ours, exact, atol=1e-10)


def test_torch_chunked_fp32_and_dtypes():
    inputs, h0, cu, do, dh = make_inputs(LENS, H=2, K=16, V=8, with_state=True)
    exact = run(gated_delta_rule_reference, inputs, h0, cu, do, dh, torch.float64)
    ours = run(chunk_gated_delta_rule_torch, inputs, h0, cu, do, dh, torch.float32)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert_close(ours, exact, atol=2e-4, rtol=1e-4)
    o, final = chunk_gated_delta_rule(*(x.to(torch.bfloat16) for x in inputs), cu_seqlens=cu)
    assert o.dtype == torch.bfloat16 and final is None


def test_state_carries_across_calls_and_defaults():
    """One sample run in two calls (final state -> initial state) == one call; cu_seqlens=None == one sample."""
    inputs, _, _, _, _ = make_inputs([130], H=2, K=16, V=8)
    whole, final = chunk_gated_delta_rule_torch(*inputs, output_final_state=True)
    cut = 70
    first, mid = chunk_gated_delta_rule_torch(*(x[:, :cut] for x in inputs), output_final_state=True)
    second, final2 = chunk_gated_delta_rule_torch(*(x[:, cut:] for x in inputs), initial_state=mid,
                                                  output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(final2, final, atol=1e-12, rtol=0)
    ref, _ = gated_delta_rule_reference(*inputs, scale=0.5, cu_seqlens=torch.tensor([0, 130], dtype=torch.int32))
    torch.testing.assert_close(chunk_gated_delta_rule_torch(*inputs, scale=0.5)[0], ref, atol=1e-12, rtol=0)


def test_rows_outside_samples_and_errors():
    inputs, _, cu, _, _ = make_inputs([5, 70], H=1, K=8, V=8, extra=3)
    o, _ = chunk_gated_delta_rule_torch(*inputs, cu_seqlens=cu)
    ref, _ = gated_delta_rule_reference(*inputs, cu_seqlens=cu)
    assert o[:, -3:].abs().max() == 0
    torch.testing.assert_close(o, ref, atol=1e-12, rtol=0)
    q, k, v, g, beta = inputs
    with pytest.raises(ValueError, match="must be"):
        chunk_gated_delta_rule_torch(q[0], k, v, g, beta)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=torch.zeros(1, 1, 8, 8), cu_seqlens=cu)


@pytest.mark.parametrize("dtype,K,V,atol", [(torch.float32, 32, 32, 1e-4), (torch.float32, 32, 64, 1e-4),
                                            (torch.float16, 32, 32, 3e-2)])
def test_triton_equals_recurrence(dtype, K, V, atol):
    """The Triton kernels (interpreter on CPU) == float64 recurrence: o, final state, grads of q, k, v, g, beta, h0."""
    with_state = V == 64  # one run with initial state (and two V blocks in the state kernels)
    inputs, h0, cu, do, dh = make_inputs(LENS, H=2, K=K, V=V, with_state=with_state)
    exact = run(gated_delta_rule_reference, inputs, h0, cu, do, dh, torch.float64)
    ours = run(chunk_gated_delta_rule_triton, inputs, h0, cu, do, dh, dtype)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    assert_close(ours, exact, atol=atol, rtol=atol)
