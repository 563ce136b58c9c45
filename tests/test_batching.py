"""batches.py: epochs and dp shards, pack / pad, micro-batches of fixed size or under a token budget
(data.use_dynamic_bsz) with token-balanced dp shards."""
import math

import numpy as np
import pytest
import torch

import batches
import data


def skewed_lengths(n, seed=0, max_len=4096):
    # SFT-like: many short samples, a long tail of long ones.
    rng = np.random.default_rng(seed)
    return np.minimum(max_len, (rng.lognormal(6.0, 1.0, n)).astype(np.int64) + 1)


@pytest.mark.parametrize("dp_size", [1, 2, 3, 8])
def test_balanced_shard_covers_each_sample_once(dp_size):
    lengths = skewed_lengths(500)
    batch = np.random.default_rng(1).permutation(500)[:64]
    shards = batches.balanced_shards(lengths[batch], batch, dp_size)
    assert sorted(np.concatenate(shards).tolist()) == sorted(batch.tolist())
    for s in shards:  # the batch's (shuffled) order is kept within a rank
        pos = [batch.tolist().index(i) for i in s]
        assert pos == sorted(pos)


def test_balanced_shard_balances_tokens():
    lengths = skewed_lengths(1000, seed=2)
    batch = np.arange(1000)[:256]
    dp = 4
    loads = [lengths[s].sum() for s in batches.balanced_shards(lengths[batch], batch, dp)]
    # Greedy to the least-loaded rank: the spread is at most one sample (the last one added to the fullest rank).
    assert max(loads) - min(loads) <= lengths[batch].max()
    assert max(loads) <= 1.02 * lengths[batch].sum() / dp
    contiguous = [lengths[batches.shard(batch, r, dp)].sum() for r in range(dp)]
    assert max(loads) <= max(contiguous)


def test_balanced_shard_small_batch_and_determinism():
    lengths = np.array([5, 9, 9, 1])
    batch = np.array([3, 1, 2])
    shards = batches.balanced_shards(lengths[batch], batch, 4)
    # ties broken by batch order then rank: the first 9 (index 1) goes to rank 0, the second to rank 1
    assert [s.tolist() for s in shards] == [[1], [2], [3], []]
    again = batches.balanced_shards(lengths[batch], batch, 4)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))


@pytest.mark.parametrize("max_tokens", [4096, 8192, 16384])
def test_micro_batches_respect_budget_and_cover_once(max_tokens):
    lengths = skewed_lengths(300, seed=3)
    mbs = batches.token_budget_micro_batches(lengths, max_tokens)
    assert sorted(i for mb in mbs for i in mb) == list(range(300))
    assert all(sum(lengths[i] for i in mb) <= max_tokens for mb in mbs)
    lower = math.ceil(lengths.sum() / max_tokens)  # no packing can do better
    assert len(mbs) <= math.ceil(11 / 9 * lower) + 1
    assert mbs == batches.token_budget_micro_batches(list(lengths), max_tokens)  # deterministic, list or array


def test_micro_batches_exact_cases():
    assert batches.token_budget_micro_batches([], 10) == []
    mbs = batches.token_budget_micro_batches([4, 6, 5, 5], 10)
    assert mbs == [[0, 1], [2, 3]]  # 6 then 5, 5 then 4 fills the first: 6+4 and 5+5
    assert batches.token_budget_micro_batches([10, 10, 3], 10) == [[0], [1], [2]]
    with pytest.raises(data.DataError, match="max_token_len_per_gpu"):
        batches.token_budget_micro_batches([3, 11], 10)


def test_micro_batches_pack_within_budget():
    # End to end with pack(): every packed stream has at most max_tokens tokens and all samples appear.
    rng = np.random.default_rng(4)
    samples = [(rng.integers(0, 50, n), np.ones(n, dtype=np.uint8)) for n in rng.integers(1, 40, 30)]
    lengths = [len(ids) for ids, _ in samples]
    packs = [batches.pack([samples[i] for i in mb]) for mb in batches.token_budget_micro_batches(lengths, 64)]
    assert all(p["input_ids"].numel() <= 64 for p in packs)
    assert sum(p["input_ids"].numel() for p in packs) == sum(lengths)


# --- batches, pack, pad -----------------------------------------------------------------------------

