"""The Triton varlen attention against the plain-torch reference computed in float64.

On a CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay small and
dtypes are fp32 / fp16 (the interpreter's bf16 dot is wrong). With CUDA the same tests run on the GPU, plus bf16
and longer sequences.
"""
import itertools

import pytest
import torch

from sft_kernels.attention import _flash_attn_varlen, attention_reference, flash_attn_varlen_func

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RAGGED = [1, 5, 17, 0, 33, 67]  # length 1, non-multiples of every block size, an empty sample, several blocks


def cu_seqlens(lens):
    return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=DEVICE)


def make_inputs(lens_q, lens_k, H, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lens), h, D, generator=g) for lens, h in ((lens_q, H), (lens_k, Hkv), (lens_k, Hkv)))
    do = torch.randn(sum(lens_q), H, D, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)]


def run(fn, q, k, v, do, lens_q, lens_k, causal, **kw):
    """Output and (dq, dk, dv) of fn on leaf copies of q, k, v."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k), causal=causal, **kw)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), do.to(out.dtype))]


def max_errors(results, exact):
    return [(r.double() - e).abs().max().item() for r, e in zip(results, exact)]


def check_against_reference(q, k, v, do, lens_q, lens_k, causal, **kw):
    """Our kernel in q.dtype vs the reference in float64; low precision may err at most twice what the reference
    itself errs when run in that dtype (plus a little), fp32 must agree to ~1e-5."""
    ours = run(_flash_attn_varlen, q, k, v, do, lens_q, lens_k, causal, **kw)
    kw.pop("dkdv_splits", None)
    exact = run(attention_reference, *(x.double() for x in (q, k, v, do)), lens_q, lens_k, causal, **kw)
    errors = max_errors(ours, exact)
    if q.dtype == torch.float32:
        bounds = [1e-5 * max(1.0, e.abs().max().item()) for e in exact]
    else:
        lowp = run(attention_reference, q, k, v, do, lens_q, lens_k, causal, **kw)
        bounds = [2 * err + 2e-3 for err in max_errors(lowp, exact)]
    for name, err, bound in zip(["out", "dq", "dk", "dv"], errors, bounds):
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} ({q.dtype}, causal={causal})"


# --------------------------------------------------------------------------------------------------------------------
# Accuracy on ragged batches (GQA ratios 1, 2, 4, 7; head_dim 16, 32, 64, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("H,Hkv,D", [(2, 2, 16), (4, 2, 32), (7, 1, 64)])
def test_ragged_batch_matches_reference(H, Hkv, D, causal, dtype):
    q, k, v, do = make_inputs(RAGGED, RAGGED, H, Hkv, D, dtype)
    check_against_reference(q, k, v, do, RAGGED, RAGGED, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_head_dim_256_matches_reference(causal, dtype):
    # Qwen3.5's full attention (0.8B: 8 / 2 heads of 256, so 4 query heads per kv head); samples shorter than RAGGED
    # keep the interpreter quick but still cover length 1, an empty sample and several blocks
    lens = [1, 17, 0, 40]
    q, k, v, do = make_inputs(lens, lens, 4, 1, 256, dtype, seed=9)
    check_against_reference(q, k, v, do, lens, lens, causal)


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_dkdv_head_splits_match_reference(splits):
    # the dk/dv kernel may split a kv head's query heads over programs (fp32 partial sums); every split is exact
    q, k, v, do = make_inputs(RAGGED, RAGGED, 4, 1, 16, torch.float32, seed=1)
    check_against_reference(q, k, v, do, RAGGED, RAGGED, True, dkdv_splits=splits)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_different_q_and_k_lengths(causal):
    # cross-attention-shaped samples; causal is bottom-right aligned, and a query that sees no key outputs zeros.
    # The offsets Lk - Lq (-15, -2, 14, 23, -17, 1, -2, -2) put the diagonal at the awkward spots of a block.
    lens_q, lens_k = [31, 40, 20, 7, 50, 40, 3, 2], [16, 38, 34, 30, 33, 41, 1, 0]
    q, k, v, do = make_inputs(lens_q, lens_k, 4, 2, 32, torch.float32, seed=2)
    check_against_reference(q, k, v, do, lens_q, lens_k, causal)


def test_scale_argument():
    q, k, v, do = make_inputs(RAGGED, RAGGED, 2, 1, 32, torch.float32, seed=3)
    check_against_reference(q, k, v, do, RAGGED, RAGGED, True, softmax_scale=0.3)


# --------------------------------------------------------------------------------------------------------------------
# Edge cases and properties


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_length_one_samples_return_their_value(causal):
    # one key: the softmax is exactly 1, so the output is v of the matching kv head and dq is 0
    lens = [1, 1, 1]
    q, k, v, do = make_inputs(lens, lens, 4, 2, 16, torch.float32, seed=4)
    out, dq, dk, dv = run(flash_attn_varlen_func, q, k, v, do, lens, lens, causal)
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(dq, torch.zeros_like(dq), rtol=0, atol=1e-5)
    torch.testing.assert_close(dv, do.view(3, 2, 2, 16).sum(2), rtol=1e-6, atol=1e-6)


def test_backward_is_deterministic():
    q, k, v, do = make_inputs(RAGGED, RAGGED, 4, 2, 32, torch.float16, seed=5)
    first = run(flash_attn_varlen_func, q, k, v, do, RAGGED, RAGGED, True)
    second = run(flash_attn_varlen_func, q, k, v, do, RAGGED, RAGGED, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_unsupported_head_dim_is_rejected():
    q, k, v, _ = make_inputs([3], [3], 2, 1, 48, torch.float32)
    with pytest.raises(ValueError, match="head_dim 48"):
        flash_attn_varlen_func(q, k, v, cu_seqlens([3]), cu_seqlens([3]), 3, 3, causal=True)


# --------------------------------------------------------------------------------------------------------------------
# GPU only: bf16 and realistic lengths


@cuda_only
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("H,Hkv,D", [(14, 2, 64), (16, 2, 128), (7, 1, 64), (8, 2, 256)])
def test_bf16_matches_reference_gpu(H, Hkv, D, causal):
    lens = [1, 100, 777, 2048, 33]
    q, k, v, do = make_inputs(lens, lens, H, Hkv, D, torch.bfloat16, seed=6)
    check_against_reference(q, k, v, do, lens, lens, causal)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_long_sequences_gpu(dtype):
    # against a float32 reference (a float64 one of 8k x 8k scores per head is needlessly slow)
    lens = [8192, 3000, 1]
    q, k, v, do = make_inputs(lens, lens, 14, 2, 64, dtype, seed=7)
    ours = run(flash_attn_varlen_func, q, k, v, do, lens, lens, True)
    exact = run(attention_reference, *(x.float() for x in (q, k, v, do)), lens, lens, True)
    lowp = run(attention_reference, q, k, v, do, lens, lens, True)
    for name, err, ref_err in zip(["out", "dq", "dk", "dv"], max_errors(ours, exact), max_errors(lowp, exact)):
        assert err <= 2 * ref_err + 2e-3, f"{name}: {err:.3g} vs reference-in-{dtype} {ref_err:.3g}"


@cuda_only
def test_backward_is_deterministic_long_gpu():
    # many programs and an automatic dk/dv head split: still bitwise reproducible
    lens = [4096, 4096, 1000]
    q, k, v, do = make_inputs(lens, lens, 14, 2, 64, torch.bfloat16, seed=8)
    first = run(flash_attn_varlen_func, q, k, v, do, lens, lens, True)
    second = run(flash_attn_varlen_func, q, k, v, do, lens, lens, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
