"""Model shapes as plain data: the architecture knobs of a megatron-core GPT, with no Megatron import.

`integration/gpt.py` builds a GPTModel from a shape; `registry.py` names the paper's shapes.
"""


from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPTShape:
    """The architecture knobs the tests and the demo vary; everything else follows the paper's model family."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2  # GQA: two query heads share one K/V head, as in the paper's models
    ffn_hidden_size: int = 128
    gated_linear_unit: bool = True
    vocab_size: int = 128
    seq_length: int = 16
    tie_embeddings: bool = True
    dropout: float = 0.0
    num_experts: int | None = None  # MoE MLP (top-2 routing) instead of a dense one
    # Defaults below are megatron-core's own, so shapes that do not set them build the model they always did.
    qk_layernorm: bool = False  # RMSNorm on each query and key head (Gemma 3's QK-norm)
    kv_channels: int | None = None  # head dimension; None is hidden_size / num_attention_heads
    norm_epsilon: float = 1e-5
    rotary_base: int = 10000


TINY = GPTShape()


def architecture_kwargs(shape: GPTShape) -> dict:
    """The TransformerConfig fields that `shape` decides (no parallel sizes, dtypes or fusions)."""
    return dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.ffn_hidden_size,
        gated_linear_unit=shape.gated_linear_unit,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_epsilon,
        qk_layernorm=shape.qk_layernorm,
        kv_channels=shape.kv_channels,
        add_bias_linear=False,
        hidden_dropout=shape.dropout,
        attention_dropout=shape.dropout,
    )


