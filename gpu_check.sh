#!/usr/bin/env bash
# The one GPU session script: correctness on the GPU, then the measurements BENCHMARKS.md records.
# Runs with the machine's own python3 (no venv, no internet): PYTHON=python3 bash gpu_check.sh [SECTION ...]
# Sections (default: all, about 10 minutes on one H200; a lent GPU has 15 minutes in all, so a first
# session runs `tests attention gdn` in one call and `step smoke` in a second):
#   tests      GPU-only tests: kernels in bf16, the models on the kernels, the fused loss, the delta rule
#   attention  sft_kernels/bench_attention.py: ours vs SDPA-flash at head_dim 64 (Qwen2.5) and 256 (Qwen3.5)
#   gdn        sft_kernels/bench_gdn.py: our Triton delta rule vs the torch chunked path (and fla if installed)
#   step       bench.py: training steps of Qwen2.5-0.5B (2k/8k/16k) and Qwen3.5-0.8B shapes
#   smoke      train.py on the embedded default, 1 GPU, 5 steps, full and LoRA
# Writes every log under ${OUT:-gpu_logs}/.
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_logs}
SECTIONS=${*:-tests attention gdn step smoke}
mkdir -p "$OUT"
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/machine.txt"

if want tests; then
  step "GPU tests (kernels in bf16, models on the kernels, fused loss, delta rule)"
  if "$PY" -c 'import pytest' 2>/dev/null; then
    timeout 300 "$PY" -m pytest -q -x tests/test_attention.py tests/test_model.py tests/test_lm_head_loss.py \
      tests/test_gated_delta_rule.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
  else
    echo "pytest is not installed here; the benchmarks below check correctness themselves" | tee "$OUT/tests.txt"
  fi
fi

if want attention; then
  step "attention kernel vs SDPA-flash (head_dim 64 and 256)"
  timeout 300 "$PY" sft_kernels/bench_attention.py 2>&1 | tee "$OUT/bench_attention.txt"
fi

if want gdn; then
  step "gated delta rule: Triton vs torch chunked (vs fla when installed)"
  timeout 200 "$PY" sft_kernels/bench_gdn.py 2>&1 | tee "$OUT/bench_gdn.txt"
fi

if want step; then
  step "training step: ours vs plain (vs transformers when installed), Qwen2.5-0.5B shapes"
  timeout 300 "$PY" bench.py --out "$OUT/bench_table.md" 2>&1 | tee "$OUT/bench.txt"
  step "training step: Qwen3.5-0.8B shapes"
  timeout 240 "$PY" bench.py --config qwen3.5-0.8b --out "$OUT/bench_qwen35_table.md" 2>&1 | tee "$OUT/bench_qwen35.txt"
fi

if want smoke; then
  "$PY" demo.py "$OUT/demo" > /dev/null
  for lora in 0 8; do  # full fine-tuning, then LoRA (bf16 base, fp32 adapters)
    step "trainer smoke: 1 GPU, embedded default, 5 steps, lora_rank=$lora"
    timeout 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py \
      data.train_files="$OUT/demo/data/train.parquet" data.val_files="$OUT/demo/data/val.parquet" \
      data.train_batch_size=16 data.micro_batch_size_per_gpu=2 data.multiturn.enable=true data.max_length=16384 \
      model.partial_pretrain="$OUT/demo/model" trainer.total_training_steps=5 \
      trainer.default_local_dir="$OUT/ckpt$lora" model.lora_rank=$lora model.fsdp_config.model_dtype=$([ $lora = 0 ] && echo fp32 || echo bf16) \
      use_remove_padding=true optim.lr=2e-3 2>&1 | grep -v "^config" | tail -12 | tee "$OUT/train_lora$lora.txt"
  done
  rm -rf "$OUT/demo" "$OUT"/ckpt*
fi
echo; echo "done: logs in $OUT/"
