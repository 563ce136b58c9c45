"""Tiny Qwen3.5 configs and checkpoints for tests: a text decoder of 4 layers (L, L, L, F) with every shape
distinct enough to catch a mixed-up head layout, and a multimodal (qwen3_5) layout with a 1-block vision tower
and fabricated mtp.* tensors, written the way the released checkpoints are (sharded, decoder under
model.language_model.*)."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TEXT = dict(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"], vocab_size=128, hidden_size=64,
            intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
            linear_conv_kernel_dim=4, rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=1024,
            full_attention_interval=4, attn_output_gate=True, tie_word_embeddings=False,
            # rotary dims = 0.25 * 32 = 8, i.e. 4 frequencies split 2/1/1 over the (text-identical) mrope axes
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                                 mrope_section=[2, 1, 1], mrope_interleaved=True))

VISION = dict(model_type="qwen3_5", depth=1, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3,
              out_hidden_size=64, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
              num_position_embeddings=16, hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=[])


def text_config(**over):
    return {**TEXT, **over}


def multimodal_config(tied=False, **over):
    """A qwen3_5 config.json as released: the decoder under text_config, the LM-head tie at top level too."""
    text = {k: v for k, v in TEXT.items() if k != "architectures"}
    return dict(architectures=["Qwen3_5ForConditionalGeneration"], model_type="qwen3_5",
                text_config={**text, "tie_word_embeddings": tied, **over}, vision_config=dict(VISION),
                tie_word_embeddings=tied, image_token_id=120, video_token_id=121, vision_start_token_id=122,
                vision_end_token_id=123)


def perturb_(model, seed=0):
    """Give every 1-D parameter (norms, A_log, dt_bias) non-default values so tests see them used."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def write_sharded(path, tensors, config, n_shards=3):
    """config.json + tensors split over n_shards files with an index, as from_pretrained writes large models."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        part = names[i::n_shards]
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def mtp_tensors(cfg, seed=0, dtype=torch.bfloat16):
    """Stand-ins for the released checkpoints' multi-token-prediction layer (names as in Qwen3.8-27B's index)."""
    gen = torch.Generator().manual_seed(seed)
    h, t = cfg["hidden_size"], cfg
    shapes = {"mtp.fc.weight": (h, 2 * h), "mtp.norm.weight": (h,), "mtp.pre_fc_norm_embedding.weight": (h,),
              "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.layers.0.mlp.up_proj.weight": (t["intermediate_size"], h),
              "mtp.layers.0.self_attn.k_proj.weight": (t["num_key_value_heads"] * t["head_dim"], h)}
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
