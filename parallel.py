"""Parallelism applied to a built model from outside: device meshes, recompute, Ulysses, FSDP2.

Vocabulary: world_size W ranks = dp_size x sp_size. The sp_size ranks of one Ulysses group hold
contiguous slices of the same packed stream; FSDP2 shards parameters over all W ranks, or (HSDP)
over groups of fsdp_size consecutive ranks, replicated across groups. `parallelize` is the one call
that turns a built model into the training model; each piece works on any decoder layer in
model.model.layers (an nn.Module taking and returning the (T, C) stream first).
"""
import functools

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint


class ParallelError(Exception):
    """An impossible parallel layout; the message says which sizes and what would work."""


def check_sizes(world_size, sp_size, fsdp_size):
    """sp_size and fsdp_size against the number of processes (train.validate, before any work)."""
    if sp_size < 1 or world_size % sp_size:
        raise ParallelError(f"ulysses_sequence_parallel_size={sp_size} must divide the number of "
                            f"processes ({world_size}); pick a divisor of {world_size}.")
    if fsdp_size != -1 and not (1 <= fsdp_size <= world_size and world_size % fsdp_size == 0):
        ok = [n for n in range(1, world_size + 1) if world_size % n == 0]
        raise ParallelError(f"model.fsdp_config.fsdp_size={fsdp_size} must be -1 (shard over all {world_size} "
                            f"processes) or one of {ok}; use the GPUs per node for multi-node runs.")


def check_sp_heads(sp_size, num_heads, num_kv_heads, linear_key_heads=None, linear_value_heads=None):
    """Ulysses gives each sp rank num_heads / sp_size query heads and their key-value heads, and in the Gated
    DeltaNet layers (Qwen3.5; the linear_* counts, None for other models) linear_key_heads / sp_size key heads
    and the value heads they serve (checked from the config, before the model loads)."""
    def fits(s):
        attention = num_heads % s == 0 and (num_kv_heads % s == 0 or s % num_kv_heads == 0)
        return attention and all(n is None or n % s == 0 for n in (linear_key_heads, linear_value_heads))
    if not fits(sp_size):
        ok = [s for s in range(1, num_heads + 1) if fits(s)]
        linear = ("" if linear_key_heads is None else f" and {linear_key_heads} key / {linear_value_heads} "
                  "value heads in the linear-attention layers (linear_num_key_heads, linear_num_value_heads)")
        raise ParallelError(f"ulysses_sequence_parallel_size={sp_size} does not fit {num_heads} query / "
                            f"{num_kv_heads} key-value heads{linear}; use one of {ok}.")


