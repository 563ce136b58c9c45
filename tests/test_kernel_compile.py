"""Every Triton kernel we ship compiles for the H200 (sm_90) at every autotune config, without a GPU.

A config that spills registers to local memory, or asks for more shared memory than a Hopper block may have
(227 KiB of the SM's 228), shows up on the GPU only as a slow kernel or as an OutOfResources that the autotuner
quietly drops. Here Triton's own compiler builds each (kernel, config, shape) for GPUTarget("cuda", 90, 32) --
LLVM to PTX, then the ptxas shipped inside the triton wheel to a cubin -- and the test reads the spill counts from
ptxas's log and the shared memory from the compiled kernel's metadata.

conftest sets TRITON_INTERPRET=1, which turns @triton.jit functions into interpreted ones that cannot be compiled,
so the compiles run in a subprocess without it (`python tests/test_kernel_compile.py FAMILY` prints one JSON line
per compile), in a pool of 2 processes. Launch arguments are those the wrappers pass, with triton's MockTensor for
tensors, and go through the same argument binder as a launch, so the specialisation (16-divisible pointers and
strides, integers equal to 1) is what the GPU would compile.

Cost: about 140 compiles (attention: 89, gated delta rule: 48, bf16), 2 CPU-minutes, so about a minute of wall time
on two free cores (3.5 minutes on two cores shared with other jobs).

Adding a kernel: write a function returning its cases (label, jit function, args, constexprs + num_warps /
num_stages) and add it to FAMILIES.
"""
import contextlib
import importlib
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMEM_LIMIT = 227 * 1024  # max dynamic shared memory per block on H100/H200 (228 KiB per SM, 1 KiB reserved)
HEAD_DIMS = (64, 128, 256)  # every head_dim class of sft_kernels/attention.py has its own configs
DTYPES = ("bfloat16",)  # what the trainer runs on a GPU; add "float16" to check fp16 too (same tiles, twice the time)
# The delta rule's head count H is a runtime int, specialised only on divisibility by 16: 16 stands for every Qwen3.5
# (0.8B's 16 value heads, 27B's 48); add 8 for Ulysses head shards (16 / 2, 48 / 2 = 24, ...): at K = V = 128 it
# compiled to the same registers and shared memory as 16 for every case, so it is left out (twice the time).
GDN_HEADS = (16,)


class Missing(Exception):
    """A family whose module or kernels are not there (yet): its test skips with this message."""


def launch(cfg):
    """A triton.Config as launch keywords."""
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def name(cfg):
    return " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" warps={cfg.num_warps} stages={cfg.num_stages}"


# --------------------------------------------------------------------------------------------------------------------
# The kernels, each family a function returning [(label, jit function, args, keywords)]; runs without the interpreter


