"""Multi-turn SFT of Qwen2.5 / Qwen3 dense models (full or LoRA) with verl's fsdp_sft_trainer or sft_trainer command line.

    torchrun --nproc_per_node=2 train.py data.train_files=... model.partial_pretrain=... \
        ulysses_sequence_parallel_size=2 use_remove_padding=true
    python train.py ...        # one process, no launcher
    torchrun ... train.py model.path=... engine.ulysses_sequence_parallel_size=2 ...   # verl's current sft_trainer keys

Reads top to bottom: command line (cli.py) -> distributed init -> model -> optimizer -> data -> loop -> save.
"""
import functools
import json
import math
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import batches
import checkpoint
import cli
import data
import lora
import model as M
import parallel
import plot
import templates


class TrainingError(Exception):
    """The run cannot usefully go on (e.g. repeated non-finite gradients); the message says why."""


# --------------------------------------------------------------------------- helpers

# Keys whose change would change what the saved data position or schedule means: a resume with
# any of them different is refused (world size, micro-batch size and sp size may change freely).
RESUME_KEYS = ("train_files", "train_batch_size", "max_length", "truncation", "seed", "total_epochs",
               "multiturn", "messages_key", "tools_key", "prompt_key", "response_key",
               "chat_template", "enable_thinking_key",
               "lr", "lr_scheduler", "warmup_steps_ratio")


# Resume keys added after checkpoints were first written, with their defaults: recorded only when set,
# so a checkpoint from before they existed still resumes when they are left at the default.
LATER_RESUME_KEYS = dict(apply_chat_template_kwargs={}, enable_thinking_default=None, lr_warmup_steps=-1,
                         min_lr_ratio=0.0, num_cycles=0.5)


def resume_config(args):
    """The RESUME_KEYS values, data paths made absolute (a relative path names the same file)."""
    config = {k: getattr(args, k) for k in RESUME_KEYS}
    config.update({k: getattr(args, k) for k, default in LATER_RESUME_KEYS.items() if getattr(args, k) != default})
    config["train_files"] = [os.path.abspath(f) for f in config["train_files"]]
    return config


def lora_spec(args):
    """The LoRA spec checkpoint.py saves and compares on resume: (rank, alpha, targets), or None."""
    return (args.lora_rank, args.lora_alpha, args.target_modules) if args.lora_rank > 0 else None


