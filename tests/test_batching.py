"""Token-budget batching (data.use_dynamic_bsz): balanced dp shards and micro-batches under a token budget."""
import math

import numpy as np
import pytest

import data


def skewed_lengths(n, seed=0, max_len=4096):
    # SFT-like: many short samples, a long tail of long ones.
    rng = np.random.default_rng(seed)
    return np.minimum(max_len, (rng.lognormal(6.0, 1.0, n)).astype(np.int64) + 1)


@pytest.mark.parametrize("dp_size", [1, 2, 3, 8])
def test_balanced_shard_covers_each_sample_once(dp_size):
    lengths = skewed_lengths(500)
    batch = np.random.default_rng(1).permutation(500)[:64]
    shards = [data.balanced_shard(lengths, batch, r, dp_size) for r in range(dp_size)]
    assert sorted(np.concatenate(shards).tolist()) == sorted(batch.tolist())
    for s in shards:  # the batch's (shuffled) order is kept within a rank
        pos = [batch.tolist().index(i) for i in s]
        assert pos == sorted(pos)


def test_balanced_shard_balances_tokens():
    lengths = skewed_lengths(1000, seed=2)
    batch = np.arange(1000)[:256]
    dp = 4
    loads = [lengths[data.balanced_shard(lengths, batch, r, dp)].sum() for r in range(dp)]
    # Greedy to the least-loaded rank: the spread is at most one sample (the last one added to the fullest rank).
    assert max(loads) - min(loads) <= lengths[batch].max()
    assert max(loads) <= 1.02 * lengths[batch].sum() / dp
    contiguous = [lengths[data.shard(batch, r, dp)].sum() for r in range(dp)]
    assert max(loads) <= max(contiguous)


def test_balanced_shard_small_batch_and_determinism():
    lengths = np.array([5, 9, 9, 1])
    batch = np.array([3, 1, 2])
    shards = [data.balanced_shard(lengths, batch, r, 4) for r in range(4)]
    # ties broken by batch order then rank: the first 9 (index 1) goes to rank 0, the second to rank 1
    assert [s.tolist() for s in shards] == [[1], [2], [3], []]
    again = [data.balanced_shard(lengths, batch, r, 4) for r in reversed(range(4))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))


@pytest.mark.parametrize("max_tokens", [4096, 8192, 16384])
def test_micro_batches_respect_budget_and_cover_once(max_tokens):
    lengths = skewed_lengths(300, seed=3)
    mbs = data.token_budget_micro_batches(lengths, max_tokens)
    assert sorted(i for mb in mbs for i in mb) == list(range(300))
    assert all(sum(lengths[i] for i in mb) <= max_tokens for mb in mbs)
    lower = math.ceil(lengths.sum() / max_tokens)  # no packing can do better
    assert len(mbs) <= math.ceil(11 / 9 * lower) + 1
    assert mbs == data.token_budget_micro_batches(list(lengths), max_tokens)  # deterministic, list or array


def test_micro_batches_exact_cases():
    assert data.token_budget_micro_batches([], 10) == []
    mbs = data.token_budget_micro_batches([4, 6, 5, 5], 10)
    assert mbs == [[0, 1], [2, 3]]  # 6 then 5, 5 then 4 fills the first: 6+4 and 5+5
    assert data.token_budget_micro_batches([10, 10, 3], 10) == [[0], [1], [2]]
    with pytest.raises(data.DataError, match="max_token_len_per_gpu"):
        data.token_budget_micro_batches([3, 11], 10)


def test_micro_batches_pack_within_budget():
    # End to end with pack(): every packed stream has at most max_tokens tokens and all samples appear.
    rng = np.random.default_rng(4)
    samples = [(rng.integers(0, 50, n), np.ones(n, dtype=np.uint8)) for n in rng.integers(1, 40, 30)]
    lengths = [len(ids) for ids, _ in samples]
    packs = [data.pack([samples[i] for i in mb]) for mb in data.token_budget_micro_batches(lengths, 64)]
    assert all(p["input_ids"].numel() <= 64 for p in packs)
    assert sum(p["input_ids"].numel() for p in packs) == sum(lengths)
