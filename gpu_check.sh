#!/usr/bin/env bash
# The one GPU session script: correctness on the GPU, then the measurements BENCHMARKS.md records.
# Runs with the machine's own python3 (no venv, no internet): PYTHON=python3 bash gpu_check.sh
# Writes every log under ${OUT:-gpu_logs}/. About 8 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/machine.txt"

step "GPU tests (kernel bf16 accuracy, model on the kernel, fused loss)"
if "$PY" -c 'import pytest' 2>/dev/null; then
  timeout 300 "$PY" -m pytest -q -x tests/test_attention.py tests/test_model.py tests/test_lm_head_loss.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
else
  echo "pytest is not installed here; the benchmarks below check correctness themselves" | tee "$OUT/tests.txt"
fi

step "attention kernel vs SDPA-flash"
timeout 240 "$PY" sft_kernels/bench_attention.py 2>&1 | tee "$OUT/bench_attention.txt"

step "training step: ours vs plain (vs transformers when installed)"
timeout 360 "$PY" bench.py --out "$OUT/bench_table.md" 2>&1 | tee "$OUT/bench.txt"

"$PY" demo.py "$OUT/demo" > /dev/null
for lora in 0 8; do  # full fine-tuning, then LoRA (bf16 base, fp32 adapters)
  step "trainer smoke: 1 GPU, embedded default, 5 steps, lora_rank=$lora"
  timeout 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py \
    data.train_files="$OUT/demo/data/train.parquet" data.val_files="$OUT/demo/data/val.parquet" \
    data.train_batch_size=16 data.micro_batch_size_per_gpu=2 data.multiturn.enable=true data.max_length=16384 \
    model.partial_pretrain="$OUT/demo/model" data.chat_template=qwen2.5 trainer.total_training_steps=5 \
    trainer.default_local_dir="$OUT/ckpt$lora" model.lora_rank=$lora model.fsdp_config.model_dtype=$([ $lora = 0 ] && echo fp32 || echo bf16) \
    use_remove_padding=true optim.lr=2e-3 2>&1 | grep -v "^config" | tail -12 | tee "$OUT/train_lora$lora.txt"
done
rm -rf "$OUT/demo" "$OUT"/ckpt*
echo; echo "done: logs in $OUT/"