def lr_lambda(total_steps, warmup_ratio, kind, *, warmup_steps=-1, min_lr_ratio=0.0, num_cycles=0.5):
    """Multiplier of optim.lr after `step` updates. Warmup starts above 0 (verl's first update is 0).

    warmup_steps > 0 wins over the ratio (verl's optim.lr_warmup_steps). constant: 1 after warmup.
    cosine (and wsd's decay): verl's curve, min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(2 pi num_cycles p)) / 2
    with p the decay's progress in [0, 1]; the defaults 0.0 / 0.5 are a half cosine down to 0.
    """
    warmup = warmup_steps if warmup_steps > 0 else int(total_steps * warmup_ratio)
    decay_start = max(warmup, int(total_steps * 0.9)) if kind == "wsd" else warmup  # wsd: stable until 90%

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant" or step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total_steps - decay_start)
        wave = 0.5 * (1.0 + math.cos(2.0 * math.pi * num_cycles * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * wave
    return f


def data_keys(args):
    """data.build_samples' keyword arguments from the flags (run and preflight read the data alike)."""
    return dict(multiturn=args.multiturn, messages_key=args.messages_key, tools_key=args.tools_key,
                prompt_key=args.prompt_key, response_key=args.response_key,
                prompt_dict_keys=args.prompt_dict_keys, response_dict_keys=args.response_dict_keys,
                chat_template=args.chat_template, enable_thinking_key=args.enable_thinking_key,
                template_kwargs=args.apply_chat_template_kwargs, enable_thinking_default=args.enable_thinking_default)


def reporter(args, out, rank, first_step, stop_at, log):
    """report(rec, saved=None): on rank 0 the console line, metrics.jsonl, wandb/tensorboard and, when a
    checkpoint was just saved, the loss curve beside the metrics; nothing on the other ranks."""
    if rank != 0:
        return lambda rec, saved=None: None
    metrics_file, loggers = open(out / "metrics.jsonl", "a"), []
    if "wandb" in args.logger:
        import wandb
        run = wandb.init(project=args.project_name, name=args.experiment_name, config=vars(args))
        loggers.append(lambda rec: run.log(rec, step=rec["step"]))
    if "tensorboard" in args.logger:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        loggers.append(lambda rec: [writer.add_scalar(k, v, rec["step"]) for k, v in rec.items() if k != "step"])
    t_start, plotting = time.time(), [True]  # plotting: off once it could not (said once, not per save)

    def report(rec, saved=None):
        step = rec["step"]
        line = (f"step {step}/{stop_at} | loss {rec['train/loss']:.4f} | lr {rec['train/lr']:.2e} | "
                f"grad_norm {rec['train/grad_norm']:.3f} | {rec['train/tokens_per_s_per_gpu']:,.0f} tok/s/gpu")
        if "train/mfu" in rec:
            line += f" | mfu {rec['train/mfu']:.1%} | mem {rec['train/peak_mem_gib']:.1f}G"
        if "val/loss" in rec:
            line += f" | val_loss {rec['val/loss']:.4f} | val_acc {rec['val/token_acc']:.3f}"
            line += f" | turn_exact {rec['val/turn_exact']:.3f} of {rec['val/turns']}"
            if "val/tool_call_exact" in rec:
                line += f" | tool_call_exact {rec['val/tool_call_exact']:.3f} of {rec['val/tool_call_turns']}"
        log(line + f" | eta {fmt_time((time.time() - t_start) / (step - first_step) * (stop_at - step))}")
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()
        for log_to in loggers:
            log_to(rec)
        if saved:
            png = plot.plot_metrics(out, f"{args.project_name}/{args.experiment_name}", log) if plotting[0] else None
            plotting[0] = png is not None
            log(f"saved {saved}" + (f"; loss curve {png}" if png else ""))
    return report


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_count(n):
    """8.8M, 7.6B, 52.3K: parameter counts for the log."""
    return next(f"{n / d:.1f}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= d or d == 1)


def all_sum(x, group=None):
    t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else x.dtype).clone()
    dist.all_reduce(t, group=group)  # (all ranks of group)
    return t


def batcher(args, dp_sp, pad_id, device):
    """(samples, global batch indices) -> this rank's micro-batches, ready for the forward, and its samples.
    Fixed-size, or (use_dynamic_bsz) token budgets of max_token_len_per_gpu x sp size per micro-batch,
    since an sp group splits each packed stream sp_size ways and each GPU still holds the budget."""
    sp_size = dp_sp["sp"].size()
    return functools.partial(
        batches.micro_batches, dp_rank=dp_sp["dp"].get_local_rank(), dp_size=dp_sp["dp"].size(),
        sp_rank=dp_sp["sp"].get_local_rank(), sp_size=sp_size, micro_batch_size=args.micro_batch_size_per_gpu,
        packed=args.use_remove_padding, pad_id=pad_id, device=device,
        max_tokens=args.max_token_len_per_gpu * sp_size if args.use_dynamic_bsz else None)


def loss_sum(model, b):
    """Summed CE over one micro-batch as this rank holds it (with sp, its slice of the packed stream)."""
    return model(b["input_ids"], b["cu_seqlens"], b["position_ids"], b["max_seqlen"], labels=b["labels"])


def forward_backward(model, micro, world_size):
    """Accumulate the gradient of one optimizer step over this rank's micro-batches.

    The step's loss is (sum of CE over every trained token of the step, all ranks) / N. The sp
    slices of a stream are disjoint, so summing every rank's trained tokens counts each once.
    Each rank backpropagates its local CE sum scaled by world_size / N: FSDP averages gradients
    over all world_size ranks, and the local sums over all ranks add up to exactly the step's
    total CE. Returns (step loss, N).
    """
    device = micro[0]["labels"].device
    n_local = sum(int((b["labels"] != -100).sum()) for b in micro)
    n_tokens = float(all_sum(torch.tensor(float(n_local), device=device)))  # (all ranks)
    scale = world_size / max(n_tokens, 1.0)
    ce = torch.zeros((), dtype=torch.float64, device=device)
    for i, b in enumerate(micro):
        # Reduce-scatter gradients once per step, after the last micro-batch: the others accumulate
        # unsharded gradients locally (in FSDP's reduce dtype, fp32) instead of communicating. Costs
        # one full fp32 gradient per rank (2 GB for 0.5B parameters), saves n_micro - 1 collectives.
        model.set_requires_gradient_sync(i == len(micro) - 1)
        loss = loss_sum(model, b)
        (loss * scale).backward()
        ce += loss.detach().double()
    return float(all_sum(ce)) / max(n_tokens, 1.0), n_tokens  # (all ranks)


def update(trained, optimizer, scheduler, clip):
    """Clip the gradient norm, then step AdamW unless the norm is non-finite (the update is skipped);
    the schedule advances either way. Returns (grad norm, the lr this step used)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, clip)  # (all ranks)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return grad_norm, lr


def val_counts(model, micro, n_turns):
    """One no-grad forward over this rank's val micro-batches, summed over all ranks: (CE, trained tokens,
    argmax-correct trained tokens) and per_turn (2, n_turns) int64, each turn's trained tokens and wrong
    ones, by the global turn ids batches.py numbers them with (a turn split over sp ranks, or cut between
    micro-batches, adds up under its one id). The argmax comes from the fused LM-head loss: no (T, V) logits."""
    device = micro[0]["labels"].device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # CE, trained tokens, argmax-correct ones
    per_turn = torch.zeros(2, n_turns, dtype=torch.int64, device=device)  # trained tokens, wrong ones
    model.eval()
    with torch.no_grad():
        for b in micro:
            ce, correct = model(b["input_ids"], b["cu_seqlens"], b["position_ids"], b["max_seqlen"],
                                labels=b["labels"], return_correct=True)
            sums += torch.stack([ce.double(), (b["labels"] != -100).sum().double(), correct.sum().double()])
            turns, keep = b["turns"], b["turns"] >= 0
            per_turn[0].index_add_(0, turns[keep], torch.ones_like(turns[keep]))
            per_turn[1].index_add_(0, turns[keep], (~correct[keep]).long())
    model.train()
    # (all ranks) sp slices and dp shards are disjoint, so each trained token is counted once
    return all_sum(sums).tolist(), all_sum(per_turn)


def evaluate(model, micro, calls):
    """The val metrics over the whole val set, given this rank's fixed-size micro-batches of it (batches.py
    gives every rank the same number: FSDP's collectives must match), all from the one forward of val/loss:

    val/loss, the global token mean; val/token_acc, the trained tokens whose argmax is the target;
    val/turn_exact, the assistant turns (with >= 1 trained token) whose every trained token is the argmax,
    which are exactly the turns greedy decoding reproduces from their prompt; val/tool_call_exact, the same
    over the turns with tool calls (absent when there are none); val/turns, val/tool_call_turns, the counts.
    calls (n_turns,) bool: whether each val turn, by its global id, carries tool calls.
    """
    (ce, tokens, right), per_turn = val_counts(model, micro, len(calls))
    measured = per_turn[0] > 0
    exact, tool = measured & (per_turn[1] == 0), measured & calls.to(measured.device)
    rec = {"val/loss": ce / max(tokens, 1.0), "val/token_acc": right / max(tokens, 1.0),
           "val/turn_exact": int(exact.sum()) / max(int(measured.sum()), 1),
           "val/turns": int(measured.sum()), "val/tool_call_turns": int(tool.sum())}
    if tool.any():
        rec["val/tool_call_exact"] = int((exact & tool).sum()) / int(tool.sum())
    return rec


# --------------------------------------------------------------------------- main

def init_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/MASTER_*; a plain `python train.py` becomes a 1-process group."""
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    else:
        local_rank = 0
        with socket.socket() as s:  # a free port for the single-process store
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def run(args):
    rank, world_size, device = init_distributed(args)
    cli.validate(args, world_size)
    log = functools.partial(print, flush=True) if rank == 0 else (lambda *a, **k: None)
    log(f"command line: verl {args.dialect} keys, with its defaults")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # --- meshes: FSDP over all ranks (or HSDP: groups of fsdp_size); Ulysses groups of sp_size consecutive ranks
    cfg = M.read_config(args.partial_pretrain)
    # The render is decided before any heavy work; the resolved family is what run.json and a resume see.
    found = args.chat_template == "auto"
    args.chat_template = templates.detect(args.partial_pretrain, args.chat_template)
    log(f"chat template: {args.chat_template} "
        + ("(recognised in the model dir)" if found else "(data.chat_template)"))
    parallel.check_sp_heads(args.sp_size, cfg["num_attention_heads"], cfg["num_key_value_heads"],
                            cfg.get("linear_num_key_heads"), cfg.get("linear_num_value_heads"))
    if M.attention_note(cfg):
        log(M.attention_note(cfg))
    world_mesh, dp_sp = parallel.build_meshes(device.type, world_size, args.sp_size, args.fsdp_size)
    dp_size, sp_size = world_size // args.sp_size, args.sp_size
    out = Path(args.default_local_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        log("config: " + json.dumps(vars(args)))

    # --- model: full weights on CPU in the master dtype (LoRA: frozen base, fp32 adapters, the same A on
    # every rank: seeded), then recompute, Ulysses and FSDP2, which moves the shards to the device
    master_dtype = torch.float32 if args.model_dtype in ("fp32", "float32") else torch.bfloat16
    model = M.load_pretrained(args.partial_pretrain, dtype=master_dtype)
    if args.lora_rank > 0:
        lora.apply(model, args.lora_rank, args.lora_alpha, args.target_modules, seed=args.seed)
    # Offloading only means something when the compute device is a GPU (on CPU the weights are there).
    model = parallel.parallelize(model, world_mesh, dp_sp["sp"].get_group(), sp_size,
                                 param_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                 recompute=args.enable_gradient_checkpointing,
                                 cpu_offload=device.type == "cuda" and (args.cpu_offload or args.offload_params
                                                                        or args.optimizer_offload))
    log(f"model: {M.num_params(model) / 1e6:.1f}M parameters, world {world_size} = dp {dp_size} x sp {sp_size}, "
        f"{'hsdp %d x %d, ' % world_mesh.shape if world_mesh.ndim == 2 else ''}{device.type}")
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or only the LoRA adapters
    if args.lora_rank > 0:
        n_trained, n_total = lora.count_trained(model)
        log(f"LoRA r={args.lora_rank}: {fmt_count(n_trained)} of {fmt_count(n_total)} parameters trained")

    # --- data: rank 0 tokenizes (and fills the cache) first, the others then read the cache
    tokenizer = data.load_tokenizer(args.partial_pretrain)
    pad_id = tokenizer.token_to_id("<|endoftext|>") or 0
    keys = data_keys(args)

    def load(files):
        result = None
        for turn in (0, 1):
            if (rank == 0) == (turn == 0):
                result = data.build_samples(files, tokenizer, args.max_length, args.truncation,
                                            cache_dir=out / "data_cache",
                                            tokenizer_path=Path(args.partial_pretrain) / "tokenizer.json",
                                            log=log, **keys)
            dist.barrier()  # (all ranks)
        return result
    train = load(args.train_files)
    val = load(args.val_files) if args.val_files else None
    # data.train_max_samples / val_max_samples (sft_trainer): verl keeps the first N rows, unshuffled
    train = train[:args.train_max_samples] if args.train_max_samples > 0 else train
    val = val[:args.val_max_samples] if val is not None and args.val_max_samples > 0 else val
    # per val turn (the global ids batches.py numbers them with): whether it carries tool calls
    val_calls = torch.from_numpy(np.concatenate([s[3] for s in val])).bool() if val else None
    steps_per_epoch = len(train) // args.train_batch_size
    if steps_per_epoch == 0:
        raise cli.ConfigError(f"data.train_batch_size={args.train_batch_size} exceeds the {len(train)} "
                              "training samples; lower data.train_batch_size.")
    total_steps = steps_per_epoch * args.total_epochs
    stop_at = min(total_steps, args.total_training_steps or total_steps)
    log(f"data: {len(train)} train samples{f', {len(val)} val' if val else ''}; {steps_per_epoch} steps/epoch "
        f"x {args.total_epochs} epochs = {total_steps} steps" + (f", stopping at {stop_at}" if stop_at < total_steps else ""))
    rank_batches = batcher(args, dp_sp, pad_id, device)

    # --- optimizer and schedule
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay, eps=1e-8)
    # sft_trainer's schedule spans trainer.total_training_steps when set; the old one's all epochs (SPEC §2)
    schedule_steps = (args.total_training_steps or total_steps) if args.dialect == cli.CURRENT else total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        schedule_steps, args.warmup_steps_ratio, args.lr_scheduler, warmup_steps=args.lr_warmup_steps,
        min_lr_ratio=args.min_lr_ratio, num_cycles=args.num_cycles))

    # --- resume: model, optimizer, scheduler, RNG and the data position of the latest checkpoint
    pos = dict.fromkeys(checkpoint.POSITION, 0)
    resume = checkpoint.find_resume(out, args.resume_mode, args.resume_from_path)
    if resume is not None:
        pos = checkpoint.load_checkpoint(resume, model, optimizer, scheduler, config=resume_config(args),
                                         lora=lora_spec(args), device=device)
        log(f"resumed from {resume}: step {pos['step']}, epoch {pos['epoch']}, "
            f"batch {pos['next_batch']} of {steps_per_epoch}")
        if pos["step"] >= stop_at:
            log(f"nothing to do: {out} already holds step {pos['step']} of {stop_at}; use a new "
                "trainer.default_local_dir or trainer.resume_mode=disable to train again.")
            dist.destroy_process_group()
            return

    # --- signals: SIGTERM/SIGINT finish the current step, save, and exit (a second SIGINT kills)
    received = []

    def on_signal(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # --- loop: one optimizer step per global batch; pos is where a resume after this step starts
    peak = M.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    report = reporter(args, out, rank, pos["step"], stop_at, log)
    t_start, first_step = time.time(), pos["step"]
    for epoch, indices, after in batches.schedule(len(train), args.train_batch_size, args.seed, args.total_epochs,
                                                  pos["epoch"], pos["next_batch"]):
        if pos["step"] >= stop_at:
            break
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the peak reported is this step's
        train_loss, n_tokens = forward_backward(model, rank_batches(train, indices)[0], world_size)
        grad_norm, lr = update(trained, optimizer, scheduler, args.clip_grad)
        finite = math.isfinite(grad_norm)
        pos.update(step=pos["step"] + 1, epoch=after[0], next_batch=after[1], skipped=pos["skipped"] + (not finite),
                   consecutive_skips=0 if finite else pos["consecutive_skips"] + 1)
        step = pos["step"]
        if not finite:
            log(f"warning: step {step}: non-finite grad norm, update skipped ({pos['skipped']} so far)")
            if pos["consecutive_skips"] >= args.max_consecutive_skips:
                raise TrainingError(f"{pos['consecutive_skips']} consecutive steps had a non-finite gradient norm "
                                    f"(last: step {step}); lower optim.lr or check the data, then resume from the "
                                    "last checkpoint.")
        seq_tokens = sum(len(train[i][0]) for i in indices)  # the whole batch's: every rank knows it
        dt = time.time() - t0
        rec = {"step": step, "epoch": epoch, "train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm,
               "train/tokens": int(seq_tokens), "train/trained_tokens": int(n_tokens),
               "train/tokens_per_s_per_gpu": seq_tokens / dt / world_size, "train/skipped_steps": pos["skipped"]}
        if peak:
            rec["train/mfu"] = M.flops_per_token(cfg, seq_tokens / args.train_batch_size) * seq_tokens / dt / world_size / peak
            rec["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        last = step == stop_at
        if val is not None and (last or (args.test_freq > 0 and step % args.test_freq == 0)):
            rec.update(evaluate(model, rank_batches(val, np.arange(len(val)), max_tokens=None)[0], val_calls))
        stopping = bool(all_sum(torch.tensor(float(bool(received)), device=device)))  # (all ranks) agree to stop together
        saved = None  # the checkpoint written after this step, if any
        if last or stopping or (args.save_freq > 0 and step % args.save_freq == 0):
            saved = checkpoint.save_checkpoint(out, model, optimizer, scheduler, pos, cfg=cfg, config=resume_config(args),
                                               base_model=args.partial_pretrain, lora=lora_spec(args),
                                               keep=args.max_ckpt_to_keep, device=device)
        report(rec, saved)
        if stopping:
            log(f"stopped by signal after step {step}; rerun the same command to resume from {saved}.")
            dist.destroy_process_group()
            return
    lora_note = f" of LoRA r={args.lora_rank} alpha={args.lora_alpha}" if args.lora_rank > 0 else ""
    resumed = f" (resumed at step {first_step}, now at {pos['step']})" if first_step else ""
    log(f"done: {pos['step'] - first_step} steps{lora_note}{resumed} in {fmt_time(time.time() - t_start)}; "
        f"checkpoints in {out}")
    dist.destroy_process_group()


def preflight(args, world_size):
    """`python train.py --preflight=WORLD_SIZE ...`: in one process, before a launcher starts the workers,
    everything a user can get wrong in a run of world_size processes: keys and values, batch arithmetic,
    files, the model dir's config, the chat template, sp size against the heads, and every data row,
    tokenised into the data cache (which rank 0 then reads instead of tokenising again). A user error
    then stops the job with one line here, instead of in several workers at once, where one rank's
    error leaves the others' collectives to fail with their own tracebacks."""
    cli.validate(args, world_size)
    cfg = M.read_config(args.partial_pretrain)
    args.chat_template = templates.detect(args.partial_pretrain, args.chat_template)  # as run() resolves it
    parallel.check_sp_heads(args.sp_size, cfg["num_attention_heads"], cfg["num_key_value_heads"],
                            cfg.get("linear_num_key_heads"), cfg.get("linear_num_value_heads"))
    tokenizer = data.load_tokenizer(args.partial_pretrain)
    keys = data_keys(args)
    n_train = 0
    for files in (args.train_files, args.val_files):
        if files:
            samples = data.build_samples(files, tokenizer, args.max_length, args.truncation,
                                         cache_dir=Path(args.default_local_dir) / "data_cache",
                                         tokenizer_path=Path(args.partial_pretrain) / "tokenizer.json",
                                         log=functools.partial(print, flush=True), **keys)
            n_train = n_train or len(samples)
    if args.train_max_samples > 0:  # as run() keeps the first N
        n_train = min(n_train, args.train_max_samples)
    if n_train < args.train_batch_size:
        raise cli.ConfigError(f"data.train_batch_size={args.train_batch_size} exceeds the {n_train} "
                              "training samples; lower data.train_batch_size.")
    checkpoint.find_resume(Path(args.default_local_dir), args.resume_mode, args.resume_from_path)  # a broken pointer


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # --preflight=N is ours, not a verl key: checks for a run of N processes, then exits (see preflight)
    world = [a.split("=", 1)[1] for a in argv if a.startswith("--preflight=")]
    argv = [a for a in argv if not a.startswith("--preflight=")]
    try:
        if world:
            preflight(cli.parse_args(argv), int(world[-1]))
        else:
            run(cli.parse_args(argv))
    except (cli.ConfigError, TrainingError, checkpoint.CheckpointError, data.DataError, M.ModelError,
            parallel.ParallelError, templates.TemplateError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before the stop-and-save handler is set, or a second one: out at once
        if int(os.environ.get("RANK", 0)) == 0:
            print("interrupted without saving this step; rerun the same command to resume from the last "
                  "checkpoint, if any.", file=sys.stderr, flush=True)
        sys.exit(130)  # 128 + SIGINT, the shell's convention for an interrupted command


if __name__ == "__main__":
    main()
