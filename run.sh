#!/usr/bin/env bash
# The reference job (verl's multi-turn SFT example) with train.py in place of
# `-m verl.trainer.fsdp_sft_trainer`. Every variable below can be overridden from the environment;
# extra key=value arguments are passed last, so they win:  bash run.sh trainer.total_epochs=1
# Without the model or data it points at, it builds a small embedded default (demo.py) and says so.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh requirements.txt

nnodes=${NNODES:-1}; nproc_per_node=${nproc_per_node:-2}
experiment_name=${experiment_name:-multiturn-sft-Qwen2.5-0.5B-Instruct}
HDFS_ROOT=${HDFS_ROOT:-$PWD}; DATA_ROOT=${DATA_ROOT:-$PWD}
TRAIN_DATA=${TRAIN_DATA:-$DATA_ROOT/dataset/ReTool-SFT/data/train-00000-of-00001.parquet}
EVAL_DATA=${EVAL_DATA:-$TRAIN_DATA}
MODEL_PATH=${MODEL_PATH:-$HDFS_ROOT/model/Qwen2.5-0.5B-Instruct}
SAVE_PATH=${SAVE_PATH:-$DATA_ROOT/checkpoint/$experiment_name}

extra=(); chat_template=auto
if [ ! -f "$MODEL_PATH/config.json" ] || [ ! -e "$TRAIN_DATA" ]; then
  echo "run.sh: $MODEL_PATH or $TRAIN_DATA not found; using the embedded default instead:"
  echo "        a small random-init Qwen2 and a synthetic ReTool-style dataset (python demo.py demo)."
  [ -f demo/model/config.json ] || "$PYTHON" demo.py demo
  MODEL_PATH=$PWD/demo/model; TRAIN_DATA=$PWD/demo/data/train.parquet; EVAL_DATA=$PWD/demo/data/val.parquet
  extra+=(optim.lr=2e-3)  # a random-init model learns nothing visible at the fine-tuning lr of 1e-5
  extra+=(data.chat_template=qwen2.5)  # the demo model ships no chat template; its rows use Qwen2.5's
  chat_template=qwen2.5  # ... and so does generate.py below
fi

if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" = 0 ]; then
  echo "run.sh: no GPU; running on $nproc_per_node CPU processes (gloo)."
  extra+=(trainer.device=cpu)
fi

if [ "$nnodes" = 1 ]; then
  launch=(--standalone --nnodes=1)
else
  launch=(--nnodes="$nnodes" --node_rank="${NODE_RANK:?set NODE_RANK on every node}"
          --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}")
fi

"$PYTHON" -m torch.distributed.run "${launch[@]}" --nproc_per_node="$nproc_per_node" train.py \
  data.train_files="$TRAIN_DATA" data.val_files="$EVAL_DATA" data.max_length=16384 \
  data.train_batch_size=16 data.multiturn.enable=true data.multiturn.messages_key=messages \
  data.multiturn.tools_key=tools data.micro_batch_size_per_gpu=2 \
  model.partial_pretrain="$MODEL_PATH" model.strategy=fsdp \
  trainer.default_local_dir="$SAVE_PATH" trainer.project_name=wuxibin-multiturn-sft \
  trainer.experiment_name="$experiment_name" trainer.logger='["console"]' trainer.total_epochs=2 \
  ulysses_sequence_parallel_size=2 use_remove_padding=true "${extra[@]}" "$@"

# One reply of the final checkpoint to the first validation row's first assistant turn (a tool call in
# ReTool data), beside the reference, and where the loss curve is (when the run saved into SAVE_PATH).
if [ "${NODE_RANK:-0}" = 0 ] && [ -f "$SAVE_PATH/latest_checkpointed_iteration.txt" ]; then
  ckpt=$SAVE_PATH/global_step_$(cat "$SAVE_PATH/latest_checkpointed_iteration.txt")/huggingface
  "$PYTHON" generate.py "$ckpt" --data "$EVAL_DATA" --rows 0 --turn 0 --max_new_tokens 200 \
    --chat_template "$chat_template"
  echo "run.sh: loss curve in $SAVE_PATH/loss.png"
fi
