"""Checkpoints that lose nothing: a Hugging Face directory plus the exact resume state.

global_step_N/huggingface/ loads in transformers and vLLM as it is (with LoRA: the merged model, and
lora_adapter/ beside it in PEFT's layout); beside it the sharded model and optimizer
(torch.distributed.checkpoint; with LoRA only the adapters, the frozen base is the pretrained one),
scheduler, RNG per rank and data position. Written under a temporary name and renamed when every rank
has finished.
"""
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

import lora as L
import model as M

# The data position a resume starts from, as trainer_state.json holds it.
POSITION = ("step", "epoch", "next_batch", "skipped", "consecutive_skips")
# The adapter's shape and scale, saved beside the caller's resume keys: a resume that changes them is
# refused (the saved adapter and its optimizer state would not fit, or would mean something else).
LORA_KEYS = ("lora_rank", "lora_alpha", "target_modules")
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
            "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def saved_config(config, lora, model=None):
    """trainer_state.json's "config": the caller's resume keys plus the LoRA spec (rank, alpha, and the
    projections the model adapts) or None. Without LoRA, alpha and targets mean nothing and may change freely."""
    rank, alpha, _ = lora or (0, None, None)
    return {**config, **dict(zip(LORA_KEYS, (rank, alpha, L.adapted_names(model) if lora else None)))}


def resume_state(model, optimizer, lora):
    """{"model", "optim"} sharded state dicts (all ranks). With LoRA only what trains (the adapters
    and their AdamW state): the frozen base is model.partial_pretrain, reloaded at start, so it is
    neither written nor read back."""
    model_sd, optim_sd = get_state_dict(model, optimizer)  # (all ranks)
    if lora:
        model_sd = {k: v for k, v in model_sd.items() if L.is_lora_key(k)}
    return {"model": model_sd, "optim": optim_sd}


class CheckpointError(Exception):
    """Saving or resuming failed for a reason the user can fix (disk, paths, changed config)."""


def rng_state(device):
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_hf(state, cfg, src, path):
    """huggingface/: bf16 weights, config, tokenizer and generation config — what transformers and
    vLLM load as they are. src is the model dir trained from: a multimodal Qwen3.5 one keeps its layout,
    config.json and the tensors it did not train (vision tower, MTP) byte-identical (M.save_state_dict)."""
    M.save_state_dict(state, cfg, path, dtype=torch.bfloat16, source=src)
    for name in HF_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, path / name)
    if not (path / "generation_config.json").is_file():
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def complete_checkpoints(out):
    """Steps of the complete checkpoints in out (a complete one has trainer_state.json), ascending."""
    steps = []
    for p in Path(out).glob("global_step_*"):
        if p.name.removeprefix("global_step_").isdigit() and (p / "trainer_state.json").is_file():
            steps.append(int(p.name.removeprefix("global_step_")))
    return sorted(steps)


