"""Training-step throughput on one device: our model (Triton attention + fused LM-head loss, with and without
activation recompute) beside the same model with full logits and beside Hugging Face's Qwen2 (sdpa).

    python bench.py                                   # Qwen2.5-0.5B shapes; 2k, 8k, 16k samples; 16k tokens a step
    python bench.py --seqlens 2048 --steps 20 --out bench.md
    python bench.py --config tiny                     # CPU smoke run, seconds (tests/test_bench.py)
    python bench.py --memory                          # full vs LoRA training-state bytes per rank (CPU, meta device)

Every step trains on one packed stream of equal-length multi-turn-like samples (random ids, about half the tokens
trained), e.g. 8 x 2k or 1 x 16k. Precision is the trainer's (FSDP2 MixedPrecisionPolicy): bf16 weights for
compute on a GPU, fp32 master weights and AdamW state, gradients cast to fp32 before the update; fp32 everywhere
on a CPU. No autocast: it would leave our residual stream and RoPE in fp32 and hand fp32 q/k to the attention
kernel, which is not what the trainer runs. Each variant starts from the same weights and sees the same batches,
so their losses should agree. MFU counts model FLOPs (model.flops_per_token, LM head on every token) against the
bf16 dense peak; peak GiB is torch.cuda.max_memory_allocated, weights and AdamW state (~10 GiB at 0.5B) included.
"""
import argparse
import gc
import time

import numpy as np
import torch
import torch.nn.functional as F

import batches
import lora
import model as M
import parallel
from sft_kernels.lm_head_loss import linear_cross_entropy_sum

