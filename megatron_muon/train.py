"""`python -m megatron_muon.train`: GPT pretraining with megatron-muon on megatron.training, from one CPU process
to an H100 cluster, with the same command.

    python -m megatron_muon.train --model-config cpu-tiny --optimizer muon --lr 3e-3 --train-iters 200 \\
        --micro-batch-size 8 --global-batch-size 8 --tensorboard-dir runs/muon
    torchrun --nproc-per-node 8 -m megatron_muon.train --model-config 4b --optimizer muon --bf16 ... (per node)

Every megatron.training flag is accepted (later flags win), plus:

    --model-config NAME   a named model of megatron_muon/models/registry.py (cpu-tiny, cpu-small, 0.07b ... 3.67b,
                          4b); its architecture flags come first, so explicit flags override them
    --corpus PATH ...     text / JSONL files or directories for the embedded data builder (default: the running
                          interpreter's Python standard library)
    --corpus-tokenizer M  an existing sentencepiece model for --corpus instead of training one
    --corpus-vocab-size N the vocabulary of the sentencepiece model trained on the corpus (default 4096)
    --data-dir DIR        where built datasets are cached (default: $MEGATRON_MUON_DATA_DIR or
                          ~/.cache/megatron-muon/data)

Without --data-path / --train-data-path / --mock-data, the dataset is built from --corpus (or the standard
library) on first use and reused afterwards (megatron_muon/data/corpus.py); on a cluster point --data-dir at a
node-local or shared directory. On a machine without CUDA, the CPU flags (gloo, local layer spec, CPU init, no
fused kernels) are added before the user's and the CPU shims applied: the same megatron.training code runs.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from functools import partial

CPU_FLAGS = [
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
]
# megatron-core 0.19.2 defaults --eval-interval to None ("no evaluation during training") but then divides
# --train-iters by it when sizing the validation set, so a run without the flag crashes after building the model.
# Megatron's long-standing default keeps its meaning; an explicit flag wins (it comes later).
RUN_DEFAULTS = ["--eval-interval", "1000"]
_DATA_FLAGS = ("--data-path", "--train-data-path", "--mock-data", "--data-args-path", "--per-split-data-args-path")


def _plugin_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model-config", default=None)
    parser.add_argument("--corpus", nargs="+", default=None)
    parser.add_argument("--corpus-tokenizer", default=None)
    parser.add_argument("--corpus-vocab-size", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    return parser


def _last_value(flags: list[str], flag: str) -> str | None:
    values = [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == flag]
    return values[-1] if values else None


def megatron_flags(argv: list[str], cuda: bool) -> list[str]:
    """The full megatron.training command line: CPU flags, the model config's, the data's, then the user's."""
    from megatron_muon.models.registry import get_model_config

    plugin, user = _plugin_parser().parse_known_args(argv)
    flags = list(RUN_DEFAULTS) + ([] if cuda else list(CPU_FLAGS))
    if plugin.model_config is not None:
        try:
            flags += get_model_config(plugin.model_config).megatron_flags(None if cuda else "local")
        except KeyError as err:
            raise SystemExit(f"megatron_muon.train: --model-config: {err.args[0]}") from None
    if not any(f in user for f in _DATA_FLAGS):
        flags += _embedded_data_flags(plugin, seq_length=_last_value(flags + user, "--seq-length"))
    elif plugin.corpus is not None:
        raise SystemExit("megatron_muon.train: --corpus builds the dataset; it cannot be combined with --data-path, "
                         "--train-data-path or --mock-data")
    return flags + user


def _embedded_data_flags(plugin: argparse.Namespace, seq_length: str | None) -> list[str]:
    """Build (or reuse) the dataset; the ranks of a node take turns on a lock, so only the first one builds."""
    from megatron_muon.data.corpus import DataError, build_dataset, default_data_dir

    data_dir = plugin.data_dir or str(default_data_dir())
    os.makedirs(data_dir, exist_ok=True)
    first_rank = int(os.environ.get("RANK", "0")) == 0
    with open(os.path.join(data_dir, ".build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            vocab = {} if plugin.corpus_vocab_size is None else dict(vocab_size=plugin.corpus_vocab_size)
            data = build_dataset(plugin.corpus, data_dir=data_dir, tokenizer_model=plugin.corpus_tokenizer,
                                 progress=first_rank, **vocab)
            if seq_length is not None:
                data.check_sequence_length(int(seq_length))
        except DataError as err:
            raise SystemExit(f"megatron_muon.train: {err}") from None
    if first_rank:
        print(f"megatron-muon: data {data.corpus}: {data.train_tokens:,} train / {data.valid_tokens:,} valid tokens, "
              f"vocab {data.vocab_size}, in {data.directory}", flush=True)
    return data.megatron_flags()


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """This pipeline stage's GPTModel from the flags, with Transformer Engine's layer spec when it is used."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.training import get_args
    from megatron.training.argument_utils import core_transformer_config_from_args

    args = get_args()
    config = config or core_transformer_config_from_args(args)
    if args.transformer_impl == "transformer_engine":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            args.num_experts, args.moe_grouped_gemm, args.qk_layernorm
        )
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            args.num_experts, args.moe_grouped_gemm, args.qk_layernorm, normalization=args.normalization
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
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


def _loss(loss_mask, output_tensor):
    """(summed token loss, token count, report): the form megatron.training's schedules reduce and log."""
    import torch

    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    total = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return total, tokens, {"lm loss": torch.cat([total.detach().view(1), tokens.view(1).to(total.dtype)])}


def forward_step(data_iterator, model):
    import torch

    batch = {k: v.cuda(non_blocking=True) for k, v in next(data_iterator).items() if isinstance(v, torch.Tensor)}
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(_loss, batch["loss_mask"])


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """GPT datasets from the --*-data-path prefixes (or mock data) through megatron.core's builder.

    megatron.training calls it once per virtual pipeline stage (`vp_stage`) under
    --num-layers-per-virtual-pipeline-stage; every rank builds the same datasets, so the stage changes nothing."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mmap_bin_files=args.mmap_bin_files,
    )
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples, lambda: True, config).build()


# Every rank builds the (memory-mapped) datasets itself, so tensor-parallel ranks read the same samples without a
# broadcast; megatron.core writes the sample index once and the others read it.
datasets_provider.is_distributed = True


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        raise SystemExit(0)
    from megatron_muon.launch import prepare_process

    cuda = prepare_process()
    if not cuda:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron asks for it with TP > 1

    sys.argv = [sys.argv[0], *megatron_flags(argv, cuda)]
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args()
    pretrain(
        pretrain_cfg_container_from_args(args),
        datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )


if __name__ == "__main__":
    main()
