"""The fused LM-head loss equals the unfused F.linear + F.cross_entropy, in value and in both gradients."""
import os

import pytest
import torch

from sft_kernels.lm_head_loss import default_chunk, linear_cross_entropy_reference, linear_cross_entropy_sum

# The Triton row kernel runs on CUDA, or on CPU tensors under the interpreter (conftest sets it without a GPU).
IMPLS = ["torch"] + (["triton"] if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(T=37, C=24, V=100, ignore=0.4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, C, generator=g) * 2.0  # sharp-ish softmax so the one-hot term matters
    w = torch.randn(V, C, generator=g)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < ignore] = -100
    return (h.to(DEVICE, dtype).requires_grad_(), w.to(DEVICE, dtype).requires_grad_(), labels.to(DEVICE))


def loss_and_grads(fn, h, w, labels, scale=1.0):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def assert_close(ours, ref, rtol, atol):
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [7, 16, 1000])  # boundaries inside, not dividing the rows; one chunk
def test_matches_unfused_fp32(impl, chunk):
    h, w, labels = inputs()
    ours = loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk=chunk, impl=impl), h, w, labels)
    ref = loss_and_grads(linear_cross_entropy_reference, h, w, labels)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == h.dtype and ours[2].dtype == w.dtype
    assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours[1][labels == -100] == 0).all()  # ignored rows get exactly no gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_output_scales(impl):
    h, w, labels = inputs(seed=1)
    ours = loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk=8, impl=impl), h, w, labels, scale=3.0)
    ref = loss_and_grads(linear_cross_entropy_reference, h, w, labels, scale=3.0)
    assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored(impl):
    h, w, labels = inputs(ignore=1.0)
    loss, dh, dw = loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk=8, impl=impl), h, w, labels)
    assert loss.item() == 0.0 and not dh.any() and not dw.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_close_to_fp32(impl):
    h, w, labels = inputs(T=64, C=32, V=300, dtype=torch.bfloat16, seed=2)
    ours = loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk=24, impl=impl), h, w, labels)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.bfloat16
    ref_bf16 = loss_and_grads(linear_cross_entropy_reference, h, w, labels)  # the same rounding, unfused
    assert_close(ours, ref_bf16, rtol=2e-2, atol=2e-2)
    ref_fp32 = loss_and_grads(linear_cross_entropy_reference, h.float(), w.float(), labels)
    torch.testing.assert_close(ours[0], ref_fp32[0], rtol=1e-2, atol=0.0)


def test_autocast_computes_in_autocast_dtype():
    # fp32 h and weight under bf16 autocast: logits rounded to bf16 like an autocast F.linear, grads in fp32.
    h, w, labels = inputs(seed=3)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ours = loss_and_grads(lambda *a: linear_cross_entropy_sum(*a, chunk=16), h, w, labels)
        ref = loss_and_grads(linear_cross_entropy_reference, h, w, labels)
    assert ours[1].dtype == ours[2].dtype == torch.float32
    assert_close(ours, ref, rtol=2e-2, atol=2e-2)


def test_no_grad_returns_loss_only():
    h, w, labels = inputs(seed=4)
    with torch.no_grad():
        loss = linear_cross_entropy_sum(h, w, labels, chunk=5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_cross_entropy_reference(h, w, labels).detach(), rtol=1e-5, atol=1e-5)


def test_tied_weight_gets_both_gradients():
    # Qwen2.5-0.5B ties the head to the embedding: autograd must add the head's dW to the embedding's.
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(50, 16, generator=g, requires_grad=True)
    ids, labels = torch.randint(0, 50, (20,), generator=g), torch.randint(0, 50, (20,), generator=g)
    grads = []
    for fn in (lambda h, w, y: linear_cross_entropy_sum(h, w, y, chunk=6), linear_cross_entropy_reference):
        emb.grad = None
        fn(torch.tanh(emb[ids]), emb, labels).backward()
        grads.append(emb.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_default_chunk_fits_budget():
    assert default_chunk(151936) * 151936 * 4 <= 1 << 30 and default_chunk(151936) % 64 == 0
    assert default_chunk(96) == 8192


@pytest.mark.parametrize("impl", IMPLS)
def test_correct_is_first_argmax_including_ties(impl):
    """return_correct: labels[t] is torch.argmax of the fp32 logits, which picks the FIRST maximal index
    (greedy decoding's choice). Ties are built in: rows of w repeated, so some rows' logits are equal maxima
    at two indices, with the label on either one."""
    T, C, V = 40, 16, 70
    g = torch.Generator().manual_seed(5)
    h = torch.randn(T, C, generator=g)
    w = torch.randn(V, C, generator=g)
    w[50], w[63] = w[7], w[40]  # exact duplicate rows: tied logits at 7/50 and 40/63 (63 spans another block)
    # Rows whose maximum is at a duplicated index: push h toward that row so it wins.
    for t, j in enumerate([7, 50, 40, 63, 7, 50, 40, 63]):
        h[t] = w[j] * 3.0
    logits = h @ w.T
    labels = logits.argmax(-1).clone()
    labels[1], labels[3] = 50, 63  # tie resolved to the lower index: NOT correct
    labels[0], labels[2] = 7, 40  # the first of the tied maxima: correct
    labels[10:20] = torch.randint(0, V, (10,), generator=g)  # mostly wrong
    labels[20:25] = -100
    with torch.no_grad():
        loss, correct = linear_cross_entropy_sum(h, w, labels, chunk=9, impl=impl, return_correct=True)
    expect = (logits.argmax(-1) == labels) & (labels != -100)
    assert correct.dtype == torch.bool and torch.equal(correct, expect)
    assert correct[0] and correct[2] and not correct[1] and not correct[3] and not correct[20:25].any()
    assert 0 < int(expect.sum()) < T - 5
    torch.testing.assert_close(loss, linear_cross_entropy_reference(h, w, labels), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="torch.no_grad"):
        linear_cross_entropy_sum(h.requires_grad_(), w, labels, return_correct=True)
