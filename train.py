"""Multi-turn SFT of Qwen2.5 / Qwen3 dense models (full or LoRA) with verl's fsdp_sft_trainer command line.

    torchrun --nproc_per_node=2 train.py data.train_files=... model.partial_pretrain=... \
        ulysses_sequence_parallel_size=2 use_remove_padding=true
    python train.py ...        # one process, no launcher

Reads top to bottom: command line -> distributed init -> model -> optimizer -> data -> loop -> save.
"""
import argparse
import difflib
import functools
import importlib
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

import checkpoint
import data
import model as M
import parallel
import plot
import templates


class ConfigError(Exception):
    """A bad flag or combination of flags; the message names the key and the fix."""


class TrainingError(Exception):
    """The run cannot usefully go on (e.g. repeated non-finite gradients); the message says why."""


# --------------------------------------------------------------------------- command line

def boolean(s):
    v = str(s).strip().lower()
    if v in ("true", "1", "yes", "y", "on"):
        return True
    if v in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{s!r} is not a boolean (use true/false)")


def optional(kind):
    """null / None -> None, else kind(s)."""
    def parse(s):
        return None if str(s).strip() in ("null", "None", "none", "~", "") else kind(s)
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def str_list(s):
    """['a', "b"], [a,b], a,b or a -> ['a', 'b'] (Hydra-style lists as they arrive from a shell)."""
    s = str(s).strip()
    if s.startswith("[") != s.endswith("]"):
        raise argparse.ArgumentTypeError(f"{s!r} is not a list (use [a,b])")
    s = s.strip("[]")
    return [x.strip().strip("'\"") for x in s.split(",") if x.strip()]