def test_epoch_batches_and_shard():
    n, bs, dp = 103, 8, 4
    epochs = [batches.epoch_batches(n, bs, seed=1, epoch=e) for e in range(3)]
    assert epochs[0].shape == (n // bs, bs)
    for order in epochs:
        per_rank = [np.concatenate([batches.shard(b, r, dp) for b in order]) for r in range(dp)]
        seen = np.concatenate(per_rank)
        # each sample at most once; only the drop-last remainder is missing
        assert len(seen) == len(set(seen.tolist())) == (n // bs) * bs
        assert all(len(batches.shard(order[0], r, dp)) == bs // dp for r in range(dp))
        assert np.array_equal(np.concatenate([batches.shard(order[0], r, dp) for r in range(dp)]), order[0])
    assert not np.array_equal(epochs[0], epochs[1])
    assert np.array_equal(epochs[1], batches.epoch_batches(n, bs, seed=1, epoch=1))
    assert not np.array_equal(epochs[0], batches.epoch_batches(n, bs, seed=2, epoch=0))
    # over an epoch with no remainder every sample is seen exactly once
    assert sorted(batches.epoch_batches(96, 8, 0, 5).reshape(-1).tolist()) == list(range(96))


def random_samples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 1000, L).astype(np.int64), (rng.random(L) < 0.6).astype(np.uint8))
            for L in lengths]


def test_pack_invariants():
    samples = random_samples([5, 1, 9, 3])
    b = batches.pack(samples)
    assert b["input_ids"].dtype == torch.int64 and b["labels"].dtype == torch.int64
    assert b["cu_seqlens"].dtype == torch.int32 and b["cu_seqlens"].tolist() == [0, 5, 6, 15, 18]
    assert b["max_seqlen"] == 9 and isinstance(b["max_seqlen"], int)
    cu = b["cu_seqlens"].tolist()
    for i, (ids, mask) in enumerate(samples):
        s, e = cu[i], cu[i + 1]
        assert b["input_ids"][s:e].tolist() == ids.tolist()
        assert b["position_ids"][s:e].tolist() == list(range(e - s))
        labels = b["labels"][s:e].tolist()
        assert labels[-1] == -100  # never a target in the next sample
        assert labels[:-1] == [int(t) if m else -100 for t, m in zip(ids[1:], mask[1:])]


def test_pad_invariants_and_pad_equals_pack():
    samples = random_samples([4, 7, 2], seed=1)
    b, p = batches.pad(samples, pad_id=99), batches.pack(samples)
    L = 7
    assert b["input_ids"].shape == (3 * L,) and b["max_seqlen"] == L
    assert b["cu_seqlens"].tolist() == [0, 7, 14, 21] and b["cu_seqlens"].dtype == torch.int32
    assert b["position_ids"].tolist() == list(range(L)) * 3
    for i, (ids, _) in enumerate(samples):
        row, lab = b["input_ids"][i * L:(i + 1) * L], b["labels"][i * L:(i + 1) * L]
        assert row[:len(ids)].tolist() == ids.tolist() and (row[len(ids):] == 99).all()
        assert (lab[len(ids) - 1:] == -100).all()
        s = p["cu_seqlens"][i]
        assert lab[:len(ids)].tolist() == p["labels"][s:s + len(ids)].tolist()


def test_micro_batches_need_no_collective():
    # every rank's count is computed locally: all ranks agree on the number of micro-batches, and
    # the ranks' samples together are the batch, for fixed sizes (dividing or not) and token budgets
    lengths = np.random.default_rng(0).integers(1, 60, 40)
    samples = [(np.arange(n), np.ones(n, dtype=np.uint8)) for n in lengths]
    batch = np.random.default_rng(1).permutation(40)[:24]
    for kw in (dict(micro_batch_size=3), dict(micro_batch_size=4, packed=False), dict(max_tokens=64),
               dict(micro_batch_size=2, max_tokens=None)):
        for dp_size in (1, 3, 5):
            out = [batches.micro_batches(samples, batch, dp_rank=r, dp_size=dp_size, **kw)
                   for r in range(dp_size)]
            assert len({len(micro) for micro, _ in out}) == 1
            seen = sorted(len(ids) for _, mine in out for ids, _ in mine)
            assert seen == sorted(lengths[batch].tolist())
            for micro, mine in out:  # padding micro-batches train nothing
                assert sum(int((m["labels"] != -100).sum()) for m in micro) == sum(len(i) - 1 for i, _ in mine)


