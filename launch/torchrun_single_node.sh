#!/usr/bin/env bash
# One 8-GPU node, no SLURM: the same plan as the sbatch scripts, launched with torchrun --standalone.
#   MODEL=4b OPTIMIZER=muon LR=3e-3 BATCH_TOKENS=1M launch/torchrun_single_node.sh [extra training flags]
#   DRY_RUN=1 ... prints the plan and the command only.
# Variables as in run_on_slurm.sh; GPUS (default 8) for a node with fewer GPUs.
set -euo pipefail

BATCH_TOKENS=${BATCH_TOKENS:-1M}
NODES=1
GPUS_PER_NODE=${GPUS:-8}
# shellcheck source=launch/plan_args.sh
source "$(dirname "${BASH_SOURCE[0]}")/plan_args.sh"
if [[ -n ${DRY_RUN:-} ]]; then plan+=(--dry-run); fi

exec "$PYTHON" -m megatron_muon.cluster "${plan[@]}" -- "$@"
