"""The Megatron side of the training data: the indexed-dataset format `data/corpus.py` writes, and the tokenizer,
dataset config and GPTDatasets megatron.core reads it back with. `data/` stays free of Megatron and calls these.

Written against megatron-core 0.19.2. Symbols touched:

* `megatron.core.datasets.indexed_dataset`: `DType.optimal_dtype`, `IndexedDatasetBuilder` (`add_document`,
  `finalize`), `get_bin_path`, `get_idx_path`, `IndexedDataset` (`len`, indexing);
* `megatron.core.tokenizers.MegatronTokenizer.from_pretrained` with `metadata_path={"library": "sentencepiece"}`;
* `megatron.core.datasets.gpt_dataset`: `GPTDatasetConfig` (`blend_per_split`, `path_to_cache` and the fields
  set below), `GPTDataset`;
* `megatron.core.datasets.blended_megatron_dataset_builder.BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank,
  config).build()`.

Megatron is imported inside each function, so importing this module (and `data/`) stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np


def write_indexed_dataset(prefix: str | os.PathLike, documents: Iterable[Sequence[int]], vocab_size: int) -> int:
    """Write `prefix`.bin / `prefix`.idx, one Megatron document per token-id list; returns the tokens written."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(str(prefix)), dtype=dtype)
    tokens = 0
    for ids in documents:
        builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
        tokens += len(ids)
    builder.finalize(get_idx_path(str(prefix)))
    return tokens


def read_indexed_dataset(prefix: str | os.PathLike) -> np.ndarray:
    """Every document of `prefix`.bin / `prefix`.idx, concatenated in order."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return np.concatenate([dataset[i] for i in range(len(dataset))])


def load_tokenizer(tokenizer_model: str):
    """megatron.core's tokenizer for a sentencepiece model (what --tokenizer-type GPTSentencePieceTokenizer
    --tokenizer-model builds)."""
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(tokenizer_path=tokenizer_model, metadata_path={"library": "sentencepiece"})


def gpt_dataset_config(train_prefix: str, valid_prefix: str, cache_dir: str, seq_length: int, seed: int, tokenizer,
                       **overrides):
    """A GPTDatasetConfig reading the two prefixes as Megatron's per-split blends (no test split)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    fields = dict(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[([train_prefix], None), ([valid_prefix], None), None],
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=cache_dir,
    )
    fields.update(overrides)
    return GPTDatasetConfig(**fields)


def build_gpt_datasets(config, train_samples: int, valid_samples: int):
    """(train, valid) GPTDatasets of `config` of at least the given sample counts (epochs repeat as needed).
    Call it on every rank: megatron.core builds the sample indices on rank 0 and the others read them."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    return train, valid
