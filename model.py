"""Qwen2 decoder written by hand, on packed (varlen) token streams.

Parameter names equal Hugging Face's `Qwen2ForCausalLM`, so `model.safetensors` loads with
strict=True and no renaming, and what we save loads in transformers and vLLM as it is.
This file knows nothing of process groups: parallel.py acts on a built model from outside.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from kernels import attention
from kernels.lm_head_loss import linear_cross_entropy_sum


class ModelError(Exception):
    """A user-caused problem with a model directory; the message is one sentence with the fix."""


def varlen_attention(q, k, v, cu_seqlens, max_seqlen):
    """Causal attention within each packed sample: q (T, H, D), k/v (T, Hkv, D) -> (T, H, D).

    The one switch between implementations: the Triton kernel on CUDA, plain torch elsewhere.
    """
    attn = attention.flash_attn_varlen_func if q.is_cuda else attention.attention_reference
    return attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)


# --------------------------------------------------------------------------- modules

class Qwen2RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, exactly as HF does (bf16 parity).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin tables (T, D) for the rotate-half RoPE convention, computed in fp32 like HF."""
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)  # (D/2,)
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """x (T, H, D); cos/sin (T, D). Rotate-half: pairs are (i, i + D/2), not interleaved."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Qwen2Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg["num_key_value_heads"]
        self.head_dim = cfg.get("head_dim") or hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        # Replaced from outside (parallel.apply_ulysses) to wrap attention in all-to-alls.
        self.attn_fn = varlen_attention

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)  # (T, H, D)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = self.attn_fn(q, k, v, cu_seqlens, max_seqlen)  # (T, H, D)
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))  # (T, H*D) -> (T, C)


class Qwen2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = Qwen2RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        self.rope_theta = float(cfg.get("rope_theta", 10000.0))
        self.gradient_checkpointing = False

    def forward(self, input_ids, cu_seqlens, position_ids, max_seqlen):
        x = self.embed_tokens(input_ids)  # (T, C)
        cos, sin = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # Recompute the layer in backward: keeps one (T, C) input per layer, not its insides.
                x = checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = dict(cfg)
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self.tie_weights()

    def tie_weights(self):
        # Called again after any load that assigns parameters, since assignment breaks the tie.
        if self.config.get("tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids, cu_seqlens, position_ids=None, max_seqlen=None):
        """Final-norm hidden states (T, C) of a packed stream; see forward."""
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return self.model(input_ids, cu_seqlens, position_ids, max_seqlen)

    def forward(self, input_ids, cu_seqlens, position_ids=None, max_seqlen=None, labels=None):
        """input_ids (T,) holds B samples back to back, bounded by cu_seqlens (B+1,) int32.

        Attention never crosses a boundary and positions restart at 0 per sample unless
        position_ids (T,) are given (Ulysses passes a slice of the full stream's positions).
        Returns logits (T, vocab_size), or with labels (T,) (-100 = ignore) the fp32 SUM of the
        cross-entropy over the labelled tokens. The loss goes through this forward (not a separate
        call on lm_head) so FSDP's hooks on the root module see the LM head being used.
        """
        h = self.hidden_states(input_ids, cu_seqlens, position_ids, max_seqlen)
        if labels is None:
            return self.lm_head(h)
        # Fused LM head + CE: never holds (T, vocab) logits (9.3 GiB in fp32 for a 16k Qwen2.5 pack).
        return linear_cross_entropy_sum(h, self.lm_head.weight, labels, self.loss_chunk)

    loss_chunk = None  # labelled rows per LM-head chunk; None = about 1 GiB of fp32 logits


def positions_from_cu_seqlens(cu_seqlens):
    """0, 1, ... restarting at every sample start: (T,) int64."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)  # (T,) start of own sample
    return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts


# --------------------------------------------------------------------------- build, load, save

REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "rms_norm_eps")


def read_config(path):
    """config.json of a model dir as a dict, checked to be a Qwen2 we can build."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ModelError(f"{file} not found: model.partial_pretrain must be a Hugging Face model "
                         "directory with config.json, *.safetensors and tokenizer.json.")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{file} is not valid JSON ({e}); restore the model's config.json.") from None
    if cfg.get("model_type") != "qwen2":
        raise ModelError(f"{file} has model_type {cfg.get('model_type')!r}; this trainer builds only "
                         "Qwen2-architecture models (model_type 'qwen2').")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ModelError(f"{file} lacks {', '.join(missing)}; use the config.json that came with the weights.")
    return cfg


def init_weights(model, seed=0, std=0.02):
    """HF's Qwen2 init: normal(0, initializer_range) for matrices, zeros for biases, ones for norms."""
    gen = torch.Generator().manual_seed(seed)
    std = model.config.get("initializer_range", std)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head appears once, as the embedding
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_random(config, seed=0, dtype=torch.float32, device="cpu"):
    """A randomly initialised model of the given config dict (tests and demos); deterministic in seed."""
    model = Qwen2ForCausalLM(config)
    init_weights(model, seed)
    return model.to(device=device, dtype=dtype)


