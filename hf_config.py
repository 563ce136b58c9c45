"""config.json of a Hugging Face model dir, read in every dialect our decoders meet (model.py builds from the result).

Qwen2 / Qwen3: the file is returned as written, checked to be a model we build; RoPE as transformers 4 and 5
write it (rope_theta at top level or inside rope_parameters / rope_scaling; types default, linear and yarn),
head_dim from the config or the family's rule, sliding-window attention refused. Qwen3.5 (qwen3_5 with the
decoder under text_config, or text-only qwen3_5_text): one flat decoder config with transformers' defaults
filled in and layer_types resolved. Every refusal is a ModelError, one sentence with the fix.
"""
import json
import math
from pathlib import Path

import torch


class ModelError(Exception):
    """A user-caused problem with a model directory; the message is one sentence with the fix."""


REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "rms_norm_eps")


def read_config(path):
    """config.json of a model dir as a dict (as written), checked to be a Qwen2/Qwen3 we can build."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ModelError(f"{file} not found: model.partial_pretrain must be a Hugging Face model "
                         "directory with config.json, *.safetensors and tokenizer.json.")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{file} is not valid JSON ({e}); restore the model's config.json.") from None
    if str(cfg.get("model_type")).startswith("qwen3_5"):
        return qwen3_5_text_config(cfg, file)  # flat: the decoder's fields at top level
    if cfg.get("model_type") not in ("qwen2", "qwen3"):
        raise ModelError(f"{file} has model_type {cfg.get('model_type')!r}; this trainer builds only "
                         "Qwen2 and dense Qwen3 models (model_type 'qwen2', 'qwen3') and dense Qwen3.5 ('qwen3_5').")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ModelError(f"{file} lacks {', '.join(missing)}; use the config.json that came with the weights.")
    check_full_attention(cfg, file)
    rope_parameters(cfg, where=file)  # an unknown RoPE type stops here, before any weight is read
    return cfg


def head_dim_of(cfg):
    """Per-head size: config's head_dim, else Qwen3's class default 128, else hidden / heads (Qwen2)."""
    if cfg.get("head_dim"):
        return cfg["head_dim"]
    return 128 if cfg.get("model_type") == "qwen3" else cfg["hidden_size"] // cfg["num_attention_heads"]


def rope_parameters(cfg, where="config.json"):
    """(inv_freq (D/2,) fp32 on CPU, attention_scaling) for the config's RoPE, as transformers 5 computes them.

    transformers 4 wrote rope_theta at top level and scaling in rope_scaling (key "type"); transformers 5
    writes both inside rope_parameters (key "rope_type"). As in transformers, a non-empty rope_scaling
    wins over rope_parameters, and a rope_theta inside the dict over the top-level one.
    """
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0
    if any(isinstance(v, dict) for v in rope.values()) or partial != 1.0:
        raise ModelError(f"{where} has per-layer or partial rotary parameters, which Qwen2/Qwen3 do not use; "
                         "use the config.json that came with the weights.")
    base = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    dim = head_dim_of(cfg)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)  # (D/2,) theta^(2j/D)
    if rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if rope_type == "linear":
        if not rope.get("factor"):
            raise ModelError(f"{where} has RoPE type 'linear' without a factor; add the model's factor.")
        # Positions divided by factor, folded into the frequencies (the same product).
        return (1.0 / pos_freqs) / rope["factor"], 1.0
    if rope_type == "yarn":
        return yarn_inv_freq(cfg, rope, base, dim, pos_freqs)
    raise ModelError(f"{where} asks for RoPE type {rope_type!r}; this trainer computes only 'default', "
                     "'linear' and 'yarn', so use a config.json with one of those.")


def yarn_inv_freq(cfg, rope, base, dim, pos_freqs):
    """YaRN: interpolated (1/factor) low frequencies, original high ones, a linear ramp between, and
    cos/sin scaled by the attention factor. Every step and rounding mirrors transformers 5."""
    # A top-level original_max_position_embeddings wins (transformers keeps it for Phi3-style configs).
    original = (cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                or cfg.get("max_position_embeddings", 32768))
    factor = rope.get("factor") or cfg.get("max_position_embeddings", 32768) / original

    def mscale(scale, m=1.0):  # the paper's 0.1 ln(s) + 1 temperature; none without stretching
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_scaling = rope.get("attention_factor")
    if attention_scaling is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_scaling = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` turns in `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.get("beta_fast") or 32), correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # (D/2,)
    extrapolation = 1 - ramp  # 1 = keep the original frequency (fast dims), 0 = interpolate (slow dims)
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return inv_freq, attention_scaling


def check_full_attention(cfg, file):
    """Stop on a config that turns sliding-window attention on for some layer (transformers' rule)."""
    layer_types = cfg.get("layer_types")
    if layer_types is not None:  # transformers 5 writes the per-layer result
        windowed = "sliding_attention" in layer_types
    else:  # transformers' default: layers from max_window_layers on slide, when use_sliding_window is set
        windowed = (bool(cfg.get("use_sliding_window")) and cfg.get("sliding_window") is not None
                    and cfg.get("max_window_layers", 28) < cfg["num_hidden_layers"])
    if windowed:
        raise ModelError(f"{file} turns on sliding-window attention for some layers, which the attention kernel "
                         "does not implement; set use_sliding_window to false (and layer_types to all "
                         "'full_attention') to train with full attention.")


# Qwen3.5's text config: transformers' Qwen3_5TextConfig defaults for the fields a config.json may leave out.
QWEN3_5_DEFAULTS = dict(head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                        linear_num_key_heads=16, linear_num_value_heads=32, hidden_act="silu", attention_bias=False,
                        tie_word_embeddings=False, full_attention_interval=4)


def qwen3_5_text_config(cfg, file="config.json"):
    """The flat decoder config (model_type qwen3_5_text, transformers' defaults filled in, layer_types resolved)
    of a qwen3_5 config (decoder fields under text_config) or a text-only qwen3_5_text one; a no-op on its result.

    The composite model ties its LM head by the top-level tie_word_embeddings, so that one wins.
    """
    kind = cfg.get("model_type")
    if kind in ("qwen3_5_moe", "qwen3_5_moe_text"):
        raise ModelError(f"{file} is a Qwen3.5 mixture-of-experts model ({kind}); this trainer builds only the "
                         "dense Qwen3.5 sizes (model_type 'qwen3_5'), so pick a dense checkpoint.")
    text = cfg.get("text_config") if kind == "qwen3_5" else cfg
    if not isinstance(text, dict):
        raise ModelError(f"{file} has model_type 'qwen3_5' but no text_config object; use the config.json "
                         "that came with the weights.")
    flat = {**QWEN3_5_DEFAULTS, "architectures": ["Qwen3_5ForCausalLM"], **text, "model_type": "qwen3_5_text"}
    if kind == "qwen3_5":
        flat["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    missing = [k for k in REQUIRED_KEYS if k not in flat]
    if missing:
        raise ModelError(f"{file} lacks {', '.join(missing)} in its text config; use the config.json that came "
                         "with the weights.")
    n, every = flat["num_hidden_layers"], flat["full_attention_interval"]
    if flat.get("layer_types") is None:  # transformers' default: full attention every `every`-th layer
        flat["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    rope = flat.get("rope_parameters") or flat.get("rope_scaling") or {}
    problems = [
        (len(flat["layer_types"]) != n, f"layer_types has {len(flat['layer_types'])} entries for {n} layers"),
        (not set(flat["layer_types"]) <= {"linear_attention", "full_attention"},
         f"layer_types holds {sorted(set(flat['layer_types']) - {'linear_attention', 'full_attention'})}"),
        (flat["linear_num_value_heads"] % flat["linear_num_key_heads"] != 0,
         "linear_num_value_heads is not a multiple of linear_num_key_heads"),
        (flat["num_attention_heads"] % flat["num_key_value_heads"] != 0,
         "num_attention_heads is not a multiple of num_key_value_heads"),
        (flat["hidden_act"] != "silu", f"hidden_act is {flat['hidden_act']!r}, not 'silu'"),
        (flat.get("attn_output_gate") is False, "attn_output_gate is false (only the gated attention is built)"),
        (rope.get("rope_type", rope.get("type", "default")) != "default",
         f"RoPE type {rope.get('rope_type', rope.get('type'))!r} is not the default (multimodal) RoPE"),
        (int(flat["head_dim"] * qwen3_5_partial_rotary(flat)) % 2 != 0, "the rotary part of head_dim is odd"),
    ]
    for bad, what in problems:
        if bad:
            raise ModelError(f"{file}: {what}, which this trainer's Qwen3.5 decoder cannot build; use the "
                             "config.json that came with the weights.")
    return flat


def qwen3_5_partial_rotary(cfg):
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return rope.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 0.25


def qwen3_5_inv_freq(cfg):
    """inv_freq (R/2,) fp32 on CPU for the rotated R = partial_rotary_factor * head_dim dims (64 of 256)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    base = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    dim = int(cfg["head_dim"] * qwen3_5_partial_rotary(cfg))
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
