"""The command line: verl's two SFT trainers' keys, each with its defaults, parsed and checked.

    [torchrun ...] train.py data.train_files=... model.partial_pretrain=... \
        ulysses_sequence_parallel_size=2 use_remove_padding=true        # verl's fsdp_sft_trainer keys
    [torchrun ...] train.py data.train_files=... model.path=... \
        engine.ulysses_sequence_parallel_size=2                         # verl's current sft_trainer keys

Keys are key=value (Hydra's `+key=value`, `--key=value` and `--key value` too); a key only one of
the two trainers has decides the defaults (a command mixing both is refused), a typo names the
closest key, and every flag combination that cannot work is one sentence naming the key (validate).
train.py reads the result; nothing here touches a process group, a model or a file's contents.
"""
import argparse
import difflib
import hashlib
import importlib
from pathlib import Path

import lora
import parallel
import templates


class ConfigError(Exception):
    """A bad flag or combination of flags; the message names the key and the fix."""


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
