"""Model shapes as plain data: the architecture knobs of a megatron-core GPT, with no Megatron import.

`integration/gpt.py` builds a GPTModel from a shape; `registry.py` names the paper's shapes; `matrix_shapes`
lists the logical matrices Muon orthogonalizes, for cost models that never build the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_muon.mup.rules import ModelWidths, logical_shape


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

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


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


@dataclass(frozen=True)
class MatrixShape:
    """`count` logical matrices of one role (`mup.rules`' role names), each [rows, cols] as a torch weight [out, in]."""

    role: str
    rows: int
    cols: int
    count: int


def matrix_shapes(shape: GPTShape) -> tuple[MatrixShape, ...]:
    """Every matrix Muon orthogonalizes on its own, by role, as the paper splits them (arXiv 2505.02222): Q, K, V,
    the attention output `proj`, the MLP's gate and up (or a non-gated MLP's fc1 as `up`) and `down`; with MoE the
    router and each expert's gate / up / down instead of the dense MLP. Shapes are the logical (TP=1) ones."""
    widths = ModelWidths(hidden=shape.hidden_size, ffn_hidden=shape.ffn_hidden_size,
                         num_heads=shape.num_attention_heads, num_query_groups=shape.num_query_groups,
                         head_dim=shape.head_dim, num_experts=shape.num_experts)
    mlp = ("gate", "up", "down") if shape.gated_linear_unit else ("up", "down")
    counts = dict.fromkeys(("q", "k", "v", "proj"), shape.num_layers)
    if shape.num_experts:
        counts["router"] = shape.num_layers
        counts.update(dict.fromkeys((f"expert_{role}" for role in mlp), shape.num_layers * shape.num_experts))
    else:
        counts.update(dict.fromkeys(mlp, shape.num_layers))
    return tuple(MatrixShape(role, *logical_shape(role, widths), count) for role, count in counts.items())


def logical_matrices(shape: GPTShape) -> dict[str, tuple[int, int]]:
    """`matrix_shapes` one matrix per entry, as the orthogonalization planner takes them: name -> (rows, cols),
    named "<layer>.<role>", or "<layer>.<role>.<expert>" for the experts of an MoE layer."""
    matrices = matrix_shapes(shape)
    named = {}
    for layer in range(shape.num_layers):
        for matrix in matrices:
            copies = matrix.count // shape.num_layers
            names = [f"{layer}.{matrix.role}"] if copies == 1 else [f"{layer}.{matrix.role}.{e}" for e in range(copies)]
            named.update(dict.fromkeys(names, (matrix.rows, matrix.cols)))
    return named