def float_list(s):
    try:
        return [float(x) for x in str_list(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a list of numbers (use [0.9,0.95])") from None


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False, add_help=True)
    a = p.add_argument
    # data
    a("--data.train_files", dest="train_files", type=str_list, default=None, help="parquet file(s) or a directory (required)")
    a("--data.val_files", dest="val_files", type=optional(str_list), default=None, help="validation parquet file(s)")
    a("--data.train_batch_size", dest="train_batch_size", type=int, default=256, help="samples per optimizer step, whole job")
    a("--data.micro_batch_size_per_gpu", "--data.micro_batch_size", dest="micro_batch_size_per_gpu", type=int, default=4,
      help="samples per forward/backward per rank")
    a("--data.max_length", dest="max_length", type=int, default=1024, help="max tokens per sample")
    a("--data.truncation", dest="truncation", choices=["error", "left", "right"], default="error")
    a("--data.multiturn.enable", dest="multiturn", type=boolean, default=False, help="messages-column data")
    a("--data.multiturn.messages_key", dest="messages_key", default="messages")
    a("--data.multiturn.tools_key", dest="tools_key", default="tools")
    a("--data.multiturn.enable_thinking_key", dest="enable_thinking_key", default="enable_thinking",
      help="per-row bool column (missing/null = true); false: Qwen3's empty think block on the last turn is not trained")
    a("--data.chat_template", dest="chat_template", default="auto", choices=("auto",) + templates.FAMILIES,
      help="auto: the official template the model dir ships, recognised by its exact text")
    a("--data.prompt_key", dest="prompt_key", default="question", help="single-turn prompt column")
    a("--data.response_key", dest="response_key", default="answer", help="single-turn response column")
    a("--data.prompt_dict_keys", dest="prompt_dict_keys", type=optional(str_list), default=None)
    a("--data.response_dict_keys", dest="response_dict_keys", type=optional(str_list), default=None)
    a("--data.use_dynamic_bsz", dest="use_dynamic_bsz", type=boolean, default=False,
      help="micro-batches packed up to a token budget instead of a fixed sample count")
    a("--data.max_token_len_per_gpu", dest="max_token_len_per_gpu", type=int, default=16384,
      help="token budget of one micro-batch per GPU (x sp size per sp group) with use_dynamic_bsz")
    a("--data.balance_dp_token", dest="balance_dp_token", type=boolean, default=False,
      help="accepted; the loss is always the global token mean")
    # model
    a("--model.partial_pretrain", dest="partial_pretrain", default=None, help="HF model dir (required)")
    a("--model.strategy", dest="strategy", default="fsdp2", choices=["fsdp", "fsdp2"], help="both mean FSDP2 fully_shard")
    a("--model.fsdp_config.model_dtype", dest="model_dtype", default="fp32", choices=["fp32", "float32", "bf16", "bfloat16"],
      help="master weight dtype")
    a("--model.fsdp_config.cpu_offload", dest="cpu_offload", type=boolean, default=False)
    a("--model.fsdp_config.offload_params", dest="offload_params", type=boolean, default=False)
    a("--model.fsdp_config.fsdp_size", dest="fsdp_size", type=int, default=-1,
      help="ranks that shard each parameter: -1 = all (FSDP); fewer = HSDP, replicated across groups (GPUs per node)")
    a("--model.fsdp_config.wrap_policy.min_num_params", dest="min_num_params", type=int, default=0,
      help="accepted; every decoder layer is its own FSDP unit")
    a("--model.enable_gradient_checkpointing", dest="enable_gradient_checkpointing", type=boolean, default=True)
    a("--model.trust_remote_code", dest="trust_remote_code", type=boolean, default=False)
    a("--model.external_lib", dest="external_lib", type=optional(str), default=None)
    a("--model.use_liger", dest="use_liger", type=boolean, default=False)
    a("--model.lora_rank", dest="lora_rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    a("--model.lora_alpha", dest="lora_alpha", type=int, default=16, help="LoRA scaling alpha / rank")
    a("--model.target_modules", dest="target_modules", type=str_list, default=["all-linear"],
      help="all-linear (q/k/v/o/gate/up/down of every layer) or a list such as [q_proj,v_proj]")
    # optimizer
    a("--optim.lr", dest="lr", type=float, default=1e-5)
    a("--optim.betas", dest="betas", type=float_list, default=[0.9, 0.95])
    a("--optim.weight_decay", dest="weight_decay", type=float, default=0.01)
    a("--optim.clip_grad", dest="clip_grad", type=float, default=1.0)
    a("--optim.warmup_steps_ratio", "--optim.lr_warmup_steps_ratio", dest="warmup_steps_ratio", type=float, default=0.1)
    a("--optim.lr_scheduler", dest="lr_scheduler", default="cosine", choices=["cosine", "wsd"])
    # parallelism
    a("--ulysses_sequence_parallel_size", dest="sp_size", type=int, default=1)
    a("--use_remove_padding", dest="use_remove_padding", type=boolean, default=False, help="pack samples (needed for sp > 1)")
    # trainer
    a("--trainer.default_local_dir", dest="default_local_dir", default=None, help="default checkpoints/{project}/{experiment}")
    a("--trainer.project_name", dest="project_name", default="gsm8k-sft")
    a("--trainer.experiment_name", dest="experiment_name", default="test")
    a("--trainer.total_epochs", dest="total_epochs", type=int, default=4)
    a("--trainer.total_training_steps", dest="total_training_steps", type=optional(int), default=None)
    a("--trainer.logger", dest="logger", type=str_list, default=["console"])
    a("--trainer.seed", dest="seed", type=int, default=1)
    a("--trainer.save_freq", dest="save_freq", type=int, default=-1)
    a("--trainer.test_freq", dest="test_freq", type=int, default=-1)
    a("--trainer.max_ckpt_to_keep", dest="max_ckpt_to_keep", type=optional(int), default=None)
    a("--trainer.max_consecutive_skips", dest="max_consecutive_skips", type=int, default=5,
      help="stop after this many consecutive non-finite grad norms (ours, not verl's)")
    a("--trainer.resume_mode", dest="resume_mode", default="auto", choices=["auto", "disable", "resume_path"])
    a("--trainer.resume_from_path", dest="resume_from_path", type=optional(str), default=None)
    a("--trainer.nnodes", dest="nnodes", type=int, default=1, help="accepted; torchrun decides")
    a("--trainer.n_gpus_per_node", dest="n_gpus_per_node", type=int, default=8, help="accepted; torchrun decides")
    a("--trainer.default_hdfs_dir", dest="default_hdfs_dir", type=optional(str), default=None, help="accepted, unused")
    a("--trainer.device", dest="device", default="cuda", help="cuda (when available) or cpu")
    return p


def normalize_argv(argv):
    """key=value and +key=value (Hydra) -> --key=value; --key value and --key=value pass through."""
    out, expect_value = [], False
    for tok in argv:
        if expect_value or tok.startswith("-"):
            out.append(tok)
            expect_value = tok.startswith("--") and "=" not in tok and tok not in ("--help",)
        elif "=" in tok:
            out.append("--" + tok.lstrip("+"))
        else:
            raise ConfigError(f"argument {tok!r} is not key=value; write e.g. data.max_length=2048.")
    return out


def parse_args(argv):
    parser = build_parser()
    argv = normalize_argv(argv)
    known = {s for act in parser._actions for s in act.option_strings}
    for tok in argv:
        key = tok.split("=", 1)[0]
        if key.startswith("--") and key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0][2:]}?)" if close else ""
            raise ConfigError(f"unknown key {key[2:]!r}{hint}; see python train.py --help for the accepted keys.")

    def error(message):  # argparse's own errors (bad values) become one ConfigError sentence
        raise ConfigError(message.replace("argument --", "key ") + ".")
    parser.error = error
    args = parser.parse_args(argv)
    if args.default_local_dir is None:
        args.default_local_dir = f"checkpoints/{args.project_name}/{args.experiment_name}"
    return args


