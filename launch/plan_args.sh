# Sourced by run_on_slurm.sh and torchrun_single_node.sh: checks the run's variables (launch/README.md) and puts
# the planner's arguments in the array `plan`. The caller sets NODES, GPUS_PER_NODE and the default of
# BATCH_TOKENS, which differ between a cluster job and one node.
: "${MODEL:?set MODEL (e.g. 4b, 3.67b)}"
: "${OPTIMIZER:?set OPTIMIZER (muon or adam)}"
: "${LR:?set LR, the peak learning rate (the paper does not publish its values)}"
RUN_NAME=${RUN_NAME:-${MODEL}-${OPTIMIZER}-${BATCH_TOKENS}}
OUTPUT_DIR=${OUTPUT_DIR:-runs/${RUN_NAME}}
PYTHON=${PYTHON:-python}

plan=(--model "$MODEL" --optimizer "$OPTIMIZER" --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE"
      --batch-tokens "$BATCH_TOKENS" --lr "$LR" --ns-precision "${NS_PRECISION:-bf16}" --run-name "$RUN_NAME"
      --save-dir "$OUTPUT_DIR/checkpoints" --save-interval "${SAVE_INTERVAL:-1000}"
      --tensorboard-dir "$OUTPUT_DIR/tensorboard")
if [[ -n ${TRAIN_TOKENS:-} ]]; then plan+=(--train-tokens "$TRAIN_TOKENS"); fi
if [[ -n ${WANDB_PROJECT:-} ]]; then plan+=(--wandb-project "$WANDB_PROJECT"); fi
# shellcheck disable=SC2206  # DATA_PATH is a list of prefixes (or weight prefix pairs)
if [[ -n ${DATA_PATH:-} ]]; then plan+=(--data-path $DATA_PATH); fi
if [[ -n ${TOKENIZER_MODEL:-} ]]; then
    plan+=(--tokenizer-type "${TOKENIZER_TYPE:-HuggingFaceTokenizer}" --tokenizer-model "$TOKENIZER_MODEL")
fi
