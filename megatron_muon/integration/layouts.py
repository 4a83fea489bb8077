"""Which rectangle of a rank's tensor-parallel shard is which rectangle of which logical matrix.

Muon (arXiv 2505.02222) orthogonalizes every logical matrix of a layer on its own: Q, K and V each as one full
matrix (all heads), the attention output projection, the GLU gate and up projections, and the MLP down
projection. Megatron stores something else: fused weights (`linear_qkv` interleaves Q, K, V per query group;
a gated `linear_fc1` stacks gate and up), each cut into tensor-parallel shards. This module maps a rank's local
shard onto the logical matrices as `Block`s (see `megatron_muon.pieces`); the shapes Muon scales by are always
the logical ones.

Logical matrix names: the parameter name for an unsplit matrix, `name + ":q" / ":k" / ":v"` for the QKV split
and `name + ":gate" / ":up"` for the GLU split. With a split turned off the logical matrix is the fused weight as
TP=1 would hold it, so every TP degree orthogonalizes the same matrices.

Written against megatron-core 0.19.2: the `linear_qkv` interleaving of `SelfAttention.get_query_key_value_tensors`,
`MLP.forward`'s `torch.chunk(fc1_out, 2)` for gated units with fc1's `stride=2`, and the `tensor_model_parallel`,
`partition_dim` and `partition_stride` attributes set by `tensor_parallel.layers`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_muon.muon_config import MuonConfig
from megatron_muon.pieces import Block, Rect, check_blocks_tile

_QKV = re.compile(r"(^|\.)linear_qkv\.weight$")
# Grouped experts (TE) name their per-expert weights weight0, weight1, ...
_FC1 = re.compile(r"(^|\.)linear_fc1\.weight\d*$")
# Cross-attention's linear_kv and MLA's linear_kv_up_proj interleave K and V per head: not split here.
_KV_PER_HEAD = re.compile(r"(^|\.)(linear_kv|linear_kv_up_proj)\.weight$")


@dataclass(frozen=True)
class LayoutOptions:
    """Which fused Megatron weights are orthogonalized as their parts (the paper) rather than as one matrix."""

    split_qkv: bool = MuonConfig.split_qkv
    split_glu: bool = MuonConfig.split_glu


Shapes = dict[str, tuple[int, int]]


def matrix_blocks(
    name: str,
    param: torch.Tensor,
    config: TransformerConfig,
    tp_rank: int,
    tp_size: int,
    options: LayoutOptions = LayoutOptions(),
) -> list[Block]:
    """The blocks that tile `param` (this rank's local shard of 2-D weight `name`), each placed in its logical matrix.

    `tp_rank` / `tp_size` are those of the group `param` is sharded over (the expert TP group for MoE experts).
    Blocks come in local row order.
    """
    blocks, _ = _layout(name, param, config, tp_rank, tp_size, options)
    check_blocks_tile(blocks, *param.shape)
    return blocks


def logical_shapes(
    name: str, param: torch.Tensor, config: TransformerConfig, tp_size: int, options: LayoutOptions = LayoutOptions()
) -> Shapes:
    """Logical matrix name -> (rows, cols) for the matrices `param` holds a part of (the same on every TP rank)."""
    return _layout(name, param, config, 0, tp_size, options)[1]


def _layout(
    name: str, param: torch.Tensor, config: TransformerConfig, tp_rank: int, tp_size: int, options: LayoutOptions
) -> tuple[list[Block], Shapes]:
    if len(param.shape) != 2:
        raise ValueError(f"{name}: Muon trains 2-D weights only, got shape {tuple(param.shape)}")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"{name}: tensor-parallel rank {tp_rank} is not in [0, {tp_size})")
    rows, cols = param.shape
    sharded = bool(getattr(param, "tensor_model_parallel", False))
    dim = getattr(param, "partition_dim", 0) if sharded else None
    stride = getattr(param, "partition_stride", 1) if sharded else 1
    glu_fc1 = bool(config.gated_linear_unit) and _FC1.search(name) is not None

    if options.split_qkv and _KV_PER_HEAD.search(name):
        raise NotImplementedError(
            f"{name}: K and V interleaved per head (cross-attention / MLA) cannot be split yet; "
            f"pass --muon-no-split-qkv to orthogonalize it as one matrix"
        )
    if dim not in (None, 0, 1):
        raise NotImplementedError(f"{name}: tensor-parallel partition_dim {dim} is not handled")
    # Stride only decides how Megatron's init and checkpoints map a gated fc1 shard onto a master weight; which
    # local rows are gate is fixed by MLP.forward's chunk, so 1 (Kitchen) and 2 both mean [gate_local; up_local].
    if stride != 1 and not (glu_fc1 and stride == 2):
        raise NotImplementedError(f"{name}: partition_stride {stride} is not handled (only gated linear_fc1 uses 2)")
    if (_QKV.search(name) or glu_fc1) and tp_size > 1 and dim != 0:
        raise NotImplementedError(f"{name}: expected a column-parallel weight (partition_dim 0), got {dim}")

    if _QKV.search(name):
        return _qkv(name, rows, cols, config, tp_rank, tp_size, options)
    if glu_fc1:
        return _glu(name, rows, cols, tp_rank, tp_size, options)
    local = Rect(0, 0, rows, cols)
    if dim == 0:
        return [Block(name, local, tp_rank * rows, 0)], {name: (tp_size * rows, cols)}
    if dim == 1:
        return [Block(name, local, 0, tp_rank * cols)], {name: (rows, tp_size * cols)}
    return [Block(name, local, 0, 0)], {name: (rows, cols)}  # replicated on every TP rank


def _qkv(
    name: str, rows: int, cols: int, config: TransformerConfig, tp_rank: int, tp_size: int, options: LayoutOptions
) -> tuple[list[Block], Shapes]:
    if getattr(config, "attention_output_gate", False):
        raise NotImplementedError(
            f"{name}: linear_qkv with attention_output_gate (a 4th part per query group) is not handled"
        )
    if not options.split_qkv:
        # TP shards are contiguous row ranges of the TP=1 fused weight.
        return [Block(name, Rect(0, 0, rows, cols), tp_rank * rows, 0)], {name: (tp_size * rows, cols)}

    heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    kv = config.kv_channels or config.hidden_size // heads
    fused = (heads + 2 * groups) * kv
    if heads % groups or rows * tp_size != fused:
        raise ValueError(
            f"{name}: cannot split the fused QKV weight into Q, K, V: {rows} local rows x TP {tp_size} = "
            f"{rows * tp_size} rows, but {heads} query heads in {groups} query groups with kv_channels {kv} "
            f"need {fused} rows (and heads divisible by groups); pass --muon-no-split-qkv to orthogonalize "
            f"the fused matrix instead"
        )
    per_group = heads // groups
    q_rows = per_group * kv
    # The TP=1 fused weight is, per query group g, [q heads of g; k_g; v_g]. Rank t holds its rows
    # [t*rows, (t+1)*rows): whole groups when groups >= TP, a part of one group when groups < TP (Megatron then
    # all-gathers the QKV output), so intersect each part with that range rather than assume whole groups.
    lo, hi = tp_rank * rows, (tp_rank + 1) * rows
    blocks = []
    for g in range(groups):
        base = g * (q_rows + 2 * kv)
        parts = (
            (":q", base, q_rows, g * q_rows),
            (":k", base + q_rows, kv, g * kv),
            (":v", base + q_rows + kv, kv, g * kv),
        )
        for suffix, start, length, logical_row0 in parts:
            s, e = max(start, lo), min(start + length, hi)
            if s < e:
                blocks.append(Block(name + suffix, Rect(s - lo, 0, e - s, cols), logical_row0 + s - start, 0))
    shapes = {name + ":q": (heads * kv, cols), name + ":k": (groups * kv, cols), name + ":v": (groups * kv, cols)}
    return blocks, shapes


def _glu(
    name: str, rows: int, cols: int, tp_rank: int, tp_size: int, options: LayoutOptions
) -> tuple[list[Block], Shapes]:
    if rows % 2:
        raise ValueError(
            f"{name}: a gated linear_fc1 shard needs an even number of rows ([gate; up]), got {rows}"
            + ("; pass --muon-no-split-glu to orthogonalize the fused matrix instead" if options.split_glu else "")
        )
    half = rows // 2
    ffn = half * tp_size
    gate, up = Rect(0, 0, half, cols), Rect(half, 0, half, cols)
    if options.split_glu:
        blocks = [Block(name + ":gate", gate, tp_rank * half, 0), Block(name + ":up", up, tp_rank * half, 0)]
        return blocks, {name + ":gate": (ffn, cols), name + ":up": (ffn, cols)}
    # The TP=1 fused weight is [gate; up]; with stride 2 each rank holds a slice of both halves.
    blocks = [Block(name, gate, tp_rank * half, 0), Block(name, up, ffn + tp_rank * half, 0)]
    return blocks, {name: (2 * ffn, cols)}
