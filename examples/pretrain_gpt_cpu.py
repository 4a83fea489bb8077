"""A small, ordinary Megatron-LM GPT pretraining script: nothing in it knows about megatron-muon.

It is the kind of script users already have (model_provider + forward_step + datasets provider, then
`megatron.training.pretrain`), so running it through the launcher shows that `--optimizer muon` needs no
script change. On CPU (one process; torchrun sets MASTER_ADDR / MASTER_PORT itself, and Megatron wants
CUDA_DEVICE_MAX_CONNECTIONS=1 with --tensor-model-parallel-size > 1):

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python -m megatron_muon.launch examples/pretrain_gpt_cpu.py \
        --optimizer muon --use-distributed-optimizer --distributed-backend gloo --transformer-impl local \
        --use-cpu-initialization --no-gradient-accumulation-fusion --no-masked-softmax-fusion \
        --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm \
        --mock-data --tokenizer-type NullTokenizer --vocab-size 128 --make-vocab-size-divisible-by 64 \
        --num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 \
        --group-query-attention --num-query-groups 2 --swiglu --normalization RMSNorm --disable-bias-linear \
        --position-embedding-type rope --untie-embeddings-and-output-weights \
        --seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --train-iters 20 \
        --lr 1e-2 --min-lr 1e-3 --lr-decay-style cosine --lr-warmup-iters 2 --eval-iters 0 --log-interval 1

Run without the launcher it is plain Megatron: `--optimizer muon` then means megatron-core's own Muon.
"""

from functools import partial

import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.training import get_args, get_timers, get_tokenizer, pretrain, print_rank_0
from megatron.training.argument_utils import core_transformer_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """This pipeline stage's GPTModel, built from the command-line flags.

    The local (pure megatron-core) layer spec is used so the script also runs where Transformer Engine is
    absent; on a GPU cluster a real script would pick the TE spec instead.
    """
    args = get_args()
    config = config or core_transformer_config_from_args(args)
    print_rank_0(f"building GPT model: {args.num_layers} layers, hidden {args.hidden_size}")
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(
            args.num_experts, args.moe_grouped_gemm, args.qk_layernorm, normalization=args.normalization
        ),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def get_batch(data_iterator):
    """Next micro-batch on this rank. Datasets are built on every rank (see `is_distributed` below), so
    all tensor-parallel ranks of one replica read the same samples and no broadcast is needed."""
    batch = next(data_iterator)
    return {key: value.cuda(non_blocking=True) for key, value in batch.items() if isinstance(value, torch.Tensor)}


def loss_func(loss_mask, output_tensor):
    """(summed token loss, token count, {"lm loss": [sum, count]}): the form Megatron's schedules expect.
    Megatron turns it into the mean itself (per micro-batch, or per token with --calculate-per-token-loss)
    and averages the logged pair over data-parallel ranks."""
    losses = output_tensor.float().view(-1)
    loss_mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.cat([loss_sum.clone().detach().view(1), num_tokens.view(1).to(loss_sum.dtype)])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """One micro-batch forward; Megatron's schedule runs the backward pass."""
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator)
    timers("batch-generator").stop()
    output_tensor = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"]
    )
    return output_tensor, partial(loss_func, batch["loss_mask"])


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Mock GPT datasets (synthetic token streams) from megatron-core's dataset builder: no data files.

    megatron.training asks for one set per virtual pipeline stage (`vp_stage`) under
    --num-layers-per-virtual-pipeline-stage; every stage reads the same mock stream."""
    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        split=args.split,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mmap_bin_files=args.mmap_bin_files,
    )
    print_rank_0("> building mock train, validation, and test datasets for GPT ...")
    train_ds, valid_ds, test_ds = BlendedMegatronDatasetBuilder(
        MockGPTDataset, train_val_test_num_samples, lambda: True, config
    ).build()
    return train_ds, valid_ds, test_ds


# Every rank builds its own (tiny) dataset, so Megatron need not broadcast batches over tensor parallelism.
train_valid_test_datasets_provider.is_distributed = True


if __name__ == "__main__":
    args = parse_and_validate_args()
    pretrain(
        pretrain_cfg_container_from_args(args),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )
