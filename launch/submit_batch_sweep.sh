#!/usr/bin/env bash
# The batch-size sweep of the paper's Sec. 2 on H100 nodes: both optimizers, 1M to 16M tokens per step, one job
# each. Nodes grow with the batch (1M -> 2 nodes ... 16M -> 32 nodes: 8 sequences of 8192 tokens per GPU per
# step), as the paper grew its TPU count with the batch.
#   MODEL=4b LR_MUON=3e-3 LR_ADAM=1e-3 launch/submit_batch_sweep.sh          (DRY_RUN=1: print the sbatch lines)
set -euo pipefail
: "${MODEL:?set MODEL (4b or 3.67b)}"
: "${LR_MUON:?set LR_MUON}" "${LR_ADAM:?set LR_ADAM}"
declare -A NODES=([1M]=2 [2M]=4 [4M]=8 [8M]=16 [16M]=32)
for batch in 1M 2M 4M 8M 16M; do
    for optimizer in muon adamw; do
        lr=$([[ $optimizer == muon ]] && echo "$LR_MUON" || echo "$LR_ADAM")
        cmd=(sbatch --nodes "${NODES[$batch]}" --job-name "${optimizer}-${MODEL}-${batch}"
             --export "ALL,LR=${lr},BATCH_TOKENS=${batch}" "launch/${optimizer}_${MODEL}.sbatch")
        if [[ -n ${DRY_RUN:-} ]]; then echo "${cmd[*]}"; else "${cmd[@]}"; fi
    done
done
