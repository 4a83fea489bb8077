"""The distributed step's GPU-facing choices and its non-finite-update guard, on the runtime floor (no Megatron):

- exchange buffers and stacks live on the process group's device, also on a rank whose shard holds no Muon
  element (NCCL rejects CPU buffers; the device used to come from whichever parameters happened to be local);
- pieces travel in a dtype no coarser than the finest Newton-Schulz GEMM that reads them;
- an orthogonalized update that is not finite on any rank is applied on no rank, and no state changes.
"""

from __future__ import annotations

import pytest
import torch

from megatron_muon.muon_config import MuonConfig
from megatron_muon.pieces import Block, Rect
from megatron_muon.testing.ranks import run_ranks

ROWS, COLS = 8, 6


@pytest.mark.parametrize("precision,wire", [
    ("fp32", torch.float32), ("fp16", torch.float32), ("bf16", torch.bfloat16), ("fp8", torch.bfloat16),
    ("fp8>bf16", torch.bfloat16), ("fp8*2>fp16", torch.float32),
])
def test_wire_dtype_follows_the_finest_precision(precision, wire):
    from megatron_muon.runtime.distributed_muon import wire_dtype

    assert wire_dtype(MuonConfig(ns_precision=precision, coefficients="jordan")) == wire


def _weights(world: int):
    """One [ROWS, COLS] matrix "m" held whole by rank 0; the other ranks hold no Muon element at all."""
    from megatron_muon.runtime.distributed_muon import Holding, LocalWeight

    weights = {"w": LocalWeight(ROWS, COLS, (((Block("m", Rect(0, 0, ROWS, COLS), 0, 0)),),))}
    holdings = [[Holding("w", 0, (0, ROWS * COLS), (0, ROWS * COLS))]] + [[] for _ in range(world - 1)]
    return weights, {"m": (ROWS, COLS)}, holdings


def _recorded_exchange(precision: str) -> dict:
    """Two ranks; rank 1 owns nothing. Every all_to_all goes through a recorder of its buffers' device and dtype."""
    import torch.distributed as dist

    from megatron_muon.runtime import distributed_muon, exchange
    from megatron_muon.runtime.distributed_muon import DistributedMuonStep, ShardedMuonAdamW

    seen = []
    real = dist.all_to_all_single

    def recording(output, input, *args, **kwargs):
        seen.append((str(output.device), output.dtype, str(input.device), input.dtype))
        return real(output, input, *args, **kwargs)

    exchange.dist.all_to_all_single = recording
    weights, shapes, holdings = _weights(dist.get_world_size())
    settings = MuonConfig(ns_precision=precision)
    step = DistributedMuonStep(weights, shapes, holdings, None, settings)
    params = []
    if dist.get_rank() == 0:
        params = [torch.nn.Parameter(torch.zeros(ROWS * COLS))]
    opt = ShardedMuonAdamW([dict(params=params, use_muon=True)], settings, lr=0.1, weight_decay=0.0)
    opt.bind(step, {p: ("w", 0, COLS) for p in params})
    for p in params:
        p.grad = torch.randn(ROWS * COLS, generator=torch.Generator().manual_seed(3))
    opt.step()
    # Where a NCCL group would put them: the group's device, not the (absent) local parameters'.
    dist_backend = dist.get_backend
    cuda_device = torch.cuda.current_device
    try:
        distributed_muon.dist.get_backend = lambda group=None: dist.Backend.NCCL
        torch.cuda.current_device = lambda: 0
        nccl_device = DistributedMuonStep(weights, shapes, holdings, None, settings).device
    finally:
        distributed_muon.dist.get_backend = dist_backend
        torch.cuda.current_device = cuda_device
    return dict(rank=dist.get_rank(), seen=seen, device=str(step.device), nccl_device=str(nccl_device),
                orthogonalized=list(opt.last_step.orthogonalized))


