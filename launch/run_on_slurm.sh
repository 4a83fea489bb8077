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

BATCH_TOKENS=${BATCH_TOKENS:-8M}
NODES=$SLURM_JOB_NUM_NODES
GPUS_PER_NODE=8
# shellcheck source=launch/plan_args.sh
source "$(dirname "${BASH_SOURCE[0]}")/plan_args.sh"

# No `| head` here: head closes the pipe early, and under pipefail scontrol's SIGPIPE would end the job (exit 141).
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${hosts%%$'\n'*}
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-29500}

mkdir -p "$OUTPUT_DIR"
# Fails here, before any node starts, when no layout fits (the message says why).
"$PYTHON" -m megatron_muon.cluster "${plan[@]}" --dry-run
# One task per node; each resolves the same plan and replaces itself with torchrun (c10d rendezvous).
srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m megatron_muon.cluster "${plan[@]}" -- "$@"
