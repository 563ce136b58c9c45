#!/usr/bin/env bash
# The reference job (verl's multi-turn SFT example) with train.py in place of
# `-m verl.trainer.fsdp_sft_trainer`. Every variable below can be overridden from the environment;
# extra key=value arguments go last, so they win (bash run.sh trainer.total_epochs=1). With none of
# MODEL_PATH, TRAIN_DATA, EVAL_DATA set and the default paths absent, it builds and says so a small
# embedded default (demo.py); a path that is set must exist.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh requirements.txt

nnodes=${NNODES:-1}; nproc_per_node=${nproc_per_node:-2}
experiment_name=${experiment_name:-multiturn-sft-Qwen2.5-0.5B-Instruct}
user_paths=${MODEL_PATH+M}${TRAIN_DATA+T}${EVAL_DATA+E}  # empty when the user set none of them
HDFS_ROOT=${HDFS_ROOT:-$PWD}; DATA_ROOT=${DATA_ROOT:-$PWD}
TRAIN_DATA=${TRAIN_DATA:-$DATA_ROOT/dataset/ReTool-SFT/data/train-00000-of-00001.parquet}
EVAL_DATA=${EVAL_DATA:-$TRAIN_DATA}
MODEL_PATH=${MODEL_PATH:-$HDFS_ROOT/model/Qwen2.5-0.5B-Instruct}
SAVE_PATH=${SAVE_PATH:-$DATA_ROOT/checkpoint/$experiment_name}

extra=()
if [ -z "$user_paths" ] && { [ ! -f "$MODEL_PATH/config.json" ] || [ ! -e "$TRAIN_DATA" ]; }; then
  echo "run.sh: $MODEL_PATH or $TRAIN_DATA not found; using the embedded default instead:"
  echo "        a small random-init Qwen2 and a synthetic ReTool-style dataset (python demo.py demo)."
  # (re)built when absent or written by another demo.py (its VERSION line against demo/version.txt)
  [ "$(cat demo/version.txt 2>/dev/null)" = "$(sed -n 's/^VERSION = //p' demo.py)" ] || { "$PYTHON" demo.py demo
    [ ! -d "$SAVE_PATH" ] || echo "run.sh: $SAVE_PATH holds a run on the older demo, which a resume would continue;" \
      "remove it (rm -rf $SAVE_PATH) to train on the new one."; }
  MODEL_PATH=$PWD/demo/model; TRAIN_DATA=$PWD/demo/data/train.parquet; EVAL_DATA=$PWD/demo/data/val.parquet
  extra+=(optim.lr=1e-2)  # a random-init model learns nothing visible at the fine-tuning lr of 1e-5
fi
for var in MODEL_PATH TRAIN_DATA EVAL_DATA; do  # a typo must not silently train something else
  [ -e "${!var}" ] || { echo "run.sh: error: $var=${!var} does not exist; fix the path (or set none of" \
    "MODEL_PATH, TRAIN_DATA, EVAL_DATA for the embedded default)." >&2; exit 2; }
done

if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" = 0 ]; then
  echo "run.sh: no GPU; running on $nproc_per_node CPU processes (gloo)."
  extra+=(trainer.device=cpu)
fi

launch=(--standalone --nnodes=1)
[ "$nnodes" = 1 ] || launch=(--nnodes="$nnodes" --node_rank="${NODE_RANK:?set NODE_RANK on every node}"
  --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}")

args=(data.train_files="$TRAIN_DATA" data.val_files="$EVAL_DATA" data.max_length=16384
  data.train_batch_size=16 data.multiturn.enable=true data.multiturn.messages_key=messages
  data.multiturn.tools_key=tools data.micro_batch_size_per_gpu=2
  model.partial_pretrain="$MODEL_PATH" model.strategy=fsdp
  trainer.default_local_dir="$SAVE_PATH" trainer.project_name=wuxibin-multiturn-sft
  trainer.experiment_name="$experiment_name" trainer.logger='["console"]' trainer.total_epochs=2
  ulysses_sequence_parallel_size=2 use_remove_padding=true "${extra[@]}" "$@")
# Every user error (keys, batch arithmetic, paths, model dir, template, each data row) in one process
# first: one `error:` line, exit 2. It also fills the data cache the workers read.
"$PYTHON" train.py --preflight=$((nnodes * nproc_per_node)) "${args[@]}"
# torchrun without its dumps for the ends already explained (launch.py): a worker's exit 2 is its one
# `error:` line; Ctrl-C / SIGTERM stop the workers after a save, then launch.py exits 3.
"$PYTHON" launch.py "${launch[@]}" --nproc_per_node="$nproc_per_node" train.py "${args[@]}" || rc=$?
if [ "${rc:-0}" = 3 ]; then
  echo "run.sh: stopped by a signal, so no sample reply (exit code 0: the checkpoint is complete)."
  exit 0
fi
[ "${rc:-0}" = 0 ] || exit "$rc"

# One reply of the final checkpoint to the first validation row's first assistant turn (a tool call in
# ReTool data), beside the reference, and where the loss curve is (when the run saved into SAVE_PATH).
if [ "${NODE_RANK:-0}" = 0 ] && [ -f "$SAVE_PATH/latest_checkpointed_iteration.txt" ]; then
  ckpt=$SAVE_PATH/global_step_$(cat "$SAVE_PATH/latest_checkpointed_iteration.txt")/huggingface
  "$PYTHON" generate.py "$ckpt" --data "$EVAL_DATA" --rows 0 --turn 0 --max_new_tokens 200
  # ... and how its free-running tool calls score: every tool-call turn of the first validation rows
  "$PYTHON" generate.py "$ckpt" --data "$EVAL_DATA" --rows "0:${SCORE_ROWS:-16}" --score --max_new_tokens 200
  echo "run.sh: loss curve in $SAVE_PATH/loss.png"
fi
