"""Multi-turn SFT of Qwen2.5 / Qwen3 dense models (full or LoRA) with verl's fsdp_sft_trainer or sft_trainer command line.

    torchrun --nproc_per_node=2 train.py data.train_files=... model.partial_pretrain=... \
        ulysses_sequence_parallel_size=2 use_remove_padding=true
    python train.py ...        # one process, no launcher
    torchrun ... train.py model.path=... engine.ulysses_sequence_parallel_size=2 ...   # verl's current sft_trainer keys

Reads top to bottom: command line -> distributed init -> model -> optimizer -> data -> loop -> save.
"""
import argparse
import difflib
import functools
import hashlib
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

import batches
import checkpoint
import data
import lora
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


# The two command lines train.py reads: verl's old trainer (v0.4.x, the reference job's) and its
# current one (verl removed fsdp_sft_trainer in Feb 2026, PR #5382). Keys that only one of them has
# decide the defaults; keys both have keep whichever the command is otherwise written in.
OLD, CURRENT = "fsdp_sft_trainer", "sft_trainer"
KWARGS = "--data.apply_chat_template_kwargs"


def yaml_scalar(s):
    """A value as Hydra reads a scalar: true/false, null, an int, a float, else the (unquoted) string."""
    s = str(s).strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    if s in ("null", "None", "none", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def scalar_dict(s):
    """{key: value, ...} (Hydra's dict form, values as yaml_scalar) -> dict; {} -> {}."""
    s = str(s).strip()
    if not (s.startswith("{") and s.endswith("}")):
        raise argparse.ArgumentTypeError(f"{s!r} is not a dict (use {{enable_thinking: false}})")
    out = {}
    for item in filter(str.strip, s[1:-1].split(",")):
        k, sep, v = item.partition(":")
        if not sep or not k.strip():
            raise argparse.ArgumentTypeError(f"{s!r} is not a dict of key: value items")
        out[k.strip().strip("'\"")] = yaml_scalar(v)
    return out


def build_parser():
    """Every key of both dialects, in three --help groups. Each option string of one dialect only is in
    p.dialect_of; p.defaults[dialect] maps every dest to its default in that dialect. The old trainer's
    defaults are today's (SPEC §2); the current trainer's come from verl's config files
    (verl/trainer/config/sft_trainer_engine.yaml, model/hf_model.yaml, engine/fsdp.yaml, optim/fsdp.yaml),
    cited beside each key as `yaml: file`."""
    p = argparse.ArgumentParser(usage="[torchrun ...] train.py key=value ...", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, add_help=True)
    p.dialect_of, p.defaults = {}, {OLD: {}, CURRENT: {}}

    def adder(title, dialect):
        group = p.add_argument_group(title)

        def add(*names, current=None, **kw):
            dest, default = kw["dest"], kw.get("default")
            for d in (OLD, CURRENT):
                if dialect in (None, d):
                    p.defaults[d][dest] = current if d == CURRENT and current is not None else default
            shown = f"default {default!r}" + (f"; {CURRENT}: {current!r}" if current is not None else "")
            kw["help"] = (kw.get("help", "") + f" ({shown})").strip().replace("%", "%%")
            p.dialect_of.update({n: dialect for n in names if dialect})
            return group.add_argument(*names, **kw)
        return add
    both = adder("keys of both dialects (default: the old trainer's; sft_trainer: the current one's where it differs)", None)
    old = adder(f"verl {OLD} keys (torchrun -m verl.trainer.{OLD}, verl before Feb 2026: the reference job)", OLD)
    cur = adder(f"verl {CURRENT} keys (torchrun -m verl.trainer.{CURRENT}, current verl)", CURRENT)

    # --- both: data
    both("--data.train_files", dest="train_files", type=str_list, default=None,
         help="parquet / .jsonl / .json file(s) or a directory (required)")
    both("--data.val_files", dest="val_files", type=optional(str_list), default=None, help="validation file(s)")
    both("--data.train_batch_size", dest="train_batch_size", type=int, default=256, help="samples per optimizer step, whole job")
    both("--data.micro_batch_size_per_gpu", dest="micro_batch_size_per_gpu", type=int, default=4,
         help="samples per forward/backward per rank (without use_dynamic_bsz)")
    both("--data.max_length", dest="max_length", type=int, default=1024, help="max tokens per sample")
    both("--data.truncation", dest="truncation", choices=["error", "left", "right"], default="error")
    both("--data.chat_template", dest="chat_template", default="auto", choices=("auto",) + templates.FAMILIES,
         help="ours: auto = the official template the model dir ships, recognised by its exact text")
    # yaml: sft_trainer_engine.yaml data.use_dynamic_bsz True, data.max_token_len_per_gpu 8192
    both("--data.use_dynamic_bsz", dest="use_dynamic_bsz", type=boolean, default=False, current=True,
         help="micro-batches packed up to a token budget instead of a fixed sample count")
    both("--data.max_token_len_per_gpu", dest="max_token_len_per_gpu", type=int, default=16384, current=8192,
         help="token budget of one micro-batch per GPU (x sp size per sp group) with use_dynamic_bsz")
    both("--data.balance_dp_token", dest="balance_dp_token", type=boolean, default=False,
         help="accepted; the loss is always the global token mean")
    # yaml: sft_trainer_engine.yaml data.apply_chat_template_kwargs {} (its values are rendered per row)
    both(KWARGS, dest="apply_chat_template_kwargs", type=scalar_dict, default={},
         help="template kwargs for every row, as {k: v} or data.apply_chat_template_kwargs.KEY=VALUE (+ accepted)")
    both("--data.custom_cls.path", dest="custom_cls_path", type=optional(str), default=None,
         help="accepted when null: the dataset class is ours")
    both("--data.custom_cls.name", dest="custom_cls_name", type=optional(str), default=None, help="accepted when null")
    # --- both: model
    both("--model.enable_gradient_checkpointing", dest="enable_gradient_checkpointing", type=boolean, default=True,
         help="recompute each decoder layer in backward")
    both("--model.trust_remote_code", dest="trust_remote_code", type=boolean, default=False, help="accepted when false")
    both("--model.external_lib", dest="external_lib", type=optional(str), default=None, help="accepted when null")
    both("--model.use_liger", dest="use_liger", type=boolean, default=False, help="accepted when false")
    both("--model.lora_rank", dest="lora_rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    both("--model.lora_alpha", dest="lora_alpha", type=int, default=16, help="LoRA scaling alpha / rank")
    both("--model.target_modules", dest="target_modules", type=str_list, default=["all-linear"],
         help="all-linear (q/k/v/o/gate/up/down of every layer) or a list such as [q_proj,v_proj]")
    # --- both: optimizer (yaml: optim/fsdp.yaml lr 1e-3, betas [0.9, 0.999], lr_warmup_steps_ratio 0.0,
    # weight_decay 0.01, clip_grad 1.0)
    both("--optim.lr", dest="lr", type=float, default=1e-5, current=1e-3)
    both("--optim.betas", dest="betas", type=float_list, default=[0.9, 0.95], current=[0.9, 0.999])
    both("--optim.weight_decay", dest="weight_decay", type=float, default=0.01)
    both("--optim.clip_grad", dest="clip_grad", type=float, default=1.0, help="global grad-norm clipping")
    both("--optim.lr_warmup_steps_ratio", dest="warmup_steps_ratio", type=float, default=0.1, current=0.0,
         help="linear warmup, a fraction of the schedule's steps")
    # --- both: trainer (yaml: sft_trainer_engine.yaml trainer.*; the same as the old trainer's except
    # n_gpus_per_node 1, and logger [console, wandb] in both, which we keep at console: wandb is optional)
    both("--trainer.default_local_dir", dest="default_local_dir", default=None, help="default checkpoints/{project}/{experiment}")
    both("--trainer.project_name", dest="project_name", default="gsm8k-sft")
    both("--trainer.experiment_name", dest="experiment_name", default="test")
    both("--trainer.total_epochs", dest="total_epochs", type=int, default=4)
    both("--trainer.total_training_steps", dest="total_training_steps", type=optional(int), default=None,
         help="stop after this many steps; sft_trainer: the schedule spans them too")
    both("--trainer.logger", dest="logger", type=str_list, default=["console"], help="console, wandb, tensorboard")
    both("--trainer.seed", dest="seed", type=int, default=1)
    both("--trainer.save_freq", dest="save_freq", type=int, default=-1)
    both("--trainer.test_freq", dest="test_freq", type=int, default=-1)
    both("--trainer.max_ckpt_to_keep", dest="max_ckpt_to_keep", type=optional(int), default=None)
    both("--trainer.max_consecutive_skips", dest="max_consecutive_skips", type=int, default=5,
         help="ours: stop after this many consecutive non-finite grad norms")
    both("--trainer.resume_mode", dest="resume_mode", default="auto", choices=["auto", "disable", "resume_path"])
    both("--trainer.resume_from_path", dest="resume_from_path", type=optional(str), default=None)
    both("--trainer.nnodes", dest="nnodes", type=int, default=1, help="accepted; torchrun decides")
    both("--trainer.n_gpus_per_node", dest="n_gpus_per_node", type=int, default=8, current=1, help="accepted; torchrun decides")
    both("--trainer.default_hdfs_dir", dest="default_hdfs_dir", type=optional(str), default=None, help="accepted, unused")
    both("--trainer.device", dest="device", default="cuda", help="cuda (when available) or cpu")

    # --- the old trainer only
    old("--data.micro_batch_size", dest="micro_batch_size_per_gpu", type=int, default=4,
        help="alias of data.micro_batch_size_per_gpu")
    old("--data.multiturn.enable", dest="multiturn", type=boolean, default=False, help="messages-column data")
    old("--data.multiturn.messages_key", dest="messages_key", default="messages")
    old("--data.multiturn.tools_key", dest="tools_key", default="tools")
    old("--data.multiturn.enable_thinking_key", dest="enable_thinking_key", default="enable_thinking",
        help="per-row bool column (missing/null = true); false: Qwen3's empty think block on the last turn is not trained")
    old("--data.prompt_key", dest="prompt_key", default="question", help="single-turn prompt column")
    old("--data.response_key", dest="response_key", default="answer", help="single-turn response column")
    old("--data.prompt_dict_keys", dest="prompt_dict_keys", type=optional(str_list), default=None)
    old("--data.response_dict_keys", dest="response_dict_keys", type=optional(str_list), default=None)
    old("--model.partial_pretrain", dest="partial_pretrain", default=None, help="HF model dir (required)")
    old("--model.strategy", dest="strategy", default="fsdp2", choices=["fsdp", "fsdp2"], help="both mean FSDP2 fully_shard")
    old("--model.fsdp_config.model_dtype", dest="model_dtype", default="fp32", choices=["fp32", "float32", "bf16", "bfloat16"],
        help="master weight dtype")
    old("--model.fsdp_config.cpu_offload", dest="cpu_offload", type=boolean, default=False, help="FSDP2 CPUOffloadPolicy")
    old("--model.fsdp_config.offload_params", dest="offload_params", type=boolean, default=False, help="FSDP2 CPUOffloadPolicy")
    old("--model.fsdp_config.fsdp_size", dest="fsdp_size", type=int, default=-1,
        help="ranks that shard each parameter: -1 = all (FSDP); fewer = HSDP, replicated across groups (GPUs per node)")
    old("--model.fsdp_config.wrap_policy.min_num_params", dest="min_num_params", type=int, default=0,
        help="accepted; every decoder layer is its own FSDP unit")
    old("--optim.warmup_steps_ratio", dest="warmup_steps_ratio", type=float, default=0.1,
        help="alias of optim.lr_warmup_steps_ratio")
    old("--optim.lr_scheduler", dest="lr_scheduler", default="cosine", choices=["cosine", "wsd", "constant"],
        help="cosine to 0; wsd: warmup, stable until 90%, cosine to 0; constant after warmup")
    old("--ulysses_sequence_parallel_size", dest="sp_size", type=int, default=1)
    old("--use_remove_padding", dest="use_remove_padding", type=boolean, default=False, help="pack samples (needed for sp > 1)")

    # --- the current trainer only (yaml: sft_trainer_engine.yaml data.*)
    p.defaults[CURRENT]["multiturn"] = True  # its one dataset is MultiTurnSFTDataset: messages columns
    cur("--data.messages_key", dest="messages_key", default="messages")
    cur("--data.tools_key", dest="tools_key", default="tools")
    cur("--data.enable_thinking_key", dest="enable_thinking_key", default="enable_thinking", help="per-row bool column")
    # The yaml writes `none` (a string, truthy in verl, so such rows get enable_thinking=True, as the
    # Qwen3 template's own default): null here, which renders the same.
    cur("--data.enable_thinking_default", dest="enable_thinking_default", type=optional(boolean), default=None,
        help="enable_thinking for rows whose column is missing or null (null: the template's default)")
    cur("--data.pad_mode", dest="pad_mode", default="no_padding", choices=["no_padding", "right"],
        help="accepted; packing follows model.use_remove_padding (equal losses either way)")
    cur("--data.train_max_samples", dest="train_max_samples", type=int, default=-1,
        help="train on the first N samples only (-1: all), as verl's dataset without shuffle")
    cur("--data.val_max_samples", dest="val_max_samples", type=int, default=-1, help="the first N val samples (-1: all)")
    cur("--data.ignore_input_ids_mismatch", dest="ignore_input_ids_mismatch", type=boolean, default=False,
        help="accepted; we render whole conversations, so there is no per-turn mismatch to ignore")
    cur("--data.num_workers", dest="num_workers", type=int, default=8, help="accepted; samples are tokenized up front")
    # yaml: model/hf_model.yaml path, use_remove_padding True, custom_chat_template null
    cur("--model.path", dest="partial_pretrain", default=None, help="HF model dir (required)")
    cur("--model.use_remove_padding", dest="use_remove_padding", type=boolean, default=True,
        help="pack samples (needed for sp > 1)")
    cur("--model.custom_chat_template", dest="custom_chat_template", type=optional(str), default=None,
        help="Jinja text verl sets as the tokenizer's template: accepted when it is an official Qwen template's exact text")
    # yaml: engine/fsdp.yaml (strategy fsdp, ulysses_sequence_parallel_size 1, fsdp_size -1, model_dtype fp32,
    # dtype bfloat16, param_offload / optimizer_offload / offload_policy false, wrap_policy.min_num_params 0)
    cur("--engine", dest="engine", default="fsdp", choices=["fsdp", "fsdp2"], help="config group; both mean FSDP2")
    cur("--engine.strategy", dest="strategy", default="fsdp", choices=["fsdp", "fsdp2"], help="both mean FSDP2 fully_shard")
    cur("--engine.ulysses_sequence_parallel_size", dest="sp_size", type=int, default=1)
    cur("--engine.fsdp_size", dest="fsdp_size", type=int, default=-1,
        help="ranks that shard each parameter: -1 = all (FSDP); fewer = HSDP (GPUs per node)")
    cur("--engine.model_dtype", dest="model_dtype", default="fp32", choices=["fp32", "float32", "bf16", "bfloat16"],
        help="master weight dtype")
    cur("--engine.dtype", dest="dtype", default="bfloat16", choices=["bfloat16", "bf16", "float16", "fp16"],
        help="compute dtype on GPU: bfloat16 only")
    cur("--engine.param_offload", dest="offload_params", type=boolean, default=False, help="FSDP2 CPUOffloadPolicy")
    cur("--engine.optimizer_offload", dest="optimizer_offload", type=boolean, default=False, help="FSDP2 CPUOffloadPolicy")
    cur("--engine.offload_policy", dest="cpu_offload", type=boolean, default=False, help="FSDP2 CPUOffloadPolicy")
    cur("--engine.wrap_policy.min_num_params", dest="min_num_params", type=int, default=0,
        help="accepted; every decoder layer is its own FSDP unit")
    # yaml: optim/fsdp.yaml (lr_warmup_steps -1: use the ratio; lr_scheduler_type constant; min_lr_ratio 0.0;
    # num_cycles 0.5)
    cur("--optim.lr_warmup_steps", dest="lr_warmup_steps", type=int, default=-1,
        help="warmup steps; <= 0: optim.lr_warmup_steps_ratio of the schedule")
    cur("--optim.lr_scheduler_type", dest="lr_scheduler", default="constant", choices=["constant", "cosine"],
        help="constant after warmup, or cosine down to min_lr_ratio")
    cur("--optim.min_lr_ratio", dest="min_lr_ratio", type=float, default=0.0, help="cosine's floor, a fraction of optim.lr")
    cur("--optim.num_cycles", dest="num_cycles", type=float, default=0.5, help="cosine waves over the decay (0.5: down once)")
    # yaml: sft_trainer_engine.yaml checkpoint.save_contents [model, optimizer, extra], trainer.balance_batch True
    cur("--checkpoint.save_contents", dest="save_contents", type=str_list, default=["model", "optimizer", "extra"],
        help="accepted; every checkpoint holds all of them and the Hugging Face dir (hf_model)")
    cur("--trainer.balance_batch", dest="balance_batch", type=boolean, default=True,
        help="accepted; with use_dynamic_bsz dp ranks always balance tokens")
    return p


def normalize_argv(argv):
    """key=value, +key=value (Hydra), --key=value and --key value -> ['--key=value', ...]."""
    out, pending = [], None
    for tok in argv:
        if pending is not None:
            out.append(f"{pending}={tok}")
            pending = None
        elif tok in ("-h", "--help"):
            out.append(tok)
        elif tok.startswith("--"):
            if "=" in tok:
                out.append(tok)
            else:
                pending = tok
        elif "=" in tok and not tok.startswith("-"):
            out.append("--" + tok.lstrip("+"))
        else:
            raise ConfigError(f"argument {tok!r} is not key=value; write e.g. data.max_length=2048.")
    return out + ([pending] if pending else [])  # a trailing --key: argparse says it needs a value


def dialect_of_command(parser, keys):
    """OLD or CURRENT from the keys only one trainer has (neither: OLD, today's); a mix is an error."""
    seen = {d: next((k for k in keys if parser.dialect_of.get(k) == d), None) for d in (OLD, CURRENT)}
    if seen[OLD] and seen[CURRENT]:
        twin = key_names(parser, CURRENT).get(parser._option_string_actions[seen[OLD]].dest)
        fix = f"its {CURRENT} name is {twin}" if twin else "python train.py --help lists both"
        raise ConfigError(f"{seen[CURRENT][2:]} is a key of verl's current {CURRENT} but {seen[OLD][2:]} is one of "
                          f"the old {OLD}; write the whole command in one of the two ({fix}).")
    return CURRENT if seen[CURRENT] else OLD


def key_names(parser, dialect):
    """dest -> the key that sets it in dialect's command line (the first listed), for messages."""
    names = {}
    for act in parser._actions:
        for s in act.option_strings:
            if s.startswith("--") and parser.dialect_of.get(s) in (None, dialect):
                names.setdefault(act.dest, s[2:])
    return names


def parse_args(argv):
    """The resolved keys (every dest), with the defaults of the dialect the command is written in
    (args.dialect: OLD or CURRENT) and args.apply_chat_template_kwargs a dict."""
    parser = build_parser()
    argv = normalize_argv(argv)
    # data.apply_chat_template_kwargs[.KEY]: free-form, so taken out before argparse, kept in order
    kwargs_ops = [tok.partition("=")[::2] for tok in argv if tok.partition("=")[0].startswith(KWARGS)]
    argv = [tok for tok in argv if not tok.partition("=")[0].startswith(KWARGS)]
    # verl's model.mtp.* (multi-token prediction): accepted while off; turned on it is refused
    mtp_on = [tok[2:] for tok in argv if tok.startswith(("--model.mtp.enable=", "--model.mtp.enable_train="))
              and tok.partition("=")[2].lower() in ("true", "1", "yes")]
    if mtp_on:
        raise ConfigError(f"{mtp_on[0]} asks for multi-token-prediction training, which this trainer does not do "
                          "(a checkpoint's mtp.* weights are saved unchanged); remove the model.mtp.* keys.")
    argv = [tok for tok in argv if not tok.startswith("--model.mtp.")]
    keys = [tok.partition("=")[0] for tok in argv if tok.startswith("--") and tok != "--help"]
    known = {s for act in parser._actions for s in act.option_strings}
    dialect = dialect_of_command(parser, [k for k in keys if k in known])
    decided = any(k in parser.dialect_of for k in keys)
    for key in keys:
        if key not in known:  # the closest key of the command's dialect (of both, when nothing decides it)
            pool = [k for k in known if k.startswith("--") and (not decided or parser.dialect_of.get(k) in (None, dialect))]
            close = difflib.get_close_matches(key, pool, n=1)
            hint = f" (did you mean {close[0][2:]}?)" if close else ""
            raise ConfigError(f"unknown key {key[2:]!r}{hint}; see python train.py --help for the accepted keys.")

    def error(message):  # argparse's own errors (bad values) become one ConfigError sentence
        raise ConfigError(message.replace("argument --", "key ") + ".")
    parser.error = error
    parser.set_defaults(**parser.defaults[dialect])
    args = parser.parse_args(argv)
    args.dialect = dialect
    args.apply_chat_template_kwargs = {}
    for key, value in kwargs_ops:
        if key == KWARGS:
            try:
                args.apply_chat_template_kwargs = scalar_dict(value)
            except argparse.ArgumentTypeError as e:
                raise ConfigError(f"key {KWARGS[2:]}: {e}.") from None
        elif key[len(KWARGS)] != "." or len(key) == len(KWARGS) + 1:
            raise ConfigError(f"unknown key {key[2:]!r}; write {KWARGS[2:]}.KEY=VALUE, e.g. "
                              f"{KWARGS[2:]}.enable_thinking=false.")
        else:
            args.apply_chat_template_kwargs[key[len(KWARGS) + 1:]] = yaml_scalar(value)
    if args.custom_chat_template is not None:
        # verl sets this Jinja text as the tokenizer's template; we render Qwen's official templates
        # by hand, so we take it only when it is one of them, recognised by its exact text.
        family = templates.OFFICIAL.get(hashlib.sha256(args.custom_chat_template.encode("utf-8")).hexdigest())
        if family is None or args.chat_template not in ("auto", family):
            raise ConfigError("model.custom_chat_template is not the exact text of an official "
                              f"{', '.join(templates.FAMILIES)} chat template (we render those by hand, not Jinja); "
                              f"remove it, or pass data.chat_template={templates.CHOICES} for the model's own.")
        args.chat_template = family
    if args.default_local_dir is None:
        args.default_local_dir = f"checkpoints/{args.project_name}/{args.experiment_name}"
    return args


def validate(args, world_size):
    """Flag combinations that cannot work, each as one sentence naming the key in the command's dialect
    (before any heavy work)."""
    key = key_names(build_parser(), args.dialect)
    if not args.train_files:
        raise ConfigError("data.train_files is required; pass data.train_files=/path/train.parquet.")
    if not args.partial_pretrain:
        raise ConfigError(f"{key['partial_pretrain']} is required; pass a Hugging Face model dir.")
    for dest in ("train_batch_size", "max_length", "total_epochs", "max_token_len_per_gpu"):
        if getattr(args, dest) < 1:
            raise ConfigError(f"{key[dest]}={getattr(args, dest)} must be at least 1.")
    if args.lr < 0 or args.clip_grad <= 0 or not 0 <= args.warmup_steps_ratio <= 1:
        raise ConfigError(f"optim.lr must be >= 0, optim.clip_grad > 0 and {key['warmup_steps_ratio']} in [0, 1].")
    if not 0 <= args.min_lr_ratio <= 1 or args.num_cycles <= 0:
        raise ConfigError(f"optim.min_lr_ratio={args.min_lr_ratio} must be in [0, 1] and "
                          f"optim.num_cycles={args.num_cycles} > 0.")
    if len(args.betas) != 2 or not all(0 <= b < 1 for b in args.betas):
        raise ConfigError(f"optim.betas={args.betas} must be two numbers in [0, 1), e.g. [0.9, 0.999].")
    if args.lora_rank < 0:
        raise ConfigError(f"model.lora_rank={args.lora_rank} must be >= 0 (0 = full fine-tuning).")
    if args.lora_rank > 0 and args.lora_alpha <= 0:
        raise ConfigError(f"model.lora_alpha={args.lora_alpha} must be > 0 (the LoRA scale is alpha / rank).")
    unknown = [t for t in args.target_modules if t not in lora.TARGETS + ("all-linear",)]
    if args.lora_rank > 0 and (unknown or not args.target_modules):
        what = f"has unknown module(s) {unknown}" if unknown else "is empty"
        raise ConfigError(f"model.target_modules {what}; use all-linear or a list of {', '.join(lora.TARGETS)}.")
    if args.use_liger:
        raise ConfigError("model.use_liger=true is not supported; the fused LM-head loss is built in, remove it.")
    if args.trust_remote_code or args.external_lib:
        raise ConfigError("model.trust_remote_code / model.external_lib are not supported; this trainer "
                          "builds Qwen2/Qwen3 itself, remove them.")
    if args.custom_cls_path or args.custom_cls_name:
        raise ConfigError("data.custom_cls is not supported; the dataset (data.py) reads messages/tools columns "
                          "itself, remove it.")
    if args.dtype in ("float16", "fp16"):
        raise ConfigError("engine.dtype=float16 is not supported; compute is bfloat16 on GPU (fp32 on CPU), remove it.")
    extra = set(args.save_contents) - {"model", "optimizer", "extra", "hf_model"}
    if extra:
        raise ConfigError(f"checkpoint.save_contents has unknown item(s) {sorted(extra)}; use model, optimizer, "
                          "extra, hf_model (every checkpoint holds all of them anyway).")
    thinking = args.apply_chat_template_kwargs.get("enable_thinking")
    if not isinstance(thinking, (bool, type(None))):
        raise ConfigError(f"data.apply_chat_template_kwargs.enable_thinking={thinking!r} must be true or false.")
    if not set(args.logger) <= {"console", "wandb", "tensorboard"}:
        raise ConfigError(f"trainer.logger={args.logger} has an unknown logger; use console, wandb or tensorboard.")
    for name, module in (("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")):
        if name in args.logger:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(f"trainer.logger includes {name} but it is not installed; "
                                  f"pip install {name}, or drop it from trainer.logger.") from None
    sp, packed = key["sp_size"], key["use_remove_padding"]
    if args.sp_size > 1 and not args.use_remove_padding:
        raise ConfigError(f"{sp} > 1 needs {packed}=true (packed sequences).")
    try:  # sp and fsdp sizes against the process count; the heads are checked once the config is read
        parallel.check_sizes(world_size, args.sp_size, args.fsdp_size)
    except parallel.ParallelError as e:  # named as this command line's dialect names them
        raise ConfigError(str(e).replace("ulysses_sequence_parallel_size", sp)
                          .replace("model.fsdp_config.fsdp_size", key["fsdp_size"])) from None
    if args.use_dynamic_bsz and not args.use_remove_padding:
        raise ConfigError(f"data.use_dynamic_bsz=true needs {packed}=true (token budgets pack samples).")
    if args.use_dynamic_bsz and args.max_length > args.max_token_len_per_gpu * args.sp_size:
        raise ConfigError(f"data.max_length={args.max_length} exceeds the micro-batch token budget "
                          f"{args.max_token_len_per_gpu * args.sp_size} (data.max_token_len_per_gpu x sp size); "
                          "raise data.max_token_len_per_gpu or lower data.max_length.")
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
    validate(args, world_size)
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
                                 cpu_offload=(args.cpu_offload or args.offload_params or args.optimizer_offload) and device.type == "cuda")
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
        raise ConfigError(f"data.train_batch_size={args.train_batch_size} exceeds the {len(train)} training "
                          "samples; lower data.train_batch_size.")
    total_steps = steps_per_epoch * args.total_epochs
    stop_at = min(total_steps, args.total_training_steps or total_steps)
    log(f"data: {len(train)} train samples{f', {len(val)} val' if val else ''}; {steps_per_epoch} steps/epoch "
        f"x {args.total_epochs} epochs = {total_steps} steps" + (f", stopping at {stop_at}" if stop_at < total_steps else ""))
    rank_batches = batcher(args, dp_sp, pad_id, device)

    # --- optimizer and schedule
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay, eps=1e-8)
    # sft_trainer's schedule spans trainer.total_training_steps when set; the old one's all epochs (SPEC §2)
    schedule_steps = (args.total_training_steps or total_steps) if args.dialect == CURRENT else total_steps
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
    validate(args, world_size)
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
        raise ConfigError(f"data.train_batch_size={args.train_batch_size} exceeds the {n_train} training "
                          "samples; lower data.train_batch_size.")
    checkpoint.find_resume(Path(args.default_local_dir), args.resume_mode, args.resume_from_path)  # a broken pointer


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
