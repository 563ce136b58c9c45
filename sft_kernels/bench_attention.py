"""Benchmark the Triton varlen attention against PyTorch SDPA (flash backend) on an H100/H200-class GPU.

    python sft_kernels/bench_attention.py

1. Correctness: bf16 forward and gradients vs a float64 reference on a small ragged batch.
2. Speed: forward and forward+backward, causal, 16k tokens packed as 8 x 2k, 2 x 8k, 1 x 16k, for
   D=64 (14 / 2 heads, Qwen2.5-0.5B), D=128 (16 / 2 heads) and D=256 (8 / 2 heads, Qwen3.5-0.8B's full
   attention layers). SDPA gets the same samples as a padded
   (B, H, s, D) batch with K/V heads expanded beforehand (the expansion is not timed).
FLOPs (causal): forward 4 * s^2 * H * D / 2 per sample; backward 2.5x forward; forward+backward 3.5x.
The first call of each shape autotunes the kernels (compiles included), so the script takes 2-3 minutes.
`--head-dim 256` (repeatable) benches only the shapes of those head dims.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from sft_kernels.attention import (_dkdv_tuned, _dq_tuned, _fwd_tuned, attention_reference,  # noqa: E402
                               flash_attn_varlen_func)

TOKENS = 16384
SHAPES = [(64, 14, 2), (128, 16, 2), (256, 8, 2)]  # (D, H, Hkv)
SEQLENS = [2048, 8192, 16384]


def cu_seqlens(lens, device):
    return torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=device)


def grads(fn, q, k, v, do, cu, max_len):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, cu, cu, max_len, max_len, causal=True)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), do.to(out.dtype))]


def check_correctness(D, H, Hkv):
    """bf16 kernel vs float64 reference; it may err at most 2x what the reference itself errs in bf16."""
    lens = [1, 100, 777, 1000, 33]  # max 1000: a different autotune bucket from the 2k benchmark
    cu = cu_seqlens(lens, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    T = sum(lens)
    q, k, v, do = (torch.randn(T, h, D, device="cuda", generator=g) for h in (H, Hkv, Hkv, H))
    exact = grads(attention_reference, *(x.double() for x in (q, k, v, do)), cu, max(lens))
    bf16 = [x.bfloat16() for x in (q, k, v, do)]
    ours = grads(flash_attn_varlen_func, *bf16, cu, max(lens))
    ref = grads(attention_reference, *bf16, cu, max(lens))
    ok = True
    parts = []
    for name, a, r, e in zip(["out", "dq", "dk", "dv"], ours, ref, exact):
        err, ref_err = (a.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
        ok &= err <= 2 * ref_err + 2e-3
        parts.append(f"{name} {err:.2e} (ref {ref_err:.2e})")
    print(f"correctness D={D} H={H}/{Hkv}: {'PASS' if ok else 'FAIL'}  max |err| vs fp64: " + ", ".join(parts))
    return ok


def time_ms(fn, warmup=5, runs=30):
    """Median milliseconds of fn() over runs, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def bench_shape(D, H, Hkv, s):
    B = TOKENS // s
    lens = [s] * B
    cu = cu_seqlens(lens, "cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(B, s, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, s, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, s, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    do = torch.randn(B, s, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    fwd_flops = B * 4 * s * s * H * D / 2

    # ours: packed (T, H, D)
    qp, kp, vp, dop = (x.reshape(B * s, x.shape[2], D) for x in (q, k, v, do))
    qg, kg, vg = (x.detach().requires_grad_() for x in (qp, kp, vp))

    def ours_fwd():
        flash_attn_varlen_func(qp, kp, vp, cu, cu, s, s, causal=True)

    def ours_fwd_bwd():
        out = flash_attn_varlen_func(qg, kg, vg, cu, cu, s, s, causal=True)
        torch.autograd.grad(out, (qg, kg, vg), dop)

    # SDPA: padded (B, H, s, D) views, K/V expanded to H heads
    group = H // Hkv
    qs = q.transpose(1, 2)
    ks = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vs = v.repeat_interleave(group, dim=2).transpose(1, 2)
    dos = do.transpose(1, 2)
    qsg, ksg, vsg = (x.detach().requires_grad_() for x in (qs, ks, vs))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa_fwd():
        sdpa(qs, ks, vs, is_causal=True)

    def sdpa_fwd_bwd():
        out = sdpa(qsg, ksg, vsg, is_causal=True)
        torch.autograd.grad(out, (qsg, ksg, vsg), dos)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # fail rather than fall back to a slower backend
        with torch.no_grad():
            t_fwd, t_sdpa_fwd = time_ms(ours_fwd), time_ms(sdpa_fwd)
        t_fb, t_sdpa_fb = time_ms(ours_fwd_bwd), time_ms(sdpa_fwd_bwd)
    tflops = lambda flops, ms: flops / ms / 1e9
    return (tflops(fwd_flops, t_fwd), tflops(fwd_flops, t_sdpa_fwd),
            tflops(3.5 * fwd_flops, t_fb), tflops(3.5 * fwd_flops, t_sdpa_fb))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, action="append", choices=sorted({D for D, _, _ in SHAPES}),
                        help="bench only the shapes with this head_dim (repeatable; default: all)")
    head_dims = parser.parse_args().head_dim
    shapes = [shape for shape in SHAPES if not head_dims or shape[0] in head_dims]
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (the CPU tests are tests/test_attention.py); nothing to do.")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}\n")
    ok = all([check_correctness(D, H, Hkv) for D, H, Hkv in shapes])
    print()
    print("| D | H/Hkv | samples | fwd TFLOP/s | SDPA fwd | ratio | fwd+bwd TFLOP/s | SDPA fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for D, H, Hkv in shapes:
        for s in SEQLENS:
            f, sf, fb, sfb = bench_shape(D, H, Hkv, s)
            print(f"| {D} | {H}/{Hkv} | {TOKENS // s} x {s} | {f:.0f} | {sf:.0f} | {f / sf:.2f} | {fb:.0f} | "
                  f"{sfb:.0f} | {fb / sfb:.2f} |", flush=True)
    print("\nautotuned configs, by (head_dim, causal, seq-length bucket[, dk/dv head splits]):")
    for name, tuner in (("fwd", _fwd_tuned), ("dkdv", _dkdv_tuned), ("dq", _dq_tuned)):
        for key, cfg in tuner.cache.items():
            print(f"  {name} {key[:len(getattr(tuner, 'keys', key))]}: {cfg}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