def save_checkpoint(out, model, optimizer, scheduler, position, *, cfg, base_model, config, lora=None, keep=None,
                    device=torch.device("cpu")):
    """out/global_step_N/: huggingface/ + the resume state (sharded model and optimizer through
    torch.distributed.checkpoint, so another rank count can read them; scheduler, RNG per rank,
    the data position (POSITION's keys) and config (the caller's resume keys, saved_config)).
    cfg is the model's config.json, base_model the dir its tokenizer files are copied from, lora
    the spec (rank, alpha, targets) or None, keep the number of checkpoints kept (None: all).

    Everything is written under a temporary name and renamed only when every rank has finished,
    then latest_checkpointed_iteration.txt is replaced atomically: a crash at any moment leaves
    the previous checkpoint and the pointer valid. A failed write on any rank stops every rank.
    """
    out, rank = Path(out), dist.get_rank()
    step = position["step"]
    final, tmp = out / f"global_step_{step}", out / f".tmp_global_step_{step}"

    def attempt(fn):
        try:
            fn()
            return None
        except OSError as e:
            return e

    def check(err):
        failed = torch.tensor(float(err is not None), device=device)  # nccl reduces only CUDA tensors
        dist.all_reduce(failed)  # (all ranks) one rank's failure stops them all
        if failed:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint {final} ({err or 'failed on another rank'}); "
                                  "the previous checkpoint is intact: free disk space or fix "
                                  "trainer.default_local_dir, then rerun to resume.")

    def prepare():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    check(attempt(prepare) if rank == 0 else None)
    state = resume_state(model, optimizer, lora)  # (all ranks) sharded
    try:
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))  # (all ranks)
        err = attempt(lambda: torch.save(rng_state(device), tmp / f"rng_rank{rank}.pt"))
    except CheckpointException as e:  # a write failed somewhere; DCP raises on every rank
        err = OSError(str(e).splitlines()[0] if str(e) else "write failed")
    check(err)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # (all ranks)

    def finish():
        if lora:  # huggingface/ is the merged model; the adapter alone goes beside it
            write_hf(L.merge(full, *lora[:2]), cfg, base_model, tmp / "huggingface")
            L.save_adapter(full, tmp / "lora_adapter", *lora, base_model=base_model,
                           prefix=M.qwen3_5_prefix(base_model))
        else:
            write_hf(full, cfg, base_model, tmp / "huggingface")
        meta = {**{k: position[k] for k in POSITION}, "scheduler": scheduler.state_dict(),
                "world_size": dist.get_world_size(), "config": saved_config(config, lora, model)}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2) + "\n")  # marks it complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (out / ".latest.tmp").write_text(f"{step}\n")
        os.replace(out / ".latest.tmp", out / "latest_checkpointed_iteration.txt")
        if keep and keep > 0:
            for old in complete_checkpoints(out)[:-keep]:
                if old != step:
                    shutil.rmtree(out / f"global_step_{old}", ignore_errors=True)
    check(attempt(finish) if rank == 0 else None)
    return final


def find_resume(out, mode="auto", path=None):
    """The checkpoint dir to resume from (trainer.resume_mode: auto = out's latest, disable, or
    resume_path = path), or None for a fresh start."""
    if mode == "disable":
        return None
    if mode == "resume_path":
        path = Path(path)
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"trainer.resume_from_path={path} is not a complete checkpoint (no "
                                  "trainer_state.json); point it at a global_step_N directory.")
        return path
    pointer = Path(out) / "latest_checkpointed_iteration.txt"
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    path = Path(out) / f"global_step_{text}"
    if not text.isdigit() or not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} names {text!r}, which is not a complete checkpoint; fix or delete "
                              "the file, or set trainer.resume_mode=disable to start fresh.")
    return path


def load_checkpoint(path, model, optimizer, scheduler, *, config, lora=None, device=torch.device("cpu")):
    """Restore model, optimizer, scheduler and RNG in place; returns the saved data position.
    config and lora as for save_checkpoint: a resume that changes any of them is refused."""
    meta = json.loads((path / "trainer_state.json").read_text())
    now = saved_config(config, lora, model)
    saved = {**saved_config({}, None), **meta["config"]}  # pre-LoRA checkpoints hold no LoRA keys
    lora_diffs = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in LORA_KEYS if saved[k] != now[k]]
    if lora_diffs:
        raise CheckpointError(f"cannot resume from {path}: {'; '.join(lora_diffs)} changes the LoRA adapter it "
                              "holds; restore the original model.lora_* / model.target_modules, or use a new "
                              "trainer.default_local_dir (or trainer.resume_mode=disable) to start fresh.")
    # Over the keys of both: a key recorded only when set (train.LATER_RESUME_KEYS) may be on one side only.
    keys = sorted((set(config) | set(meta["config"])) - set(LORA_KEYS))
    diffs = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: {'; '.join(diffs)} would change the data order or "
                              "schedule; restore the original values, or use a new trainer.default_local_dir "
                              "(or trainer.resume_mode=disable) to start fresh.")
    state = resume_state(model, optimizer, lora)  # (all ranks)
    dcp.load(state, checkpoint_id=str(path / "dcp"))  # (all ranks) reshards to this layout
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=not lora))  # (all ranks) LoRA: base not in state
    scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved; nothing random is drawn
        set_rng_state(torch.load(rng_file, weights_only=False), device)
    return {k: meta[k] for k in POSITION}