def test_sp_slice_pads_with_own_segment():
    batch = dict(input_ids=torch.arange(5), position_ids=torch.tensor([0, 1, 2, 0, 1]),
                 labels=torch.tensor([1, 2, -100, 4, -100]), turns=torch.tensor([0, 0, -1, 1, -1]), cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32),
                 max_seqlen=3)
    parts = [batches.sp_slice(batch, r, 4, pad_id=99) for r in range(4)]
    assert all(p["input_ids"].numel() == 2 for p in parts)
    assert parts[0]["cu_seqlens"].tolist() == [0, 3, 5, 8]
    assert torch.cat([p["input_ids"] for p in parts]).tolist() == [0, 1, 2, 3, 4, 99, 99, 99]
    assert torch.cat([p["labels"] for p in parts]).tolist()[5:] == [-100] * 3
    assert torch.cat([p["turns"] for p in parts]).tolist() == [0, 0, -1, 1, -1, -1, -1, -1]
    assert torch.cat([p["position_ids"] for p in parts]).tolist() == [0, 1, 2, 0, 1, 0, 1, 2]


def test_schedule_resumes_where_it_left_off():
    # every step of 3 epochs once, in order; a schedule started from any step's resume point goes on
    # exactly as the uninterrupted one
    full = list(batches.schedule(20, 8, seed=3, epochs=3))
    assert [e for e, _, _ in full] == [0, 0, 1, 1, 2, 2]
    for i, (_, _, after) in enumerate(full[:-1]):
        rest = list(batches.schedule(20, 8, 3, 3, *after))
        assert len(rest) == len(full) - i - 1
        assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(rest, full[i + 1:]))
    assert full[-1][2] == (3, 0)


def turn_samples(n, seed=0):
    """Samples as data.py makes them: each a few trained turns (runs of mask 1, turn k), some with tool calls."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pieces, k = [], 0
        for _ in range(rng.integers(1, 4)):
            prompt, reply = int(rng.integers(1, 6)), int(rng.integers(1, 6))
            pieces += [(prompt, 0, -1), (reply, 1, k)]
            k += 1
        ids = rng.integers(0, 1000, sum(L for L, _, _ in pieces))
        mask = np.concatenate([np.full(L, m, dtype=np.uint8) for L, m, _ in pieces])
        turn = np.concatenate([np.full(L, t, dtype=np.int32) for L, _, t in pieces])
        out.append((ids, mask, turn, (rng.random(k) < 0.5).astype(np.uint8)))
    return out


def test_turns_are_global_and_the_same_in_every_layout():
    """turns[t] = the global id of the turn of the target labels[t]: sample j's turns follow the turns of the
    samples before it in the global batch. Every layout (dp, sp, packed, padded, micro-batch size, token
    budget) holds the same (turn, target) pairs over all its ranks, so per-turn sums over ranks agree."""
    samples = turn_samples(30)
    batch = np.random.default_rng(2).permutation(30)[:20]
    first = np.cumsum([0] + [len(samples[i][3]) for i in batch])
    expect = []
    for j, i in enumerate(batch):
        ids, mask, turn, _ = samples[i]
        expect += [(int(first[j] + turn[t]), int(ids[t])) for t in range(1, len(ids)) if mask[t]]
    assert len({t for t, _ in expect}) == first[-1]  # every turn has a trained target here
    for kw in (dict(micro_batch_size=3), dict(micro_batch_size=1, packed=False), dict(micro_batch_size=4, sp_size=2),
               dict(max_tokens=40), dict(max_tokens=60, sp_size=3)):
        for dp_size in (1, 2, 3):
            sp = kw.get("sp_size", 1)
            got = []
            for r in range(dp_size):
                for sp_rank in range(sp):
                    micro, _ = batches.micro_batches(samples, batch, dp_rank=r, dp_size=dp_size, sp_rank=sp_rank,
                                                     **{"packed": True, **kw})
                    for b in micro:
                        keep = b["turns"] >= 0
                        assert (b["labels"][keep] != -100).all()
                        got += list(zip(b["turns"][keep].tolist(), b["labels"][keep].tolist()))
            assert sorted(got) == sorted(expect), (kw, dp_size)
