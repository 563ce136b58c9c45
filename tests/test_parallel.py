import pytest
import torch
import torch.distributed as dist

import parallel
from sft_kernels.attention import attention_reference
from tests_util import distributed


def _ulysses_worker(rank, world_size, H, Hkv, seed):
    """Attention through the Ulysses all-to-alls on a slice == the same rows of full attention;
    gradients w.r.t. the slice's q/k/v == the same rows of the full gradients."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 1, 9, 3]  # T = 18, a multiple of 2
    T, D = sum(lengths), 8
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    q, k, v = (torch.randn(T, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    w = torch.randn(T, H, D, generator=g, dtype=torch.float64)  # weights of a scalar loss

    def inner(q, k, v, cu_seqlens, max_seqlen):
        return attention_reference(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    (inner(*full, cu, 9) * w).sum().backward()

    Tl = T // world_size
    rows = slice(rank * Tl, (rank + 1) * Tl)
    local = [x[rows].clone().requires_grad_() for x in (q, k, v)]
    out = parallel.ulysses_attention(*local, cu, 9, inner=inner, sp_group=dist.group.WORLD, sp_size=world_size)
    (out * w[rows]).sum().backward()
    ref_out = inner(q, k, v, cu, 9)[rows]
    return [(out.detach(), ref_out)] + [(a.grad, b.grad[rows]) for a, b in zip(local, full)]


def _ulysses_cases(rank, world_size):
    # (H, Hkv): Hkv % sp == 0; Hkv = 1 < sp (K/V heads repeated); one head per rank
    return [_ulysses_worker(rank, world_size, H, Hkv, seed) for seed, (H, Hkv) in enumerate([(4, 2), (4, 1), (2, 2)])]


def test_ulysses_matches_single_process():
    for rank_result in distributed.run(_ulysses_cases, 2):  # one 2-process run for all cases
        for case in rank_result:
            for got, want in case:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_impossible_sp_sizes():
    with pytest.raises(parallel.ParallelError, match="use one of \\[1, 2, 14\\]"):
        parallel.check_sp_heads(4, 14, 2)
    with pytest.raises(parallel.ParallelError, match="must divide the number of processes"):
        parallel.check_sizes(3, 2, -1)
    parallel.check_sizes(14, 14, -1)
    parallel.check_sp_heads(14, 14, 2)
