"""Benchmark the Triton gated delta rule against the torch chunked path (and flash-linear-attention) on a GPU.

    python sft_kernels/bench_gdn.py

1. Correctness: bf16 forward and gradients (q, k, v, g, beta) vs the float64 token-by-token recurrence on a small
   ragged pack at K = V = 128.
2. Speed: forward and forward+backward on 2k / 8k / 16k-token packs of a few samples each, for the linear-attention
   head shapes of Qwen3.5-0.8B (16 value heads of 128) and Qwen3.5/3.8-27B (48 value heads of 128; q/k repeated to
   them, as the model calls it). Ours vs chunk_gated_delta_rule_torch (fp32 math) and vs fla's
   chunk_gated_delta_rule when `fla` is importable. Milliseconds, median of CUDA-event timings.
The first call of each shape autotunes our kernels (compiles included); the whole script takes about 1-2 minutes.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from sft_kernels.bench_attention import time_ms  # noqa: E402
from sft_kernels.gated_delta_rule import (AUTOTUNED, chunk_gated_delta_rule_torch,  # noqa: E402
                                          chunk_gated_delta_rule_triton, gated_delta_rule_reference)

SHAPES = [("Qwen3.5-0.8B", 16), ("Qwen3.5-27B", 48)]  # (name, value heads); K = V = 128
D = 128
PACKS = {"2k": [700, 900, 448], "8k": [3000, 2500, 2692], "16k": [6000, 5000, 5384]}  # several samples each


def make(lens, H, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    T = sum(lens)
    q = F.normalize(torch.randn(1, T, H, D, device="cuda", generator=g), dim=-1).to(dtype)
    k = F.normalize(torch.randn(1, T, H, D, device="cuda", generator=g), dim=-1).to(dtype)
    v = torch.randn(1, T, H, D, device="cuda", generator=g).to(dtype)
    gate = F.logsigmoid(torch.randn(1, T, H, device="cuda", generator=g) + 3)  # log decay, like the model's
    beta = torch.rand(1, T, H, device="cuda", generator=g)
    do = torch.randn(1, T, H, D, device="cuda", generator=g).to(dtype)
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device="cuda")
    return (q, k, v, gate, beta), do, cu


def grads(fn, inputs, do, cu):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    o, _ = fn(*xs, cu_seqlens=cu)
    return [o.detach(), *torch.autograd.grad(o, xs, do.to(o.dtype))]


def check_correctness():
    """bf16 kernels vs the float64 recurrence on the same (bf16-rounded) inputs: relative max error per tensor."""
    lens = [1, 63, 64, 65, 300]
    inputs, do, cu = make(lens, 4, seed=0)
    exact = grads(gated_delta_rule_reference, [x.double() for x in inputs], do.double(), cu)
    ours = grads(chunk_gated_delta_rule_triton, inputs, do, cu)
    ok, parts = True, []
    for name, a, e in zip(["o", "dq", "dk", "dv", "dg", "dbeta"], ours, exact):
        rel = ((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
        ok &= rel <= 2e-2  # bf16 inputs to the matmuls: ~3 significant digits
        parts.append(f"{name} {rel:.1e}")
    print(f"correctness bf16 K=V={D}: {'PASS' if ok else 'FAIL'}  max |err| / max |exact| vs fp64: " + ", ".join(parts))
    return ok


def fla_fn():
    """flash-linear-attention's chunk_gated_delta_rule with our call shape, or None when it is not installed."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla
    except Exception:  # not installed, or built for another torch/triton
        return None

    def call(q, k, v, g, beta, cu_seqlens=None):
        return fla(q, k, v, g, beta, cu_seqlens=cu_seqlens.long())
    return call


def bench(fn, inputs, do, cu, runs):
    xs = [x.detach().clone().requires_grad_() for x in inputs]

    def fwd():
        with torch.no_grad():
            fn(*inputs, cu_seqlens=cu)

    def fwd_bwd():
        o, _ = fn(*xs, cu_seqlens=cu)
        torch.autograd.grad(o, xs, do.to(o.dtype))
    return time_ms(fwd, runs=runs), time_ms(fwd_bwd, runs=runs)


def main():
    if not torch.cuda.is_available():
        print("bench_gdn.py needs a CUDA GPU (the CPU tests are tests/test_gated_delta_rule.py); nothing to do.")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}\n")
    ok = check_correctness()
    fla = fla_fn()
    print(f"flash-linear-attention: {'found' if fla else 'not installed'}\n")
    print("| shape | pack | ours fwd ms | torch fwd | x | fla fwd | ours fwd+bwd ms | torch fwd+bwd | x "
          "| fla fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, H in SHAPES:
        for pack, lens in PACKS.items():
            inputs, do, cu = make(lens, H, seed=1)
            f, fb = bench(chunk_gated_delta_rule_triton, inputs, do, cu, runs=10)
            tf, tfb = bench(chunk_gated_delta_rule_torch, inputs, do, cu, runs=3)
            lf, lfb = bench(fla, inputs, do, cu, runs=10) if fla else (float("nan"), float("nan"))
            print(f"| {name} H={H} | {pack} ({len(lens)} samples) | {f:.2f} | {tf:.2f} | {tf / f:.1f} | {lf:.2f} | "
                  f"{fb:.2f} | {tfb:.2f} | {tfb / fb:.1f} | {lfb:.2f} |", flush=True)
            del inputs, do
            torch.cuda.empty_cache()
    print("\nautotuned configs, by key:")
    for name, tuner in AUTOTUNED.items():
        for key, cfg in tuner.cache.items():
            print(f"  {name} {key}: {cfg}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
