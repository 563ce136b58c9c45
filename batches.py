"""Samples -> this rank's micro-batches for one optimizer step, ready for the forward.

The one place the batching policy lives: the global batches of each epoch (a seeded shuffle), this
dp rank's share of one (contiguous, or token-balanced with data.use_dynamic_bsz), cut into micro-batches
(micro_batch_size samples, or first-fit up to a token budget), collated (packed into one varlen stream,
or padded to the longest sample in the same layout), sliced for Ulysses (sp_size ranks hold contiguous
slices of one stream) and moved to the device. train.py asks once per step: micro_batches(...).

A sample is (ids, mask, turn, calls) as data.py makes it, or just (ids, mask) (no turns to measure).
A micro-batch is {input_ids, position_ids, labels, turns (T,), cu_seqlens (B+1,) int32, max_seqlen}; turns[t] is
the assistant turn the target labels[t] belongs to, numbered across the whole global batch (the first turn
of its k-th sample is the number of turns in samples 0..k-1, so every rank, dp or sp, numbers it alike:
the validation metrics add up per turn over ranks), -1 where no turn is trained.
"""
import functools
import heapq

import numpy as np
import torch

import data


# --------------------------------------------------------------------------- which samples

def schedule(n, batch_size, seed, epochs, epoch=0, next_batch=0):
    """(epoch, global batch indices, where a resume after this batch starts) for every step from
    (epoch, next_batch) to the end of the last epoch."""
    for e in range(epoch, epochs):
        order = epoch_batches(n, batch_size, seed, e)  # (steps, batch_size)
        for b in range(next_batch if e == epoch else 0, len(order)):
            yield e, order[b], ((e, b + 1) if b + 1 < len(order) else (e + 1, 0))


def epoch_batches(n, batch_size, seed, epoch):
    """Global batches of one epoch: a (seed + epoch) shuffle, the incomplete last batch dropped."""
    perm = np.random.default_rng(seed + epoch).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)  # (steps, batch_size)


def shard(batch_indices, dp_rank, dp_size):
    """This dp rank's contiguous slice of one global batch (train.py checks that dp_size divides a
    training batch; when it does not, as for the val set, the last ranks get fewer)."""
    per = -(-len(batch_indices) // dp_size)  # ceil
    return batch_indices[dp_rank * per:(dp_rank + 1) * per]


def balanced_shards(lengths, batch_indices, dp_size):
    """Every dp rank's samples of one global batch when micro-batches are sized by tokens.

    With token budgets (verl's data.use_dynamic_bsz) ranks balance tokens, not sample counts:
    longest sample first, each to the rank with the fewest tokens so far (ties: fewer samples,
    then lower rank), so every rank's step takes about as long. Every sample goes to exactly one
    rank (a rank may get none when the batch is smaller than dp_size); the batch's shuffled order
    is kept within the rank. lengths (B,) are the batch's samples' token counts, in batch order.
    """
    batch_indices = np.asarray(batch_indices)
    lens = np.asarray(lengths)
    order = np.argsort(-lens, kind="stable")  # longest first; equal lengths in batch order
    loads = [(0, 0, r) for r in range(dp_size)]  # heap of (tokens, samples, rank): already sorted
    owner = np.empty(len(batch_indices), dtype=np.int64)
    for i in order:
        tokens, count, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (tokens + int(lens[i]), count + 1, r))
    return [batch_indices[owner == r] for r in range(dp_size)]


# --------------------------------------------------------------------------- micro-batches

def micro_batches(samples, batch_indices, *, dp_rank, dp_size, sp_rank=0, sp_size=1, micro_batch_size=None,
                  max_tokens=None, packed=True, pad_id=0, device=None):
    """This rank's micro-batches of one global batch, ready for its forward, and its samples.

    Fixed size (micro_batch_size): a contiguous dp shard cut into micro_batch_size samples; a batch
    that dp_size does not divide (the val set) leaves the last ranks fewer. Token budget
    (max_tokens, verl's use_dynamic_bsz; packed only): dp ranks balance tokens, then first-fit
    packing up to max_tokens per micro-batch. FSDP's collectives need every rank to run as many
    forward/backward passes as the others, so a rank with fewer micro-batches gets empty ones (one
    untrained pad token). Sharding is deterministic, so each rank works out every rank's count
    locally: no collective. The sp ranks of one group share a dp_rank, so they cut the same
    micro-batches and each keeps its slice (sp_slice); device=None leaves them on the CPU.
    """
    batch_indices = np.asarray(batch_indices)
    if max_tokens is None:
        shards = [shard(batch_indices, r, dp_size) for r in range(dp_size)]
        groups = [[list(range(i, min(i + micro_batch_size, len(s)))) for i in range(0, len(s), micro_batch_size)]
                  for s in shards]
    else:
        shards = balanced_shards([len(samples[i][0]) for i in batch_indices], batch_indices, dp_size)
        groups = [token_budget_micro_batches([len(samples[i][0]) for i in s], max_tokens) for s in shards]
    mine = [samples[i] for i in shards[dp_rank]]
    counts = [len(samples[i][3]) if len(samples[i]) > 3 else 0 for i in batch_indices]
    first_turn = dict(zip(batch_indices.tolist(), np.cumsum([0] + counts)[:-1].tolist()))  # sample -> its first turn id
    bases = [first_turn[i] for i in shards[dp_rank].tolist()]
    collate = pack if packed else functools.partial(pad, pad_id=pad_id)
    micro = [collate([mine[i] for i in g], [bases[i] for i in g]) for g in groups[dp_rank]]
    empty = (np.array([pad_id], dtype=np.int64), np.zeros(1, dtype=np.uint8))
    micro += [pack([empty])] * (max(map(len, groups)) - len(micro))
    if sp_size > 1:
        micro = [sp_slice(b, sp_rank, sp_size, pad_id) for b in micro]
    if device is not None:
        micro = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
                 for b in micro]
    return micro, mine