def attention_cases():
    import torch
    from triton.runtime.jit import MockTensor

    from sft_kernels import attention as A
    H, Hkv, T = 8, 2, 16384  # Qwen3.5-0.8B's full-attention heads; T_Q is not specialised on
    i32, f32 = MockTensor(torch.int32), MockTensor(torch.float32)
    cases = []
    for D in HEAD_DIMS:
        for dtype in DTYPES:
            x = MockTensor(getattr(torch, dtype))
            strides = (H * D, D, Hkv * D, D)  # stride_qt, stride_qh, stride_kt, stride_kh of contiguous (T, H, D)
            cases.append((f"bwd_preprocess D={D} {dtype}", A._bwd_preprocess, (x, x, f32, H * D, D, T),
                          dict(HEAD_DIM=D, BLOCK=128)))
            for causal in (True, False):
                tag = f"D={D} {dtype} {'causal' if causal else 'full'}"
                common = dict(HEAD_DIM=D, CAUSAL=causal, DOT_PREC="tf32")
                for cfg in A._candidates("fwd", D):
                    args = (x, x, x, x, f32, i32, i32, 0.1, *strides, T, H // Hkv, 4096)
                    cases.append((f"fwd {tag} {name(cfg)}", A._fwd_kernel, args, {**common, **launch(cfg)}))
                for cfg in A._candidates("dq", D):
                    args = (x, x, x, x, x, f32, f32, i32, i32, 0.1, 0.1, *strides, T, H // Hkv, 4096)
                    cases.append((f"dq {tag} {name(cfg)}", A._bwd_dq_kernel, args, {**common, **launch(cfg)}))
                for cfg in A._candidates("dkdv", D):
                    # head splits > 1 write fp32 partial sums (what a GQA model with few kv heads gets on an H200)
                    for splits, out in ((1, x), (2, f32)):
                        args = (x, x, x, x, out, out, f32, f32, i32, i32, 0.1, 0.1, *strides, T, H // Hkv, 4096,
                                splits, T * Hkv * D)
                        cases.append((f"dkdv {tag} splits={splits} {name(cfg)}", A._bwd_dkdv_kernel, args,
                                      {**common, **launch(cfg)}))
    return cases


def lm_head_loss_cases():
    import torch
    import triton
    from triton.runtime.jit import MockTensor

    from sft_kernels import lm_head_loss as L
    V = 248320  # Qwen3.5's vocab (Qwen2.5/3: 151,936); the launch below is the one _ce_rows_triton makes on CUDA
    cases = []
    for dtype in ("bfloat16", "float32"):  # the compute dtype: autocast's, or the hidden states' own
        # (training: gradients; evaluation: losses only, or with per-row argmax-correctness into an int8 buffer)
        for write_grad, write_correct in ((True, False), (False, False), (False, True)):
            correct = MockTensor(torch.int8 if write_correct else torch.float32)  # unused: the losses buffer
            args = (MockTensor(getattr(torch, dtype)), V, MockTensor(torch.int64), MockTensor(torch.float32), correct, V)
            cases.append((f"ce_rows {dtype} write_grad={write_grad} write_correct={write_correct}", L._ce_rows_kernel,
                          args, dict(WRITE_GRAD=write_grad, WRITE_CORRECT=write_correct,
                                     BLOCK=min(triton.next_power_of_2(V), 4096), num_warps=8)))
    return cases


def gated_delta_rule_cases():
    """The chunked gated delta rule: its seven kernels at every config and every constexpr combination launched."""
    try:
        gdr = importlib.import_module("sft_kernels.gated_delta_rule")
    except ModuleNotFoundError as e:
        raise Missing(f"sft_kernels/gated_delta_rule.py is not there ({e})")
    import torch
    from triton.runtime.jit import MockTensor
    kinds = ("prep", "fwd", "out", "bwd_du", "bwd_state", "bwd_dqk", "bwd_wy")
    tuned, raw = getattr(gdr, "AUTOTUNED", {}), getattr(gdr, "_RAW", {})
    missing = [k for k in kinds if k not in tuned or k not in raw]
    if missing:
        raise Missing(f"sft_kernels/gated_delta_rule.py has no AUTOTUNED/_RAW kernels named {missing}")
    assert set(tuned) == set(kinds), f"gated_delta_rule.AUTOTUNED is {sorted(tuned)}: add the new kernels' launches"
    K, V = 128, 128  # Qwen3.5's linear-attention head dims; every config's BV fits V, so the autotuner prunes none
    scale = K ** -0.5
    f32, i32 = MockTensor(torch.float32), MockTensor(torch.int32)
    cases = []
    for dtype, H in itertools.product(DTYPES, GDN_HEADS):
        x = MockTensor(getattr(torch, dtype))  # q, k, v and what the wrapper allocates like them (W, U, states, dq..)
        # g is fp32 (the model computes it so); beta arrives in the model's activation dtype (the sigmoid of a bf16
        # projection), fp32 in flash-linear-attention's convention: both, for the two kernels that read it
        betas = {f"beta={dt}": MockTensor(getattr(torch, dt)) for dt in dict.fromkeys((dtype, "float32"))}
        base = dict(K=K, V=V, BT=gdr.CHUNK, DOT_PREC="tf32")
        # (kind, tag, args, constexprs beyond the config's): the launches of _states and _ChunkGatedDeltaRule
        launches = []
        for tag, beta in betas.items():
            # without STORE_T (forward) the T pointer is W, a dummy; with it (backward) T is (n_chunks, H, 64, 64) fp32
            for store_t, tm in ((False, x), (True, f32)):
                launches.append(("prep", f"{tag} STORE_T={store_t}", (x, x, f32, beta, x, x, tm, i32, H),
                                 dict(STORE_T=store_t)))
            launches.append(("bwd_wy", tag, (x, x, f32, beta, f32, x, x, x, x, f32, f32, i32, H), {}))
        # the forward launches every (initial_state, output_final_state) pair, the backward's recompute (h0, none);
        # an absent h0 or final state passes W in its place
        for has_h0 in (False, True):
            for store_final in (False, True):
                args = (x, f32, x, x, f32 if has_h0 else x, f32 if store_final else x, x, i32, i32, H)
                launches.append(("fwd", f"HAS_H0={has_h0} STORE_FINAL={store_final}", args,
                                 dict(HAS_H0=has_h0, STORE_FINAL=store_final)))
        launches.append(("out", "", (x, x, f32, x, x, x, i32, scale, H), {}))
        launches.append(("bwd_du", "", (x, x, f32, x, x, i32, scale, H), {}))
        # BV is the host's choice (_state_bv): 32 or 64 at V = 128; dht given or not
        for bv in (32, 64):
            for has_dht in (False, True):
                args = (x, x, f32, x, x, f32, f32, x, x, i32, i32, scale, H)
                launches.append(("bwd_state", f"BV={bv} HAS_DHT={has_dht}", args, dict(BV=bv, HAS_DHT=has_dht)))
        launches.append(("bwd_dqk", "", (x, x, f32, x, x, x, x, x, x, f32, i32, scale, H), {}))
        for kind, tag, args, extra in launches:
            fn = raw[kind]
            for cfg in tuned[kind].configs:
                label = " ".join(s for s in (kind, dtype, f"H={H}", tag, name(cfg).strip()) if s)
                cases.append((label, fn, args, {**base, **extra, **launch(cfg)}))
    return cases


def detector_cases():
    """A config that must spill and overflow shared memory: shows that the checks below can fail."""
    import torch
    from triton.runtime.jit import MockTensor

    from sft_kernels import attention as A
    x, i32, f32 = MockTensor(torch.bfloat16), MockTensor(torch.int32), MockTensor(torch.float32)
    D = 256  # 2 stages of (128, 256) k and v tiles plus the q tile: 288 KiB; 64 x 128 scores with 8 warps spill
    args = (x, x, x, x, f32, i32, i32, 0.1, 8 * D, D, 2 * D, D, 4096, 4, 4096)
    return [("fwd D=256 BLOCK_M=64 BLOCK_N=128 warps=8 stages=2", A._fwd_kernel, args,
             dict(HEAD_DIM=D, CAUSAL=True, DOT_PREC="tf32", BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2))]


FAMILIES = {"attention": attention_cases, "lm_head_loss": lm_head_loss_cases,
            "gated_delta_rule": gated_delta_rule_cases, "detector": detector_cases}


# --------------------------------------------------------------------------------------------------------------------
# Compiling one case for sm_90 (subprocess side)


def compile_sm90(kernel, args, kwargs):
    """Compile kernel for sm_90 as a launch with these arguments would; returns registers, spilled bytes, shared."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    # the binder a launch uses: it decides which arguments are specialised (divisible by 16, equal to 1, constexpr)
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = bind(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v; this prints its log (registers, spills) to stdout
    knobs.compilation.always_compile = True  # a cache hit would not run ptxas, so there would be no log
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    log = log.getvalue()
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or not spills:
        raise RuntimeError(f"cannot read registers and spills from the ptxas log:\n{log}")
    return dict(regs=int(regs.group(1)), spills=sum(int(n) for pair in spills for n in pair),
                shared=compiled.metadata.shared)


def _compile_case(family, index):
    label, kernel, args, kwargs = FAMILIES[family]()[index]
    try:
        return dict(label=label, **compile_sm90(kernel, args, kwargs))
    except Exception as e:  # reported per case; the test fails on it
        return dict(label=label, error=f"{type(e).__name__}: {str(e)[-2000:]}")


def main(family):
    """Print one JSON line per compiled case of the family, or one {"skip": reason} line."""
    sys.path.insert(0, str(ROOT))
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature  # noqa: F401
        make_backend(GPUTarget("cuda", 90, 32))
        get_ptxas(90).path  # the wheel's own ptxas; RuntimeError when it is missing
        JITFunction._pack_args  # the launch's argument packing, which compile_sm90 reuses
        cases = FAMILIES[family]()
    except (ImportError, AttributeError, RuntimeError) as e:
        print(json.dumps({"skip": f"this Triton cannot compile for sm_90 without a GPU here: {e}"}))
        return
    except Missing as e:
        print(json.dumps({"skip": str(e)}))
        return
    if not isinstance(cases[0][1], JITFunction):
        print(json.dumps({"skip": "the kernels are not JIT functions (is TRITON_INTERPRET set?)"}))
        return
    # forked workers share this process's imports and sys.path; no CUDA is initialised, so forking is safe
    pool = ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=multiprocessing.get_context("fork"))
    with pool:
        for result in pool.map(_compile_case, [family] * len(cases), range(len(cases))):
            print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Tests (pytest side)


def compile_family(family):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # leave the user's cache alone: every case is compiled afresh anyway
        proc = subprocess.run([sys.executable, __file__, family], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
    assert proc.returncode == 0, f"compile subprocess failed:\n{proc.stderr[-4000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(results) == 1 and "skip" in results[0]:
        pytest.skip(results[0]["skip"])
    assert results, f"no compile results:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return results


def problems(result):
    if "error" in result:
        return f"does not compile: {result['error']}"
    found = []
    if result["spills"] > 0:
        found.append(f"spills {result['spills']} bytes ({result['regs']} registers)")
    if result["shared"] > SMEM_LIMIT:
        found.append(f"needs {result['shared'] / 1024:.0f} KiB of shared memory (> {SMEM_LIMIT // 1024})")
    return ", ".join(found)


@pytest.mark.parametrize("family", ["attention", "lm_head_loss", "gated_delta_rule"])
def test_every_config_compiles_for_sm90_without_spills(family):
    results = compile_family(family)
    bad = [f"{r['label']}: {problems(r)}" for r in results if problems(r)]
    assert not bad, f"{len(bad)} of {len(results)} sm_90 compiles fail:\n" + "\n".join(bad)


def test_the_checks_catch_a_spilling_oversized_config():
    (result,) = compile_family("detector")
    assert "error" not in result, result["error"]
    assert result["spills"] > 0 and result["shared"] > SMEM_LIMIT, result


if __name__ == "__main__":
    main(sys.argv[1])
