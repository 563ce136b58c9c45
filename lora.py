"""LoRA written by hand (no peft at runtime) in PEFT's layout, so an adapter we save loads in peft and vLLM.

A (r, in) kaiming-uniform(a=sqrt(5)), B (out, r) zeros, y = base(x) + (alpha / r) * B(A(x)), no dropout.
It acts on a built model from outside: `apply` swaps the target linears of every decoder layer for
LoraLinear; `merge` folds the adapters back into plain HF weights; `save_adapter` writes PEFT's files.
A LoRA spec is (rank, alpha, targets) with verl's names: model.lora_rank, lora_alpha, target_modules.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

# Every linear of a decoder layer: attention, MLP, then Qwen3.5's Gated DeltaNet (its depthwise conv is no target).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")


class LoraLinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update.

    The base keeps the names `weight` / `bias` (an HF checkpoint loads unchanged); the adapter is two
    bias-free linears `lora_A` / `lora_B`, so its parameter names are PEFT's (`...q_proj.lora_A.weight`).
    """

    def __init__(self, base, rank, alpha, dtype=torch.float32):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the pretrained tensors themselves, no copy
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        self.scaling = alpha / rank  # PEFT's scaling (not rsLoRA's alpha / sqrt(r))

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        # Under FSDP mixed precision every weight is cast to the compute dtype; without FSDP a bf16
        # base with fp32 adapters needs the input cast to the adapter's dtype (as PEFT does).
        h = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))
        return out + (h * self.scaling).to(out.dtype)


def target_names(targets):
    """verl's target_modules ('all-linear' or a list of projection names) -> projection names in
    TARGETS order. Names are checked by train.validate."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    return [t for t in TARGETS if t in targets or "all-linear" in targets]


def apply(model, rank, alpha, targets, seed=0, dtype=torch.float32):
    """Freeze every parameter, then swap the target projections of every decoder layer for LoraLinear.

    A is drawn from its own generator (seed), layer by layer in TARGETS order, so every rank
    builds the same adapter before FSDP shards it. Works on a meta-device model too (no init then).
    A layer adapts the targets it has (Qwen3.5: linear_attn's or self_attn's, and the MLP's).
    """
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        mixers = [m for m in (getattr(layer, n, None) for n in ("self_attn", "linear_attn", "mlp")) if m is not None]
        for name in target_names(targets):
            parent = next((m for m in mixers if isinstance(getattr(m, name, None), nn.Linear)), None)
            if parent is None:
                continue
            adapted = LoraLinear(getattr(parent, name), rank, alpha, dtype)
            a = torch.empty(adapted.lora_A.weight.shape)
            nn.init.kaiming_uniform_(a, a=5 ** 0.5, generator=gen)  # PEFT's init: bound 1/sqrt(in_features)
            with torch.no_grad():
                if adapted.weight.device.type != "meta":
                    adapted.lora_A.weight.copy_(a)
                    adapted.lora_B.weight.zero_()  # B = 0: the model starts exactly as the base
            setattr(parent, name, adapted)
    return model


def adapted_names(model):
    """The projection names that carry an adapter in this model, in TARGETS order: what a LoRA checkpoint
    records, so 'all-linear' on Qwen2 reads the same before and after TARGETS grew the DeltaNet names."""
    found = {name.split(".lora_A.")[0].rsplit(".", 1)[-1]  # "...layers.0.self_attn.q_proj.lora_A.weight" -> q_proj
             for name, _ in model.named_parameters() if ".lora_A." in name}
    return [t for t in TARGETS if t in found]


def is_lora_key(name):
    return ".lora_A." in name or ".lora_B." in name


def merge(state_dict, rank, alpha):
    """A full state dict with LoRA keys -> the plain HF state dict: W + (alpha / r) * B @ A (in fp32,
    returned in W's dtype), LoRA keys removed. What transformers and vLLM load without peft."""
    out = {k: v for k, v in state_dict.items() if not is_lora_key(k)}
    for key in state_dict:
        if key.endswith(".lora_A.weight"):
            prefix = key.removesuffix(".lora_A.weight")
            a, b, w = state_dict[key].float(), state_dict[prefix + ".lora_B.weight"].float(), out[prefix + ".weight"]
            out[prefix + ".weight"] = (w.float() + (alpha / rank) * (b @ a)).to(w.dtype)  # (out, r) @ (r, in)
    return out


def save_adapter(state_dict, path, rank, alpha, targets, base_model, prefix=None):
    """PEFT's adapter layout: adapter_model.safetensors (keys `base_model.model.<HF name>`, fp32 as
    trained) and adapter_config.json; loads with peft's PeftModel.from_pretrained(base, path) and
    vLLM's LoRARequest. prefix: where base_model keeps the decoder when not under `model.` (a multimodal
    Qwen3.5's `model.language_model.`), so the names are those of the model the base dir loads as."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rename = (lambda k: k) if prefix is None else (lambda k: prefix + k.removeprefix("model."))
    tensors = {"base_model.model." + rename(k): v.detach().cpu().contiguous()
               for k, v in state_dict.items() if is_lora_key(k)}
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors}  # the projections this model has
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base_model), r=rank,
                  lora_alpha=alpha, target_modules=[t for t in target_names(targets) if t in adapted], lora_dropout=0.0, bias="none",
                  fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
                  modules_to_save=None, inference_mode=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def count_trained(model):
    """(trained, total) parameter counts; a tied LM head counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