def token_budget_micro_batches(lengths, max_tokens):
    """Positions into lengths grouped into micro-batches of at most max_tokens tokens each.

    First-fit decreasing (longest sample into the first micro-batch with room) keeps the count
    near the minimum (at most 11/9 of it, plus one). Deterministic: micro-batches in the order
    they were opened (the first holds the longest sample), positions ascending within each.
    A sample longer than the budget cannot be placed and is an error.
    """
    lengths = [int(n) for n in lengths]
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise data.DataError(f"a sample of {n} tokens (position {i} of the batch) exceeds the micro-batch "
                                 f"token budget {max_tokens}; set data.max_token_len_per_gpu >= data.max_length.")
    batches, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties in position order
        b = next((b for b, free in enumerate(room) if lengths[i] <= free), len(batches))
        if b == len(batches):
            batches.append([])
            room.append(max_tokens)
        batches[b].append(i)
        room[b] -= lengths[i]
    return [sorted(b) for b in batches]


def pack(samples, bases=None):
    """B samples -> one varlen stream of T = sum(L) tokens; bases: each sample's first global turn id."""
    lengths = np.array([len(s[0]) for s in samples], dtype=np.int64)
    ids = np.concatenate([s[0] for s in samples]).astype(np.int64)  # (T,)
    mask = np.concatenate([s[1] for s in samples])  # (T,)
    cu = np.concatenate([[0], np.cumsum(lengths)])  # (B+1,)
    # labels[t] is the target predicted at position t: ids[t+1] when that token is trained. The
    # last token of each sample predicts nothing, so no target crosses into the next sample.
    labels = np.full(len(ids), -100, dtype=np.int64)
    labels[:-1] = np.where(mask[1:] > 0, ids[1:], -100)
    labels[cu[1:] - 1] = -100
    # turns[t]: the global turn of the target ids[t+1], -1 where labels[t] trains no assistant turn
    bases = np.zeros(len(samples), dtype=np.int64) if bases is None else np.asarray(bases, dtype=np.int64)
    turn = np.concatenate([s[2] if len(s) > 2 else np.full(len(s[0]), -1) for s in samples]).astype(np.int64)
    turn = np.where(turn >= 0, turn + np.repeat(bases, lengths), -1)  # (T,)
    turns = np.full(len(ids), -1, dtype=np.int64)
    turns[:-1] = np.where(labels[:-1] != -100, turn[1:], -1)
    positions = np.arange(len(ids)) - np.repeat(cu[:-1], lengths)  # (T,) restarts at 0 per sample
    return {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(positions),
            "cu_seqlens": torch.from_numpy(cu.astype(np.int32)), "max_seqlen": int(lengths.max()),
            "labels": torch.from_numpy(labels), "turns": torch.from_numpy(turns)}


def pad(samples, bases=None, pad_id=0):
    """B samples right-padded to the longest L, in the packed layout (T = B * L, cu_seqlens = k * L).

    Padding is untrained and follows each sample's real tokens, so under causal attention within
    a row no real token sees it: the padded batch computes what the packed one does.
    """
    L = max(len(s[0]) for s in samples)
    return pack([(np.pad(s[0], (0, L - len(s[0])), constant_values=pad_id), np.pad(s[1], (0, L - len(s[0]))),
                  np.pad(s[2] if len(s) > 2 else np.full(len(s[0]), -1), (0, L - len(s[0])), constant_values=-1))
                 for s in samples], bases)


def sp_slice(batch, sp_rank, sp_size, pad_id):
    """This rank's slice of a packed micro-batch; the stream is padded to a multiple of sp_size first.

    The padding is its own segment in cu_seqlens (so no real token attends to it) and its labels
    are -100 (so it trains nothing). cu_seqlens and max_seqlen stay those of the full stream.
    """
    T = batch["input_ids"].numel()
    n_pad = -T % sp_size
    out = dict(batch)
    if n_pad:
        out["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"].new_full((n_pad,), pad_id)])
        out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(n_pad, dtype=batch["position_ids"].dtype)])
        out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((n_pad,), -100)])
        out["turns"] = torch.cat([batch["turns"], batch["turns"].new_full((n_pad,), -1)])
        out["cu_seqlens"] = torch.cat([batch["cu_seqlens"], batch["cu_seqlens"].new_tensor([T + n_pad])])
        out["max_seqlen"] = max(batch["max_seqlen"], n_pad)
    Tl = (T + n_pad) // sp_size
    for key in ("input_ids", "position_ids", "labels", "turns"):
        out[key] = out[key][sp_rank * Tl:(sp_rank + 1) * Tl]
    return out
