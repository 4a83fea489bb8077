#!/usr/bin/env bash
# The body of every sbatch script here: plan the run once into the job log, then start one torchrun per node.
#
# Set by the calling sbatch script or the environment (see launch/README.md):
#   MODEL, OPTIMIZER (muon | adam), LR (peak learning rate: required, the paper publishes none)
#   BATCH_TOKENS (default 8M = 2^23), NS_PRECISION (fp32 | bf16 | fp8, default bf16), TRAIN_TOKENS,
#   OUTPUT_DIR, SAVE_INTERVAL, WANDB_PROJECT, DATA_PATH (Megatron prefixes, space separated),
#   TOKENIZER_TYPE + TOKENIZER_MODEL, PYTHON, MASTER_PORT
# Arguments given to the sbatch script are passed on to the training entry unchanged.
set -euo pipefail

: "${MODEL:?set MODEL (e.g. 4b, 3.67b)}"
: "${OPTIMIZER:?set OPTIMIZER (muon or adam)}"
: "${LR:?set LR, the peak learning rate (the paper does not publish its values)}"
BATCH_TOKENS=${BATCH_TOKENS:-8M}
NS_PRECISION=${NS_PRECISION:-bf16}
RUN_NAME=${RUN_NAME:-${MODEL}-${OPTIMIZER}-${BATCH_TOKENS}}
OUTPUT_DIR=${OUTPUT_DIR:-runs/${RUN_NAME}}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
PYTHON=${PYTHON:-python}

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-29500}

plan=(--model "$MODEL" --optimizer "$OPTIMIZER" --nodes "$SLURM_JOB_NUM_NODES" --gpus-per-node 8
      --batch-tokens "$BATCH_TOKENS" --lr "$LR" --ns-precision "$NS_PRECISION" --run-name "$RUN_NAME"
      --save-dir "$OUTPUT_DIR/checkpoints" --save-interval "$SAVE_INTERVAL"
      --tensorboard-dir "$OUTPUT_DIR/tensorboard")
if [[ -n ${TRAIN_TOKENS:-} ]]; then plan+=(--train-tokens "$TRAIN_TOKENS"); fi
if [[ -n ${WANDB_PROJECT:-} ]]; then plan+=(--wandb-project "$WANDB_PROJECT"); fi
# shellcheck disable=SC2206  # DATA_PATH is a list of prefixes (or weight prefix pairs)
if [[ -n ${DATA_PATH:-} ]]; then plan+=(--data-path $DATA_PATH); fi
if [[ -n ${TOKENIZER_MODEL:-} ]]; then
    plan+=(--tokenizer-type "${TOKENIZER_TYPE:-HuggingFaceTokenizer}" --tokenizer-model "$TOKENIZER_MODEL")
fi

mkdir -p "$OUTPUT_DIR"
# Fails here, before any node starts, when no layout fits (the message says why).
"$PYTHON" -m megatron_muon.cluster "${plan[@]}" --dry-run
# One task per node; each resolves the same plan and replaces itself with torchrun (c10d rendezvous).
srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m megatron_muon.cluster "${plan[@]}" -- "$@"