def validate(args, world_size):
    """Flag combinations that cannot work, each as one sentence (before any heavy work)."""
    if not args.train_files:
        raise ConfigError("data.train_files is required; pass data.train_files=/path/train.parquet.")
    if not args.partial_pretrain:
        raise ConfigError("model.partial_pretrain is required; pass a Hugging Face model dir.")
    for key, value in (("data.train_batch_size", args.train_batch_size), ("data.max_length", args.max_length),
                       ("trainer.total_epochs", args.total_epochs), ("data.max_token_len_per_gpu", args.max_token_len_per_gpu)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1.")
    if args.lr < 0 or args.clip_grad <= 0 or not 0 <= args.warmup_steps_ratio <= 1:
        raise ConfigError("optim.lr must be >= 0, optim.clip_grad > 0 and optim.warmup_steps_ratio in [0, 1].")
    if args.lora_rank < 0:
        raise ConfigError(f"model.lora_rank={args.lora_rank} must be >= 0 (0 = full fine-tuning).")
    if args.lora_rank > 0 and args.lora_alpha <= 0:
        raise ConfigError(f"model.lora_alpha={args.lora_alpha} must be > 0 (the LoRA scale is alpha / rank).")
    unknown = [t for t in args.target_modules if t not in M.LORA_TARGETS + ("all-linear",)]
    if args.lora_rank > 0 and (unknown or not args.target_modules):
        what = f"has unknown module(s) {unknown}" if unknown else "is empty"
        raise ConfigError(f"model.target_modules {what}; use all-linear or a list of {', '.join(M.LORA_TARGETS)}.")
    if args.use_liger:
        raise ConfigError("model.use_liger=true is not supported; the fused LM-head loss is built in, remove it.")
    if args.trust_remote_code or args.external_lib:
        raise ConfigError("model.trust_remote_code / model.external_lib are not supported; this trainer "
                          "builds Qwen2/Qwen3 itself, remove them.")
    if not set(args.logger) <= {"console", "wandb", "tensorboard"}:
        raise ConfigError(f"trainer.logger={args.logger} has an unknown logger; use console, wandb or tensorboard.")
    for name, module in (("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")):
        if name in args.logger:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(f"trainer.logger includes {name} but it is not installed; "
                                  f"pip install {name}, or drop it from trainer.logger.") from None
    if args.sp_size > 1 and not args.use_remove_padding:
        raise ConfigError("ulysses_sequence_parallel_size > 1 needs use_remove_padding=true (packed sequences).")
    if args.sp_size < 1 or world_size % args.sp_size:
        raise ConfigError(f"ulysses_sequence_parallel_size={args.sp_size} must divide the number of "
                          f"processes ({world_size}).")
    if args.use_dynamic_bsz and not args.use_remove_padding:
        raise ConfigError("data.use_dynamic_bsz=true needs use_remove_padding=true (token budgets pack samples).")
    if args.use_dynamic_bsz and args.max_length > args.max_token_len_per_gpu * args.sp_size:
        raise ConfigError(f"data.max_length={args.max_length} exceeds the micro-batch token budget "
                          f"{args.max_token_len_per_gpu * args.sp_size} (data.max_token_len_per_gpu x sp size); "
                          "raise data.max_token_len_per_gpu or lower data.max_length.")
    try:
        parallel.check_fsdp_size(args.fsdp_size, world_size)
    except parallel.ParallelError as e:
        raise ConfigError(str(e)) from None
    dp = world_size // args.sp_size
    if args.train_batch_size % dp:
        raise ConfigError(f"data.train_batch_size={args.train_batch_size} is not divisible by the "
                          f"data-parallel size {dp} (= {world_size} processes / sp {args.sp_size}).")
    if args.micro_batch_size_per_gpu < 1 or (args.train_batch_size // dp) % args.micro_batch_size_per_gpu:
        raise ConfigError(f"data.micro_batch_size_per_gpu={args.micro_batch_size_per_gpu} must divide the "
                          f"per-rank batch {args.train_batch_size // dp} (train_batch_size / dp size {dp}).")
    if args.resume_mode == "resume_path" and not args.resume_from_path:
        raise ConfigError("trainer.resume_mode=resume_path needs trainer.resume_from_path=global_step_N dir.")
    for f in args.train_files + (args.val_files or []):
        if not Path(f).exists():
            raise ConfigError(f"data file {f} does not exist; check data.train_files / data.val_files.")
    if not (Path(args.partial_pretrain) / "config.json").is_file():
        raise ConfigError(f"model.partial_pretrain={args.partial_pretrain} has no config.json; point it at a "
                          "Hugging Face model directory (config.json, *.safetensors, tokenizer.json).")


# --------------------------------------------------------------------------- helpers

def lr_lambda(total_steps, warmup_ratio, kind):
    """Multiplier of optim.lr after `step` updates. Warmup starts above 0 (verl's first update is 0)."""
    warmup = int(total_steps * warmup_ratio)
    decay_start = warmup if kind == "cosine" else max(warmup, int(total_steps * 0.9))  # wsd: stable until 90%

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total_steps - decay_start)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def make_loggers(args, out, resolved):
    """Functions rec -> None for the loggers asked for besides the console (rank 0 only)."""
    loggers = []
    if "wandb" in args.logger:
        import wandb
        run = wandb.init(project=args.project_name, name=args.experiment_name, config=resolved)
        loggers.append(lambda rec: run.log(rec, step=rec["step"]))
    if "tensorboard" in args.logger:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        loggers.append(lambda rec: [writer.add_scalar(k, v, rec["step"]) for k, v in rec.items() if k != "step"])
    return loggers


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_count(n):
    """8.8M, 7.6B, 52.3K: parameter counts for the log."""
    return next(f"{n / d:.1f}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= d or d == 1)


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def loss_sum(model, batch, args, sp_rank, pad_id, device):
    """Summed CE over this rank's share of one micro-batch (its sp slice of the packed stream)."""
    if args.sp_size > 1:
        batch = parallel.sp_slice(batch, sp_rank, args.sp_size, pad_id)
    b = to_device(batch, device)
    return model(b["input_ids"], b["cu_seqlens"], b["position_ids"], b["max_seqlen"], labels=b["labels"])


def build_model(args, device, world_mesh, sp_group, compute_dtype=None):
    """Full weights on CPU in the master dtype, then Ulysses and FSDP2 (which moves the shards to device).
    compute_dtype defaults to bf16 on GPU and fp32 on CPU (tests pass bf16 to run the GPU recipe on CPU)."""
    master_dtype = torch.float32 if args.model_dtype in ("fp32", "float32") else torch.bfloat16
    model = M.load_pretrained(args.partial_pretrain, dtype=master_dtype)
    if args.lora_rank > 0:  # frozen base in the master dtype, fp32 adapters (same A on every rank: seeded)
        M.apply_lora(model, args.lora_rank, args.lora_alpha, args.target_modules, seed=args.seed)
    model.model.gradient_checkpointing = args.enable_gradient_checkpointing
    parallel.apply_ulysses(model, sp_group, args.sp_size)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Offloading only means something when the compute device is a GPU (on CPU the weights are there).
    offload = (args.cpu_offload or args.offload_params) and device.type == "cuda"
    return parallel.apply_fsdp(model, world_mesh, param_dtype=compute_dtype, cpu_offload=offload)


def batch_layout(args, dp_rank, dp_size, pad_id):
    """How data.micro_batches cuts this rank's share of a batch: fixed-size micro-batches, or token
    budgets (use_dynamic_bsz) of max_token_len_per_gpu x sp size per micro-batch, since an sp group
    splits each packed stream sp_size ways and each GPU still holds max_token_len_per_gpu."""
    return dict(dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=args.micro_batch_size_per_gpu, pad_id=pad_id,
                packed=args.use_remove_padding,
                max_tokens=args.max_token_len_per_gpu * args.sp_size if args.use_dynamic_bsz else None)


def forward_backward(model, micro, args, ctx):
    """Accumulate the gradient of one optimizer step over this rank's micro-batches.

    The step's loss is (sum of CE over every trained token of the step, all ranks) / N, with N
    counted once per dp rank (the sp ranks of a group share samples). Each rank backpropagates its
    local CE sum scaled by world_size / N: FSDP averages gradients over all world_size ranks, and
    the local sums over all ranks (sp slices are disjoint) add up to exactly the step's total CE.
    Returns (step loss, N).
    """
    device = ctx["device"]
    n_local = sum(int((b["labels"] != -100).sum()) for b in micro)
    n_tokens = float(all_sum(torch.tensor(float(n_local), device=device), ctx["dp_group"]))  # (all ranks)
    scale = ctx["world_size"] / max(n_tokens, 1.0)
    ce = torch.zeros((), dtype=torch.float64, device=device)
    for i, b in enumerate(micro):
        # Reduce-scatter gradients once per step, after the last micro-batch: the others accumulate
        # unsharded gradients locally (in FSDP's reduce dtype, fp32) instead of communicating. Costs
        # one full fp32 gradient per rank (2 GB for 0.5B parameters), saves n_micro - 1 collectives.
        model.set_requires_gradient_sync(i == len(micro) - 1)
        loss = loss_sum(model, b, args, ctx["sp_rank"], ctx["pad_id"], device)
        (loss * scale).backward()
        ce += loss.detach().double()
    return float(all_sum(ce)) / max(n_tokens, 1.0), n_tokens  # (all ranks)


def all_sum(x, group=None):
    t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else x.dtype).clone()
    dist.all_reduce(t, group=group)  # (all ranks of group)
    return t


def evaluate(model, samples, args, ctx):
    """val/loss: global token mean over the whole val set, in fixed-size micro-batches (data.py
    gives every rank the same number: FSDP's collectives must match)."""
    micro, _ = data.micro_batches(samples, np.arange(len(samples)), **{**ctx["layout"], "max_tokens": None})
    ce, tokens = torch.zeros((), dtype=torch.float64, device=ctx["device"]), 0
    model.eval()
    with torch.no_grad():
        for batch in micro:
            tokens += int((batch["labels"] != -100).sum())
            ce += loss_sum(model, batch, args, ctx["sp_rank"], ctx["pad_id"], ctx["device"]).double()
    model.train()
    ce = all_sum(ce)  # (all ranks) sp slices are disjoint, so each token's CE is counted once
    tokens = all_sum(torch.tensor(float(tokens), device=ctx["device"]), ctx["dp_group"])  # (all ranks) once per sp group
    return float(ce / tokens.clamp(min=1))


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
    validate(args, world_size)
    log = functools.partial(print, flush=True) if rank == 0 else (lambda *a, **k: None)
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
    parallel.check_sp_size(args.sp_size, world_size, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    world_mesh, dp_sp = parallel.build_meshes(device.type, world_size, args.sp_size, args.fsdp_size)
    dp_size, sp_size = world_size // args.sp_size, args.sp_size
    dp_rank, sp_rank = dp_sp["dp"].get_local_rank(), dp_sp["sp"].get_local_rank()
    dp_group, sp_group = dp_sp["dp"].get_group(), dp_sp["sp"].get_group()
    out = Path(args.default_local_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {k: v for k, v in vars(args).items()}
        (out / "run.json").write_text(json.dumps(resolved, indent=2) + "\n")
        log("config: " + json.dumps(resolved))

    # --- model: full weights on CPU, then Ulysses + FSDP2 shard them onto the device
    model = build_model(args, device, world_mesh, sp_group)
    log(f"model: {M.num_params(model) / 1e6:.1f}M parameters, world {world_size} = dp {dp_size} x sp {sp_size}, "
        f"{'hsdp %d x %d, ' % world_mesh.shape if world_mesh.ndim == 2 else ''}{device.type}")
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or only the LoRA adapters
    if args.lora_rank > 0:
        n_trained, n_total = M.count_trained(model)
        log(f"LoRA r={args.lora_rank}: {fmt_count(n_trained)} of {fmt_count(n_total)} parameters trained")

    # --- data: rank 0 tokenizes (and fills the cache) first, the others then read the cache
    tokenizer = data.load_tokenizer(args.partial_pretrain)
    pad_id = tokenizer.token_to_id("<|endoftext|>") or 0
    keys = dict(multiturn=args.multiturn, messages_key=args.messages_key, tools_key=args.tools_key,
                prompt_key=args.prompt_key, response_key=args.response_key,
                prompt_dict_keys=args.prompt_dict_keys, response_dict_keys=args.response_dict_keys,
                chat_template=args.chat_template, enable_thinking_key=args.enable_thinking_key)

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
    steps_per_epoch = len(train) // args.train_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"data.train_batch_size={args.train_batch_size} exceeds the {len(train)} training "
                          "samples; lower data.train_batch_size.")
    total_steps = steps_per_epoch * args.total_epochs
    lengths = np.array([len(ids) for ids, _ in train])
    stop_at = min(total_steps, args.total_training_steps or total_steps)
    log(f"data: {len(train)} train samples{f', {len(val)} val' if val else ''}; {steps_per_epoch} steps/epoch "
        f"x {args.total_epochs} epochs = {total_steps} steps" + (f", stopping at {stop_at}" if stop_at < total_steps else ""))

    # --- optimizer and schedule
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, args.warmup_steps_ratio, args.lr_scheduler))

    # --- resume: model, optimizer, scheduler, RNG and the data position of the latest checkpoint
    position = dict(step=0, epoch=0, next_batch=0, skipped=0, consecutive_skips=0)
    resume = checkpoint.find_resume(args)
    if resume is not None:
        position = checkpoint.load_checkpoint(resume, model, optimizer, scheduler, args, rank, device)
        log(f"resumed from {resume}: step {position['step']}, epoch {position['epoch']}, "
            f"batch {position['next_batch']} of {steps_per_epoch}")
        if position["step"] >= stop_at:
            log(f"nothing to do: {out} already holds step {position['step']} of {stop_at}; use a new "
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

    # --- loop
    ctx = dict(device=device, pad_id=pad_id, sp_rank=sp_rank, dp_group=dp_group, world_size=world_size,
               layout=batch_layout(args, dp_rank, dp_size, pad_id))
    peak = M.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    metrics_file = open(out / "metrics.jsonl", "a") if rank == 0 else None
    plotting = rank == 0  # rank 0 draws loss.png at each save; off once it could not (said once, not per save)
    loggers = make_loggers(args, out, vars(args)) if rank == 0 else []
    step, skipped, consecutive = position["step"], position["skipped"], position["consecutive_skips"]
    t_start, first_step = time.time(), position["step"]
    for epoch in range(position["epoch"], args.total_epochs):
        batches = data.epoch_batches(len(train), args.train_batch_size, args.seed, epoch)
        for b in range(position["next_batch"] if epoch == position["epoch"] else 0, len(batches)):
            if step >= stop_at:
                break
            t0 = time.time()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # the peak reported is this step's
            micro, samples = data.micro_batches(train, batches[b], lengths=lengths, **ctx["layout"])  # this rank's
            train_loss, n_tokens = forward_backward(model, micro, args, ctx)
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, args.clip_grad)  # (all ranks)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if math.isfinite(grad_norm):
                optimizer.step()
                consecutive = 0
            else:
                skipped, consecutive = skipped + 1, consecutive + 1
                log(f"warning: step {step + 1}: non-finite grad norm, update skipped ({skipped} so far)")
                if consecutive >= args.max_consecutive_skips:
                    raise TrainingError(f"{consecutive} consecutive steps had a non-finite gradient norm (last: "
                                        f"step {step + 1}); lower optim.lr or check the data, then resume from the "
                                        "last checkpoint.")
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            seq_tokens = float(all_sum(torch.tensor(float(sum(len(s[0]) for s in samples)), device=device), dp_group))
            dt = time.time() - t0
            rec = {"step": step, "epoch": epoch, "train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "train/tokens": int(seq_tokens), "train/trained_tokens": int(n_tokens),
                   "train/tokens_per_s_per_gpu": seq_tokens / dt / world_size, "train/skipped_steps": skipped}
            line = (f"step {step}/{stop_at} | loss {train_loss:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | "
                    f"{rec['train/tokens_per_s_per_gpu']:,.0f} tok/s/gpu")
            if peak:
                mean_len = seq_tokens / args.train_batch_size
                rec["train/mfu"] = M.flops_per_token(cfg, mean_len) * seq_tokens / dt / world_size / peak
                rec["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                line += f" | mfu {rec['train/mfu']:.1%} | mem {rec['train/peak_mem_gib']:.1f}G"
            last = step == stop_at
            if val is not None and (last or (args.test_freq > 0 and step % args.test_freq == 0)):
                rec["val/loss"] = evaluate(model, val, args, ctx)
                line += f" | val_loss {rec['val/loss']:.4f}"
            line += f" | eta {fmt_time((time.time() - t_start) / (step - first_step) * (stop_at - step))}"
            log(line, flush=True)
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            for log_to in loggers:
                log_to(rec)
            stopping = bool(all_sum(torch.tensor(float(bool(received)))))  # (all ranks) agree to stop together
            if last or stopping or (args.save_freq > 0 and step % args.save_freq == 0):
                nxt = (epoch, b + 1) if b + 1 < len(batches) else (epoch + 1, 0)  # where a resume starts
                resume_at = dict(step=step, epoch=nxt[0], next_batch=nxt[1], skipped=skipped,
                                 consecutive_skips=consecutive)
                path = checkpoint.save_checkpoint(model, optimizer, scheduler, cfg, args, resume_at, rank, device)
                png = plot.plot_metrics(out, f"{args.project_name}/{args.experiment_name}", log) if plotting else None
                plotting = png is not None
                log(f"saved {path}" + (f"; loss curve {png}" if png else ""))
            if stopping:
                log(f"stopped by signal after step {step}; rerun the same command to resume from {path}.")
                dist.destroy_process_group()
                return
    lora = f" of LoRA r={args.lora_rank} alpha={args.lora_alpha}" if args.lora_rank > 0 else ""
    resumed = f" (resumed at step {first_step}, now at {step})" if first_step else ""
    log(f"done: {step - first_step} steps{lora}{resumed} in {fmt_time(time.time() - t_start)}; checkpoints in {out}")
    dist.destroy_process_group()


def preflight(args, world_size):
    """`python train.py --preflight=WORLD_SIZE ...`: in one process, before a launcher starts the workers,
    everything a user can get wrong in a run of world_size processes: keys and values, batch arithmetic,
    files, the model dir's config, the chat template, sp size against the heads, and every data row,
    tokenised into the data cache (which rank 0 then reads instead of tokenising again). A user error
    then stops the job with one line here, instead of in several workers at once, where one rank's
    error leaves the others' collectives to fail with their own tracebacks."""
    validate(args, world_size)
    cfg = M.read_config(args.partial_pretrain)
    args.chat_template = templates.detect(args.partial_pretrain, args.chat_template)  # as run() resolves it
    parallel.check_sp_size(args.sp_size, world_size, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    tokenizer = data.load_tokenizer(args.partial_pretrain)
    keys = dict(multiturn=args.multiturn, messages_key=args.messages_key, tools_key=args.tools_key,
                prompt_key=args.prompt_key, response_key=args.response_key,
                prompt_dict_keys=args.prompt_dict_keys, response_dict_keys=args.response_dict_keys,
                chat_template=args.chat_template, enable_thinking_key=args.enable_thinking_key)
    n_train = 0
    for files in (args.train_files, args.val_files):
        if files:
            samples = data.build_samples(files, tokenizer, args.max_length, args.truncation,
                                         cache_dir=Path(args.default_local_dir) / "data_cache",
                                         tokenizer_path=Path(args.partial_pretrain) / "tokenizer.json",
                                         log=functools.partial(print, flush=True), **keys)
            n_train = n_train or len(samples)
    if n_train < args.train_batch_size:
        raise ConfigError(f"data.train_batch_size={args.train_batch_size} exceeds the {n_train} training "
                          "samples; lower data.train_batch_size.")
    checkpoint.find_resume(args)  # a broken resume pointer or path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # --preflight=N is ours, not a verl key: checks for a run of N processes, then exits (see preflight)
    world = [a.split("=", 1)[1] for a in argv if a.startswith("--preflight=")]
    argv = [a for a in argv if not a.startswith("--preflight=")]
    try:
        if world:
            preflight(parse_args(argv), int(world[-1]))
        else:
            run(parse_args(argv))
    except (ConfigError, TrainingError, checkpoint.CheckpointError, data.DataError, M.ModelError,
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