@pytest.mark.multirank
@pytest.mark.parametrize("precision,wire", [("fp16", torch.float32), ("bf16", torch.bfloat16)])
def test_rank_without_muon_elements_exchanges_on_the_groups_device_in_the_wire_dtype(precision, wire):
    ranks = run_ranks(_recorded_exchange, 2, (precision,), timeout=300)
    homes = [r["rank"] for r in ranks if r["orthogonalized"]]
    assert len(homes) == 1
    for r in ranks:
        assert r["seen"], "every rank joins the exchange"
        assert all(rec == ("cpu", wire, "cpu", wire) for rec in r["seen"]), r["seen"]
        assert r["device"] == "cpu"  # gloo
        assert r["nccl_device"] == "cuda:0"  # NCCL: the current CUDA device, on the rank with nothing local too


def _skip_on_non_finite(poisoned_rank: int) -> dict:
    """Two ranks each own one matrix; one rank's Newton-Schulz returns NaN. Both must skip, state untouched."""
    import torch.distributed as dist

    from megatron_muon.runtime import distributed_muon
    from megatron_muon.runtime.distributed_muon import DistributedMuonStep, Holding, LocalWeight, ShardedMuonAdamW

    me, world = dist.get_rank(), dist.get_world_size()
    weights = {f"w{r}": LocalWeight(ROWS, COLS, ((Block(f"m{r}", Rect(0, 0, ROWS, COLS), 0, 0),),)) for r in range(world)}
    shapes = {f"m{r}": (ROWS, COLS) for r in range(world)}
    holdings = [[Holding(f"w{r}", 0, (0, ROWS * COLS), (0, ROWS * COLS))] for r in range(world)]
    settings = MuonConfig(ns_precision="fp32")
    step = DistributedMuonStep(weights, shapes, holdings, None, settings)
    gen = torch.Generator().manual_seed(10 + me)
    muon_param = torch.nn.Parameter(torch.randn(ROWS * COLS, generator=gen))
    adam_param = torch.nn.Parameter(torch.randn(5, generator=gen))
    opt = ShardedMuonAdamW([dict(params=[muon_param], use_muon=True), dict(params=[adam_param], use_muon=False)],
                           settings, lr=0.1, weight_decay=0.1)
    opt.bind(step, {muon_param: (f"w{me}", 0, COLS)})
    real = distributed_muon.orthogonalize
    results = []
    for poison in (False, True, False):
        muon_param.grad = torch.randn(ROWS * COLS, generator=gen)
        adam_param.grad = torch.randn(5, generator=gen)
        before = {k: v.clone() for k, v in [("muon", muon_param.detach()), ("adam", adam_param.detach())]}
        opt.init_state()
        state_before = {k: v.clone() for k, v in opt.state[muon_param].items()}
        state_before.update({f"adam.{k}": v.clone() for k, v in opt.state[adam_param].items()})
        if poison and me == poisoned_rank:
            distributed_muon.orthogonalize = lambda x, *a, **k: torch.full_like(real(x, *a, **k), float("nan"))
        opt.step()
        distributed_muon.orthogonalize = real
        state_after = {k: v for k, v in opt.state[muon_param].items()}
        state_after.update({f"adam.{k}": v for k, v in opt.state[adam_param].items()})
        results.append(dict(
            skipped=opt.skipped,
            params_unchanged=torch.equal(before["muon"], muon_param.detach()) and torch.equal(before["adam"], adam_param.detach()),
            state_unchanged=all(torch.equal(state_before[k], state_after[k]) for k in state_before),
            finite=bool(muon_param.isfinite().all()),
            group_steps=[g["step"] for g in opt.param_groups],
        ))
    return dict(rank=me, results=results)


@pytest.mark.multirank
@pytest.mark.parametrize("poisoned_rank", [0, 1])
def test_a_non_finite_update_on_one_rank_skips_the_step_on_every_rank(poisoned_rank):
    for r in run_ranks(_skip_on_non_finite, 2, (poisoned_rank,), timeout=300):
        clean, poisoned, after = r["results"]
        assert not clean["skipped"] and not clean["params_unchanged"] and not clean["state_unchanged"], r
        assert poisoned["skipped"] and poisoned["params_unchanged"] and poisoned["state_unchanged"], r
        assert poisoned["group_steps"] == clean["group_steps"] == [1, 1], r  # the skipped step is not counted
        assert not after["skipped"] and after["finite"] and after["group_steps"] == [2, 2], r
