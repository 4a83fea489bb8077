#!/usr/bin/env bash
# One 8-GPU node, no SLURM: the same plan as the sbatch scripts, launched with torchrun --standalone.
#   MODEL=4b OPTIMIZER=muon LR=3e-3 BATCH_TOKENS=1M launch/torchrun_single_node.sh [extra training flags]
#   DRY_RUN=1 ... prints the plan and the command only.
# Variables as in run_on_slurm.sh; GPUS (default 8) for a node with fewer GPUs.
set -euo pipefail

: "${MODEL:?set MODEL (e.g. 4b, 3.67b)}"
: "${OPTIMIZER:?set OPTIMIZER (muon or adam)}"
: "${LR:?set LR, the peak learning rate (the paper does not publish its values)}"
BATCH_TOKENS=${BATCH_TOKENS:-1M}
RUN_NAME=${RUN_NAME:-${MODEL}-${OPTIMIZER}-${BATCH_TOKENS}}
OUTPUT_DIR=${OUTPUT_DIR:-runs/${RUN_NAME}}
PYTHON=${PYTHON:-python}

plan=(--model "$MODEL" --optimizer "$OPTIMIZER" --nodes 1 --gpus-per-node "${GPUS:-8}"
      --batch-tokens "$BATCH_TOKENS" --lr "$LR" --ns-precision "${NS_PRECISION:-bf16}" --run-name "$RUN_NAME"
      --save-dir "$OUTPUT_DIR/checkpoints" --save-interval "${SAVE_INTERVAL:-1000}"
      --tensorboard-dir "$OUTPUT_DIR/tensorboard")
if [[ -n ${TRAIN_TOKENS:-} ]]; then plan+=(--train-tokens "$TRAIN_TOKENS"); fi
if [[ -n ${WANDB_PROJECT:-} ]]; then plan+=(--wandb-project "$WANDB_PROJECT"); fi
# shellcheck disable=SC2206
if [[ -n ${DATA_PATH:-} ]]; then plan+=(--data-path $DATA_PATH); fi
if [[ -n ${TOKENIZER_MODEL:-} ]]; then
    plan+=(--tokenizer-type "${TOKENIZER_TYPE:-HuggingFaceTokenizer}" --tokenizer-model "$TOKENIZER_MODEL")
fi
if [[ -n ${DRY_RUN:-} ]]; then plan+=(--dry-run); fi

exec "$PYTHON" -m megatron_muon.cluster "${plan[@]}" -- "$@"