def build_meshes(device_type, world_size, sp_size, fsdp_size=-1):
    """(FSDP mesh, 2-D (dp, sp) mesh for the groups). gloo needs the explicit 'cpu' type.

    fsdp_size -1 or world_size: a 1-D mesh, parameters sharded over every rank. 1 <= fsdp_size <
    world_size: HSDP, a 2-D (replicate, shard) mesh. Meshes are row-major, so a shard group is
    fsdp_size consecutive ranks (= one node when fsdp_size is the GPUs per node): each layer's
    all-gather and reduce-scatter stay inside the node and only one gradient all-reduce per step
    crosses nodes. Ulysses groups are sp_size consecutive ranks either way. Sizes are checked by
    check_sizes.
    """
    if fsdp_size in (-1, world_size):
        fsdp = init_device_mesh(device_type, (world_size,), mesh_dim_names=("fsdp",))
    else:
        fsdp = init_device_mesh(device_type, (world_size // fsdp_size, fsdp_size),
                                mesh_dim_names=("replicate", "shard"))
    dp_sp = init_device_mesh(device_type, (world_size // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
    return fsdp, dp_sp


def parallelize(model, mesh, sp_group, sp_size, param_dtype, recompute=False, cpu_offload=False):
    """The training model: per-layer recompute, then Ulysses, then FSDP2 units (which move the shards
    to the mesh's device). Order matters: FSDP2's hooks must sit outside the recomputed forward, so a
    layer's parameters are gathered once for its forward and once for its backward (recompute inside)."""
    if recompute:
        apply_recompute(model)
    apply_ulysses(model, sp_group, sp_size)
    return apply_fsdp(model, mesh, param_dtype, cpu_offload=cpu_offload)


# --------------------------------------------------------------------------- recompute

def _recomputed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_recompute(model):
    """Activation recompute per decoder layer (like torchtitan's apply_ac): the layer keeps only its
    (T, C) input for backward and runs its forward again there, instead of keeping its insides."""
    for layer in model.model.layers:
        layer.forward = functools.partial(_recomputed, layer.forward)  # the instance's, not the class's
    return model


# --------------------------------------------------------------------------- FSDP2

def apply_fsdp(model, mesh, param_dtype, reduce_dtype=torch.float32, cpu_offload=False):
    """fully_shard each decoder layer (and its LoRA adapters), then the root (embedding, final norm, LM head).

    Per-layer units let FSDP2 all-gather layer i+1 while layer i computes and free it after.
    Master weights stay in the dtype the model was built in; param_dtype is the compute copy.
    On a 2-D (replicate, shard) mesh fully_shard is HSDP: gradients are reduce-scattered within
    the shard group, then all-reduced across replicas, each averaging, so the result is the mean
    over all ranks as with plain FSDP (train.py's loss scale relies on that).
    """
    kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype))
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in model.model.layers:
        # LoRA adapters (fp32 masters) beside a bf16 frozen base: one FSDP unit holds one original
        # dtype, so a layer's adapters are grouped into their own unit (one all-gather per layer).
        adapters = [m for name, m in layer.named_modules() if name.endswith((".lora_A", ".lora_B"))]
        if adapters:
            fully_shard(adapters, **kwargs)
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


# --------------------------------------------------------------------------- Ulysses

def _seq_to_heads(x, group, sp_size):
    """(T/S, H, D) on each rank -> (T, H/S, D): gather the sequence, scatter the heads."""
    Tl, H, D = x.shape
    x = x.reshape(Tl, sp_size, H // sp_size, D).transpose(0, 1).contiguous()  # (S, T/S, H/S, D): chunk j -> rank j
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)  # (all ranks of the sp group)
    return out.reshape(sp_size * Tl, H // sp_size, D)  # chunk i came from rank i = tokens in rank order


def _heads_to_seq(x, group, sp_size):
    """(T, H/S, D) -> (T/S, H, D): the inverse of _seq_to_heads."""
    T, Hs, D = x.shape
    x = x.reshape(sp_size, T // sp_size, Hs, D).contiguous()  # (S, T/S, H/S, D): rank j's tokens -> rank j
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)  # (all ranks of the sp group)
    return out.transpose(0, 1).reshape(T // sp_size, sp_size * Hs, D)  # chunk i = head group i


class _SeqToHeads(torch.autograd.Function):
    # The backward of an all-to-all is the opposite all-to-all of the gradient.
    @staticmethod
    def forward(ctx, x, group, sp_size):
        ctx.group, ctx.sp_size = group, sp_size
        return _seq_to_heads(x, group, sp_size)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group, ctx.sp_size), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sp_size):
        ctx.group, ctx.sp_size = group, sp_size
        return _heads_to_seq(x, group, sp_size)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group, ctx.sp_size), None, None