CONFIGS = {
    # Qwen2.5-0.5B-Instruct's config.json (shared/reference), random weights.
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768,
                         initializer_range=0.02),
    "tiny": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 tie_word_embeddings=True, max_position_embeddings=4096, initializer_range=0.02),
    # Qwen3.5-0.8B's shape (shared/reference README): 3 Gated DeltaNet layers to 1 gated attention layer.
    "qwen3.5-0.8b": dict(model_type="qwen3_5_text", vocab_size=248320, hidden_size=1024, intermediate_size=3584,
                         num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                         linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
                         linear_value_head_dim=128, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=10000000.0, partial_rotary_factor=0.25),
                         tie_word_embeddings=True, max_position_embeddings=262144, initializer_range=0.02),
}
# Shapes for the memory table only (--memory), from the models' config.json.
MEMORY_CONFIGS = {
    "qwen2.5-0.5b": CONFIGS["qwen2.5-0.5b"],
    "qwen2.5-1.5b": dict(CONFIGS["qwen2.5-0.5b"], hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
    "qwen2.5-7b": dict(CONFIGS["qwen2.5-0.5b"], vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen3.5-0.8b": CONFIGS["qwen3.5-0.8b"],
}
DEFAULTS = {"qwen2.5-0.5b": dict(seqlens="2048,8192,16384", pack=16384, steps=10, warmup=3),
            "tiny": dict(seqlens="64,128", pack=256, steps=2, warmup=1),
            "qwen3.5-0.8b": dict(seqlens="2048,8192,16384", pack=16384, steps=10, warmup=3)}
VARIANTS = ("ours", "ours+recompute", "plain", "hf-sdpa")


# --------------------------------------------------------------------------- batches

def make_pack(pack_tokens, seqlen, vocab, rng):
    """pack_tokens // seqlen samples of seqlen tokens, turns alternating untrained (system/user/tool) and trained
    (assistant) with random lengths, packed as the trainer packs them."""
    samples = []
    for _ in range(max(1, pack_tokens // seqlen)):
        mask, pos, trained = np.zeros(seqlen, dtype=np.uint8), 0, False
        while pos < seqlen:
            turn = int(rng.integers(seqlen // 16 + 1, seqlen // 4 + 2))
            mask[pos:pos + turn] = trained
            pos, trained = pos + turn, not trained
        samples.append((rng.integers(0, vocab, seqlen), mask))
    return batches.pack(samples)


# --------------------------------------------------------------------------- losses (fp32 sums)

def loss_ours(m, b):
    h = m.hidden_states(b["input_ids"], b["cu_seqlens"], b["position_ids"], b["max_seqlen"])  # (T, C)
    return linear_cross_entropy_sum(h, m.lm_head.weight, b["labels"])


def loss_plain(m, b):
    logits = m(b["input_ids"], b["cu_seqlens"], b["position_ids"], b["max_seqlen"])  # (T, V)
    return F.cross_entropy(logits.float(), b["labels"], reduction="sum", ignore_index=-100)


def loss_hf(m, b):
    B = b["cu_seqlens"].numel() - 1  # equal lengths: the pack is already a padded (B, s) batch
    logits = m(input_ids=b["input_ids"].view(B, -1), use_cache=False).logits  # (B, s, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), b["labels"], reduction="sum", ignore_index=-100)


def build(variant, cfg, init_state, device, dtype):
    if variant == "hf-sdpa":
        import transformers
        hf_cfg = transformers.AutoConfig.for_model(**cfg)  # Qwen2Config or Qwen3_5TextConfig
        with torch.device(device):
            m = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
        loss_fn = loss_hf
    else:
        with torch.device(device):
            m = M.Qwen2ForCausalLM(cfg)
        if variant == "ours+recompute":
            parallel.apply_recompute(m)
        loss_fn = loss_ours if variant.startswith("ours") else loss_plain
    m.load_state_dict(init_state)  # same names as HF: the same weights in every variant
    return m.to(dtype).train(), loss_fn


# --------------------------------------------------------------------------- one variant

def run_variant(variant, cfg, init_state, packs, args, device, dtype):
    """Warm-up steps, then args.steps timed steps: (tokens/s, peak GiB, last loss)."""
    m, loss_fn = build(variant, cfg, init_state, device, dtype)
    params = [p for p in m.parameters()]
    masters = params if dtype == torch.float32 else [p.detach().float() for p in params]  # fp32 master weights
    opt = torch.optim.AdamW(masters, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01, fused=device.type == "cuda")

    def step(b):
        loss = loss_fn(m, b) / b["n_trained"]  # token mean of the step, as the trainer's loss
        loss.backward()
        if masters is not params:
            for p, mp in zip(params, masters):
                mp.grad, p.grad = p.grad.float(), None
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masters is not params:
            with torch.no_grad():
                torch._foreach_copy_(params, masters)  # fp32 master -> bf16 compute weights
        return loss.detach()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup):  # compiles and autotunes the Triton kernels for these shapes
        step(packs[i % len(packs)])
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(packs[i % len(packs)])
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return packs[0]["input_ids"].numel() / dt, peak, float(loss)


def bench(args, device):
    cfg = CONFIGS[args.config]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    init_state = M.build_random(cfg, seed=0).state_dict()  # fp32 on CPU, copied into every variant
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_flops = M.peak_flops(name) if device.type == "cuda" else None
    variants = [v for v in args.variants.split(",") if v]
    notes, rows = [], []
    if "hf-sdpa" in variants:
        try:
            import transformers  # noqa: F401
        except ImportError:
            variants.remove("hf-sdpa")
            notes.append("hf-sdpa skipped: transformers is not installed.")
    for s in [int(x) for x in args.seqlens.split(",")]:
        rng = np.random.default_rng(s)
        packs = []
        for _ in range(min(args.steps + args.warmup, 4)):  # a few distinct batches, cycled
            b = make_pack(args.pack_tokens, s, cfg["vocab_size"], rng)
            b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
            b["n_trained"] = int((b["labels"] != -100).sum())
            packs.append(b)
        shape = f"{packs[0]['cu_seqlens'].numel() - 1} x {s}"
        for v in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                tps, peak, loss = run_variant(v, cfg, init_state, packs, args, device, dtype)
                mfu = f"{M.flops_per_token(cfg, s) * tps / peak_flops:.1%}" if peak_flops else "-"
                rows.append([v, shape, f"{tps:,.0f}", mfu, f"{peak:.1f}" if peak is not None else "-", f"{loss:.4f}"])
            except torch.cuda.OutOfMemoryError:
                rows.append([v, shape, "OOM", "-", "-", "-"])
            gc.collect()  # the variant's model, optimizer and (after an OOM) traceback tensors
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(" | ".join(rows[-1]), flush=True)
    head = ["variant", "samples x len", "tokens/s", "MFU", "peak GiB", "loss"]
    lines = [f"device: {name}, torch {torch.__version__}, {args.config}, {args.pack_tokens} tokens per step, "
             f"{args.steps} timed steps after {args.warmup} warm-up", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""] * bool(notes) + notes
    return "\n".join(lines)


# --------------------------------------------------------------------------- memory: full vs LoRA

def training_state_bytes(cfg, lora_rank, master_dtype, world_size, targets=("all-linear",)):
    """Persistent training state per rank under FSDP2 (every tensor sharded over world_size ranks), counted
    on a meta-device model (no memory, no init): parameters in the master dtype, a gradient and AdamW's two
    moments for each trained parameter in its own dtype (LoRA adapters are fp32, the frozen base has none).
    no_sync is the unsharded fp32 gradient each rank accumulates between micro-batches (the trainer syncs
    once per step). Activations, identical up to the small (T, r) adapter inputs, are not counted."""
    with torch.device("meta"):
        m = M.Qwen2ForCausalLM(cfg).to(master_dtype)
        if lora_rank:
            lora.apply(m, lora_rank, 16, list(targets))
    params = list(m.parameters())  # a tied LM head once
    trained = [p for p in params if p.requires_grad]
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    return dict(total=sum(p.numel() for p in params), trained=sum(p.numel() for p in trained),
                params=size(params) / world_size, grads=size(trained) / world_size,
                adam=2 * size(trained) / world_size, no_sync=4 * sum(p.numel() for p in trained))


def memory_table(configs, ranks, world_size):
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    head = ["model", "master dtype", "training", "trained params", "params GiB", "grads GiB", "AdamW GiB",
            "total GiB / rank", "+ no-sync grad GiB"]
    lines = [f"per rank at world size {world_size} (FSDP2, everything sharded); torch {torch.__version__}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in configs:
        for dtype in (torch.float32, torch.bfloat16):
            for r in [0] + ranks:
                b = training_state_bytes(MEMORY_CONFIGS[name], r, dtype, world_size)
                row = [name, str(dtype).removeprefix("torch."), f"LoRA r={r}" if r else "full",
                       f"{b['trained'] / 1e6:,.1f}M of {b['total'] / 1e9:.2f}B", gib(b["params"]), gib(b["grads"]),
                       gib(b["adam"]), gib(b["params"] + b["grads"] + b["adam"]), gib(b["no_sync"])]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Training-step throughput of ours vs plain vs Hugging Face.")
    p.add_argument("--config", default="qwen2.5-0.5b", choices=list(CONFIGS), help="model shapes (tiny: CPU smoke)")
    p.add_argument("--seqlens", default=None, help="comma-separated sample lengths (default per config)")
    p.add_argument("--pack_tokens", type=int, default=None, help="tokens per step (default 16384; tiny 256)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    p.add_argument("--memory", action="store_true", help="print the full vs LoRA training-state table and exit")
    p.add_argument("--lora_ranks", default="16,64", help="LoRA ranks for --memory (all-linear targets)")
    p.add_argument("--world_size", type=int, default=2, help="ranks the state is sharded over, for --memory")
    args = p.parse_args(argv)
    if args.memory:
        print(memory_table(list(MEMORY_CONFIGS), [int(r) for r in args.lora_ranks.split(",")], args.world_size))
        return
    for k, v in DEFAULTS[args.config].items():
        key = "pack_tokens" if k == "pack" else k
        if getattr(args, key) is None:
            setattr(args, key, v)
    unknown = set(args.variants.split(",")) - set(VARIANTS) - {""}
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    table = bench(args, torch.device(args.device))
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