def read_safetensors(path):
    """All tensors of model.safetensors or of a sharded checkpoint listed in model.safetensors.index.json."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"no model.safetensors or model.safetensors.index.json in {path}; "
                         "model.partial_pretrain must hold the weights in safetensors format.")
    tensors = {}
    for name in files:
        if not (path / name).is_file():
            raise ModelError(f"{path / name} is listed in model.safetensors.index.json but missing; "
                             "download the complete checkpoint.")
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def load_state_dict_into(model, tensors, where="the checkpoint"):
    """Strict load of HF-named tensors into a (possibly meta) model; keeps dtype/device of the model.

    A tied checkpoint has no lm_head.weight; HF also writes one sometimes, which must then equal
    the embedding and is ignored.
    """
    tensors = dict(tensors)
    if model.config.get("tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    expected = {k: p for k, p in model.state_dict().items()
                if not (k == "lm_head.weight" and model.config.get("tie_word_embeddings", False))}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{where} does not match config.json (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); the weights and config.json must be of the same model.")
    for k, p in expected.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise ModelError(f"{where}: {k} has shape {tuple(tensors[k].shape)} but config.json implies "
                             f"{tuple(p.shape)}; the weights and config.json must be of the same model.")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if device.type == "meta":
        device = torch.device("cpu")
    state = {k: tensors[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model


def load_pretrained(path, dtype=torch.float32, device="cpu"):
    """Qwen2ForCausalLM with the weights of a Hugging Face model dir (config.json + safetensors)."""
    cfg = read_config(path)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)  # no memory or init work: every tensor is assigned below
    model = model.to(dtype=dtype)
    load_state_dict_into(model, read_safetensors(path), where=str(path))
    return model.to(device=device)


def save_state_dict(state_dict, config, path, dtype=None):
    """Write config.json + model.safetensors in the HF layout (a tied lm_head omitted, as HF does)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tied = config.get("tie_word_embeddings", False)
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
               for k, v in state_dict.items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = dict(config)
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_pretrained(model, path, dtype=None):
    save_state_dict(model.state_dict(), model.config, path, dtype)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config, mean_seqlen):
    """Training FLOPs per token (fwd + bwd = 3x fwd): 6 x matmul params + causal attention.

    Matmul params exclude the embedding lookup but include the LM head. Causal attention costs
    6 * 2 * L * H * D * s / 2 per token (QK^T and PV, half the pairs).
    """
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * config["intermediate_size"]
    matmul = layers * per_layer + h * config["vocab_size"]
    return 6 * matmul + 6 * layers * heads * d * mean_seqlen


# Dense bf16 peak FLOP/s per GPU, for MFU (by a substring of torch.cuda.get_device_name).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device_name):
    """The GPU's dense bf16 peak, or None when unknown (MFU is then not shown)."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


# --------------------------------------------------------------------------- LoRA
# Written by hand (no peft at runtime) in PEFT's layout, so an adapter we save loads in peft and vLLM:
# A (r, in) kaiming-uniform(a=sqrt(5)), B (out, r) zeros, y = base(x) + (alpha / r) * B(A(x)), no dropout.
# It acts on a built model from outside: target linears of every decoder layer are swapped for LoraLinear.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def lora_target_names(targets):
    """verl's target_modules ('all-linear' or a list of projection names) -> projection names in
    LORA_TARGETS order. Names are checked by train.validate."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    return [t for t in LORA_TARGETS if t in targets or "all-linear" in targets]


def apply_lora(model, rank, alpha, targets, seed=0, dtype=torch.float32):
    """Freeze every parameter, then swap the target projections of every decoder layer for LoraLinear.

    A is drawn from its own generator (seed), layer by layer in LORA_TARGETS order, so every rank
    builds the same adapter before FSDP shards it. Works on a meta-device model too (no init then).
    """
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for name in lora_target_names(targets):
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            lora = LoraLinear(getattr(parent, name), rank, alpha, dtype)
            a = torch.empty(lora.lora_A.weight.shape)
            nn.init.kaiming_uniform_(a, a=5 ** 0.5, generator=gen)  # PEFT's init: bound 1/sqrt(in_features)
            with torch.no_grad():
                if lora.weight.device.type != "meta":
                    lora.lora_A.weight.copy_(a)
                    lora.lora_B.weight.zero_()  # B = 0: the model starts exactly as the base
            setattr(parent, name, lora)
    return model


def is_lora_key(name):
    return ".lora_A." in name or ".lora_B." in name


def merge_lora(state_dict, rank, alpha):
    """A full state dict with LoRA keys -> the plain HF state dict: W + (alpha / r) * B @ A (in fp32,
    returned in W's dtype), LoRA keys removed. What transformers and vLLM load without peft."""
    out = {k: v for k, v in state_dict.items() if not is_lora_key(k)}
    for key in state_dict:
        if key.endswith(".lora_A.weight"):
            prefix = key.removesuffix(".lora_A.weight")
            a, b, w = state_dict[key].float(), state_dict[prefix + ".lora_B.weight"].float(), out[prefix + ".weight"]
            out[prefix + ".weight"] = (w.float() + (alpha / rank) * (b @ a)).to(w.dtype)  # (out, r) @ (r, in)
    return out


def save_lora_adapter(state_dict, path, rank, alpha, targets, base_model):
    """PEFT's adapter layout: adapter_model.safetensors (keys `base_model.model.<our name>`, fp32 as
    trained) and adapter_config.json; loads with peft's PeftModel.from_pretrained(base, path) and
    vLLM's LoRARequest."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"base_model.model." + k: v.detach().cpu().contiguous() for k, v in state_dict.items() if is_lora_key(k)}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base_model), r=rank,
                  lora_alpha=alpha, target_modules=lora_target_names(targets), lora_dropout=0.0, bias="none",
                  fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
                  modules_to_save=None, inference_mode=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def count_trained(model):
    """(trained, total) parameter counts; a tied LM head counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
