"""bench.py runs end to end on a CPU (tiny config) and every variant trains to the same loss."""
import subprocess
import sys

import numpy as np

import bench
from conftest import ROOT


def test_pack_is_multiturn_like():
    b = bench.make_pack(1024, 256, vocab=100, rng=np.random.default_rng(0))
    assert b["input_ids"].numel() == 1024 and b["cu_seqlens"].tolist() == [0, 256, 512, 768, 1024]
    trained = float((b["labels"] != -100).float().mean())
    assert 0.2 < trained < 0.8  # alternating untrained / trained turns


def test_tiny_run_prints_table(tmp_path):
    out = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, "bench.py", "--config", "tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| variant | samples x len | tokens/s | MFU | peak GiB | loss |" in proc.stdout
    rows = [line.strip("|").split("|") for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    rows = [[c.strip() for c in r] for r in rows]
    assert {r[0] for r in rows} >= {"ours", "ours+recompute", "plain"}
    assert {r[1] for r in rows} == {"4 x 64", "2 x 128"}
    for shape in ("4 x 64", "2 x 128"):
        # Same weights, same batches, same optimizer: fused loss, recompute and HF all train identically.
        losses = [float(r[5]) for r in rows if r[1] == shape]
        assert max(losses) - min(losses) < 1e-3, rows


def test_memory_counts_full_vs_lora():
    """bench.py --memory against the closed forms: full = 16 bytes per fp32 parameter (weight, grad, two
    AdamW moments) over the ranks; LoRA trains r x (in + out) per target linear, the base has no grad/state."""
    cfg = bench.CONFIGS["tiny"]
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    n = sum(p.numel() for p in bench.M.build_random(cfg).parameters())
    full = bench.training_state_bytes(cfg, 0, bench.torch.float32, world_size=2)
    assert full["trained"] == full["total"] == n
    assert full["params"] + full["grads"] + full["adam"] == 16 * n / 2
    lora = bench.training_state_bytes(cfg, 8, bench.torch.bfloat16, world_size=2)
    n_lora = 8 * L * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)  # q, o; k, v; gate, up, down
    assert lora["trained"] == n_lora and lora["total"] == n + n_lora
    assert lora["params"] == (2 * n + 4 * n_lora) / 2  # bf16 base, fp32 adapters
    assert lora["grads"] + lora["adam"] == 12 * n_lora / 2
    assert "| qwen2.5-7b | bfloat16 | LoRA r=16 | 40.4M of 7.66B |" in bench.memory_table(["qwen2.5-7b"], [16], 2)