def ulysses_attention(q, k, v, cu_seqlens, max_seqlen, *, inner, sp_group, sp_size):
    """Attention over the full stream while each rank holds T/S tokens.

    q (T/S, H, D), k/v (T/S, Hkv, D) -> (T/S, H, D). cu_seqlens/max_seqlen describe the FULL
    stream (computed once, before slicing), which is what attention sees after the all-to-all.
    """
    Hkv = k.shape[1]
    if sp_size > Hkv:
        # Fewer KV heads than ranks: repeat each so rank r gets the KV head its query heads use
        # (query head h reads KV head h // (H/Hkv); repeat_interleave keeps that order).
        k = k.repeat_interleave(sp_size // Hkv, dim=1)  # (T/S, S, D)
        v = v.repeat_interleave(sp_size // Hkv, dim=1)
    q = _SeqToHeads.apply(q, sp_group, sp_size)  # (T, H/S, D)
    k = _SeqToHeads.apply(k, sp_group, sp_size)  # (T, max(Hkv, S)/S, D)
    v = _SeqToHeads.apply(v, sp_group, sp_size)
    o = inner(q, k, v, cu_seqlens, max_seqlen)  # (T, H/S, D)
    return _HeadsToSeq.apply(o, sp_group, sp_size)  # (T/S, H, D)


def ulysses_gated_delta(qkv, b, a, conv_weight, A_log, dt_bias, cu_seqlens, head_k_dim, head_v_dim, *, inner,
                        sp_group, sp_size):
    """A Gated DeltaNet layer's mix over the full stream while each rank holds T/S tokens (model.gated_delta_mix).

    qkv (T/S, 2*Hk*Dk + Hv*Dv), b/a (T/S, Hv) -> o (T/S, Hv, Dv). One all-to-all gives rank r the whole stream of
    its key heads r*Hk/S ... (their q and k channels) and of the value heads they serve (value heads are
    consecutive per key head, so those are r*Hv/S ...: their v channels, b and a). The causal conv is depthwise,
    so the rank's slice of conv_weight over the whole stream is exact; the delta rule runs on its heads with the
    full stream's cu_seqlens. z, the gated norm and out_proj stay on the sequence shard (the caller's).
    """
    Tl, Hv = b.shape
    key_dim = (qkv.shape[1] - Hv * head_v_dim) // 2
    q, k, v = qkv.split([key_dim, key_dim, Hv * head_v_dim], dim=-1)
    parts = [x.reshape(Tl, sp_size, -1) for x in (q, k, v, b, a)]  # (T/S, S, width/S): chunk j -> rank j
    widths = [p.shape[-1] for p in parts]
    x = _SeqToHeads.apply(torch.cat(parts, dim=-1), sp_group, sp_size)  # (T, 1, sum of widths): one all-to-all
    q, k, v, b, a = x[:, 0].split(widths, dim=-1)  # (T, Hk/S*Dk) x2, (T, Hv/S*Dv), (T, Hv/S) x2
    r = dist.get_rank(sp_group)
    # conv_weight (C, 1, K) holds q, k, v channels in qkv's order: the rank's share of each, in the same order
    w = torch.cat([c.chunk(sp_size)[r] for c in conv_weight.split([key_dim, key_dim, Hv * head_v_dim])])
    heads = slice(r * Hv // sp_size, (r + 1) * Hv // sp_size)
    o = inner(torch.cat([q, k, v], dim=-1), b, a, w, A_log[heads], dt_bias[heads], cu_seqlens,
              head_k_dim, head_v_dim)  # (T, Hv/S, Dv)
    return _HeadsToSeq.apply(o, sp_group, sp_size)  # (T/S, Hv, Dv)


def apply_ulysses(model, sp_group, sp_size):
    """Wrap each layer's sequence mixer in the Ulysses all-to-alls (no-op for sp_size 1).

    A layer with softmax attention exposes `self_attn.attn_fn` (q, k, v, cu_seqlens, max_seqlen) -> o, wrapped
    by ulysses_attention (Qwen3.5's output gate is applied after it, on the sequence shard); a Gated DeltaNet
    layer exposes `linear_attn.mix_fn`, wrapped by ulysses_gated_delta. Another kind is refused.
    """
    if sp_size == 1:
        return model
    kw = dict(sp_group=sp_group, sp_size=sp_size)
    for i, layer in enumerate(model.model.layers):
        attn, linear = getattr(layer, "self_attn", None), getattr(layer, "linear_attn", None)
        if hasattr(attn, "attn_fn"):
            attn.attn_fn = functools.partial(ulysses_attention, inner=attn.attn_fn, **kw)
        elif hasattr(linear, "mix_fn"):
            linear.mix_fn = functools.partial(ulysses_gated_delta, inner=linear.mix_fn, **kw)
        else:
            raise ParallelError(f"decoder layer {i} ({type(layer).__name__}) has no self_attn.attn_fn or "
                                "linear_attn.mix_fn to run under Ulysses; use ulysses_sequence_parallel_size=1.")
    return model
