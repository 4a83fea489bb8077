"""The runtime floor without Megatron: rectangles between ranks, and the distributed Muon step on a toy layout
checked against the single-device Muon on the whole matrices."""

import pytest
import torch

from megatron_muon.pieces import Block, Rect
from megatron_muon.testing.ranks import run_ranks

pytestmark = pytest.mark.multirank

# Two logical matrices; weight "w" is TP-split by rows over 2 "TP ranks" (like a column-parallel layer) and
# holds rows of "a" then rows of "b" in each shard (like fused [gate; up] halves).
A_ROWS, B_ROWS, COLS = 6, 10, 8
LOCAL_ROWS = (A_ROWS + B_ROWS) // 2


def _weights_and_shapes():
    from megatron_muon.runtime.distributed_muon import LocalWeight

    blocks = tuple(
        (
            Block("a", Rect(0, 0, A_ROWS // 2, COLS), t * A_ROWS // 2, 0),
            Block("b", Rect(A_ROWS // 2, 0, B_ROWS // 2, COLS), t * B_ROWS // 2, 0),
        )
        for t in range(2)
    )
    return {"w": LocalWeight(LOCAL_ROWS, COLS, blocks)}, {"a": (A_ROWS, COLS), "b": (B_ROWS, COLS)}


def _full_gradients(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"a": torch.randn(A_ROWS, COLS, generator=g), "b": torch.randn(B_ROWS, COLS, generator=g)}


def _local_tensor(full: dict, tp_rank: int) -> torch.Tensor:
    half_a, half_b = A_ROWS // 2, B_ROWS // 2
    return torch.cat([full["a"][tp_rank * half_a : (tp_rank + 1) * half_a], full["b"][tp_rank * half_b : (tp_rank + 1) * half_b]])


def _toy_muon(tp: int, dp: int, precision: str, steps: int, groups: int = 1) -> dict:
    """World = tp x dp ranks (tp fastest); each DP rank owns a flat 1/dp range of its TP shard."""
    import torch.distributed as dist

    from megatron_muon.muon_config import MuonConfig
    from megatron_muon.runtime.distributed_muon import DistributedMuonStep, Holding, ShardedMuonAdamW

    rank = dist.get_rank()
    tp_rank, dp_rank = rank % tp, rank // tp
    weights, shapes = _weights_and_shapes()
    numel = LOCAL_ROWS * COLS if tp == 2 else (A_ROWS + B_ROWS) * COLS
    if tp == 1:  # one rank holds both TP halves' rows: a single block per matrix
        from megatron_muon.runtime.distributed_muon import LocalWeight

        weights = {"w": LocalWeight(A_ROWS + B_ROWS, COLS, ((Block("a", Rect(0, 0, A_ROWS, COLS), 0, 0),
                                                             Block("b", Rect(A_ROWS, 0, B_ROWS, COLS), 0, 0)),))}
    start, end = dp_rank * numel // dp, (dp_rank + 1) * numel // dp
    holdings = [None] * dist.get_world_size()
    dist.all_gather_object(holdings, [Holding("w", tp_rank, (start, end), (start, end))])
    settings = MuonConfig(ns_precision=precision, overlap_groups=groups)
    step_fn = DistributedMuonStep(weights, shapes, holdings, None, settings)

    init = {"a": torch.zeros(A_ROWS, COLS), "b": torch.zeros(B_ROWS, COLS)}
    local = init if tp == 1 else None
    full_local = torch.cat([init["a"], init["b"]]) if tp == 1 else _local_tensor(init, tp_rank)
    param = torch.nn.Parameter(full_local.reshape(-1)[start:end].clone())
    opt = ShardedMuonAdamW([dict(params=[param], use_muon=True)], settings, lr=0.1, weight_decay=0.01)
    opt.bind(step_fn, {param: ("w", start, COLS)})
    for step in range(steps):
        grads = _full_gradients(step)
        full_grad = torch.cat([grads["a"], grads["b"]]) if tp == 1 else _local_tensor(grads, tp_rank)
        param.grad = full_grad.reshape(-1)[start:end].clone()
        opt.step()
    return dict(rank=(tp_rank, dp_rank), start=start, values=param.detach().clone(),
                orthogonalized=list(opt.last_step.orthogonalized), groups=opt.last_step.groups, bytes=(opt.last_step.bytes_sent, opt.last_step.bytes_received))


def _reference(precision: str, steps: int) -> dict[str, torch.Tensor]:
    from megatron_muon.muon import Muon

    params = {name: torch.nn.Parameter(torch.zeros(shape)) for name, shape in (("a", (A_ROWS, COLS)), ("b", (B_ROWS, COLS)))}
    opt = Muon(list(params.values()), lr=0.1, weight_decay=0.01, ns_precision=precision)
    for step in range(steps):
        for name, g in _full_gradients(step).items():
            params[name].grad = g
        opt.step()
    return {name: p.detach() for name, p in params.items()}


# bf16: Newton-Schulz in bf16 on both sides, plus pieces on the wire in bf16.
@pytest.mark.parametrize(
    "tp,dp,precision,tol",
    [(2, 1, "fp32", 1e-6), (1, 2, "fp32", 1e-6), (2, 2, "fp32", 1e-6), (1, 3, "fp32", 1e-6), (2, 2, "bf16", 3e-2)],
)
def test_toy_layout_equals_single_device_muon(tp, dp, precision, tol):
    ranks = run_ranks(_toy_muon, tp * dp, (tp, dp, precision, 3))
    expected = _reference(precision, 3)
    for r in ranks:
        tp_rank, _ = r["rank"]
        full = torch.cat([expected["a"], expected["b"]]) if tp == 1 else _local_tensor(expected, tp_rank)
        want = full.reshape(-1)[r["start"] : r["start"] + r["values"].numel()]
        assert float((r["values"] - want).norm() / want.norm()) <= tol
    # Each matrix is orthogonalized by exactly one rank.
    assert sorted(n for r in ranks for n in r["orthogonalized"]) == ["a", "b"]
    # Whatever one rank sends, another receives.
    assert sum(r["bytes"][0] for r in ranks) == sum(r["bytes"][1] for r in ranks)
    if precision == "bf16" and tp * dp > 1:
        assert any(r["bytes"][0] for r in ranks)


def test_one_rank_pipelines_its_two_stacks_bit_identically():
    # On one rank "a" and "b" are two stacks: two groups, each its own part of the exchanges, nothing on a wire.
    (one,) = run_ranks(_toy_muon, 1, (1, 1, "bf16", 3, 1))
    (two,) = run_ranks(_toy_muon, 1, (1, 1, "bf16", 3, 2))
    assert (one["groups"], two["groups"]) == (1, 2)
    assert torch.equal(one["values"], two["values"])
