"""Build the distributed Muon as a Megatron optimizer, in megatron-core's own wrappers.

`build_muon_optimizer(config, model_chunks)` returns what `get_megatron_optimizer` returns for Adam: a
`ChainedOptimizer` around Megatron's `DistributedOptimizer` (with `use_distributed_optimizer`) or
`Float16OptimizerWithFloat16Params` (without; also for fp32 models). Megatron's wrapper keeps doing its job:
fp32 main params (a DP shard each with the distributed optimizer, so optimizer memory falls ~1/DP), copying
grads out of the DDP buffers, clipping and grad-norm reporting, zero counting, writing params back and
all-gathering them over DP. Inside runs `ShardedMuonAdamW` (runtime/distributed_muon.py). Checkpoints go through
Megatron's `dist_checkpointing` (integration/checkpoint.py): with the distributed optimizer the wrapper is
`MuonDistributedOptimizer`, a `DistributedOptimizer` whose state hooks present the Muon momentum to Megatron's
reshardable formats; the chain is `MuonChainedOptimizer`, a `ChainedOptimizer` whose checkpoints also resume
under another expert-parallel size (which changes how many optimizers it chains).

Non-finite gradients skip the step with no state change: Megatron only checks for them when a grad scaler
exists, so the wrapper always gets one (a constant scale of 1 unless `loss_scale` says otherwise).

Written against megatron-core 0.19.2: `_get_param_groups`, the wrappers' constructor arguments, and the
wrappers' main-param bookkeeping (`_get_model_param_range_map`, `float16_groups` / `fp32_from_float16_groups`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides
from megatron.core.optimizer import _get_param_groups
from megatron.core.optimizer.grad_scaler import ConstantGradScaler
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_pg_rank, log_single_rank

from megatron_muon.integration.checkpoint import (
    ADAM_GROUP,
    MUON_GROUP,
    MuonChainedOptimizer,
    MuonDistributedOptimizer,
    replicated_load_state_dict,
    replicated_sharded_state_dict,
)
from megatron_muon.integration.flags import validate_muon_config
from megatron_muon.integration.layouts import LayoutOptions, logical_shapes, matrix_blocks
from megatron_muon.integration.mup import mup_config_overrides
from megatron_muon.muon import is_muon_matrix
from megatron_muon.runtime.distributed_muon import (
    DistributedMuonStep,
    Holding,
    LocalWeight,
    ShardedMuonAdamW,
    StepStats,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Domain:
    """The ranks one optimizer instance spans: dense weights over TP x DP (x CP); MoE expert weights over expert
    TP x expert DP, separately for each expert-parallel rank (each holds different experts)."""

    expert: bool
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    group: dist.ProcessGroup  # TP x DP: where the Muon exchange runs
    dp_group: dist.ProcessGroup
    dp_group_gloo: dist.ProcessGroup | None
    dp_group_index: int  # Megatron's data_parallel_group_idx: this rank's place among the DP groups
    buffers_attr: str
    stats_group_distributed: dist.ProcessGroup
    stats_group_replicated: dist.ProcessGroup

    def holds(self, param: torch.nn.Parameter) -> bool:
        return (not getattr(param, "allreduce", True)) == self.expert


def _dense_domain(pgs: dict) -> _Domain:
    ps = parallel_state
    return _Domain(
        expert=False,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        dp_size=ps.get_data_parallel_world_size(with_context_parallel=True),
        group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
        dp_group=pgs["intra_dp_cp_group"],
        dp_group_gloo=pgs["intra_dp_cp_group_gloo"],
        dp_group_index=get_pg_rank(pgs["mp_group"]),
        buffers_attr="buffers",
        stats_group_distributed=pgs["intra_dist_opt_group"],
        stats_group_replicated=pgs["mp_group"],
    )


def _expert_domain(pgs: dict) -> _Domain:
    ps = parallel_state
    return _Domain(
        expert=True,
        tp_rank=ps.get_expert_tensor_parallel_rank(),
        tp_size=ps.get_expert_tensor_parallel_world_size(),
        dp_rank=ps.get_expert_data_parallel_rank(),
        dp_size=ps.get_expert_data_parallel_world_size(),
        group=_expert_tensor_and_data_parallel_group(),
        dp_group=pgs["intra_expt_dp_group"],
        dp_group_gloo=pgs["intra_expt_dp_group_gloo"],
        dp_group_index=get_pg_rank(pgs["expt_tp_pp_with_egtp_remat_group"]),
        buffers_attr="expert_parallel_buffers",
        stats_group_distributed=pgs["intra_dist_opt_group"],
        stats_group_replicated=pgs["expt_tp_pp_group"],
    )


def _expert_tensor_and_data_parallel_group() -> dist.ProcessGroup:
    """Ranks with this rank's pipeline stage and expert-parallel rank: they hold the same experts.

    megatron-core has no such group; every rank must create every group, in the same order."""
    key = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_expert_model_parallel_rank())
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    mine = None
    for k in sorted(set(keys)):
        group = dist.new_group([rank for rank, other in enumerate(keys) if other == k])
        if k == key:
            mine = group
    return mine


def build_muon_optimizer(
    config: OptimizerConfig,
    model_chunks: list,
    config_overrides: dict | None = None,
    use_gloo_process_groups: bool = True,
    pg_collection: ProcessGroupCollection | None = None,
) -> MuonChainedOptimizer:
    # Newton-Schulz runs where the weights are: Megatron has placed the model on this rank's device by now.
    device = next(p.device for chunk in model_chunks for p in chunk.parameters())
    settings = validate_muon_config(config, device)
    options = LayoutOptions(split_qkv=settings.split_qkv, split_glu=settings.split_glu)
    overrides = get_standard_config_overrides(config) if config_overrides is None else config_overrides
    # Parameters tagged by megatron_muon.integration.mup.apply_mup carry their LR / WD / eps multipliers.
    overrides = {**overrides, **mup_config_overrides(config, model_chunks)}
    pgs = ProcessGroupCollection.setup_process_groups_for_optimizer(pg_collection, model_chunks, use_gloo_process_groups)

    names = {p: f"{chunk}.{name}" for chunk, m in enumerate(model_chunks) for name, p in m.named_parameters()}
    # Megatron aligns param groups over all ranks, so every rank agrees whether expert groups exist.
    all_groups = _get_param_groups(model_chunks, config, overrides)
    domains = [_dense_domain(pgs)]
    if any(g["is_expert_parallel"] for g in all_groups):
        domains.append(_expert_domain(pgs))
    wrappers = []
    for domain in domains:
        groups = []
        for group in all_groups:
            if group["is_expert_parallel"] != domain.expert:
                continue
            muon = [p for p in group["params"] if is_muon_matrix(names[p], p)]
            adam = [p for p in group["params"] if not is_muon_matrix(names[p], p)]
            # Keep empty groups: Megatron's checkpoints need the same param groups on every rank.
            # `optimizer` is one of Megatron's group identifier keys: without it a Muon group and its AdamW twin
            # (same lr / wd multipliers) would be one group to Megatron's checkpoint loader (checkpoint.py).
            groups.append({**group, "params": muon, "use_muon": True, "optimizer": MUON_GROUP})
            groups.append({**group, "params": adam, "use_muon": False, "optimizer": ADAM_GROUP})
        wrappers.append(_wrap(config, domain, groups, model_chunks, names, settings, options))
    return MuonChainedOptimizer(wrappers)


def _wrap(config, domain: _Domain, groups, model_chunks, names, settings, options):
    """ShardedMuonAdamW over `groups`, inside the Megatron wrapper Adam would get, bound to its logical matrices."""
    # Before the wrapper swaps main params into the (shared) group dicts.
    muon_model_params = {p for g in groups if g["use_muon"] for p in g["params"]}
    inner = ShardedMuonAdamW(
        groups, settings, config.lr, config.weight_decay, (config.adam_beta1, config.adam_beta2), config.adam_eps
    )
    scaler = ConstantGradScaler(config.loss_scale or 1.0)
    init_state_fn = lambda opt, config=None: opt.init_state()  # noqa: E731  (Megatron's callback signature)
    if config.use_distributed_optimizer:
        buffers = {
            i: getattr(chunk, domain.buffers_attr) for i, chunk in enumerate(model_chunks) if hasattr(chunk, domain.buffers_attr)
        }
        wrapper = MuonDistributedOptimizer(
            inner, config, scaler, init_state_fn,
            model_chunks=model_chunks,
            per_model_buffers=buffers,
            data_parallel_group=domain.dp_group,
            data_parallel_group_gloo=domain.dp_group_gloo,
            data_parallel_group_idx=domain.dp_group_index,
            distributed_optimizer_instance_id=0,
        )
        wrapper.grad_stats_parallel_group = domain.stats_group_distributed
        wrapper.muon_model_params = muon_model_params
        wrapper.param_names = names
    else:
        wrapper = _ReplicatedStateOptimizer(inner, config, scaler, init_state_fn)
        wrapper.grad_stats_parallel_group = domain.stats_group_replicated
        wrapper.skip_agreement_group = domain.dp_group
    wrapper.tp_group = parallel_state.get_tensor_model_parallel_group()
    wrapper.expert_tp_group = parallel_state.get_expert_tensor_parallel_group()
    _bind(inner, wrapper, model_chunks, names, settings, options, config.use_distributed_optimizer, domain)
    return wrapper


def step_stats(optimizer) -> list[StepStats]:
    """The last Muon step's traffic and Newton-Schulz FLOPs on this rank, per plugin optimizer in a chain."""
    chain = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer.last_step for o in chain if isinstance(getattr(o, "optimizer", None), ShardedMuonAdamW)]


class _ReplicatedStateOptimizer(Float16OptimizerWithFloat16Params):
    """Megatron's wrapper for replicated optimizer state, with the skip decision agreed over DP as well.

    Megatron reduces found-inf over TP x PP only, since DP replicas hold all-reduced (equal) gradients. The Muon
    step is collective over TP x DP, so a replica that alone saw a non-finite value must not skip alone.
    """

    skip_agreement_group: dist.ProcessGroup | None = None

    def step_with_ready_grads(self) -> bool:
        # As MuonDistributedOptimizer's: a skipped inner step is an unsuccessful update.
        return super().step_with_ready_grads() and not self.optimizer.skipped

    def _unscale_main_grads_and_check_for_nan(self):
        super()._unscale_main_grads_and_check_for_nan()
        dist.all_reduce(self.found_inf, op=dist.ReduceOp.MAX, group=self.skip_agreement_group)
        return self.found_inf.item() > 0

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        # megatron-core's maps only fp16/bf16 params to model tensors; fp32 models failed (checkpoint.py).
        return replicated_sharded_state_dict(self, model_sharded_state_dict, is_loading)

    def load_state_dict(self, state_dict):
        replicated_load_state_dict(self, super().load_state_dict, state_dict)


def _main_param_ranges(wrapper, distributed: bool) -> dict[torch.nn.Parameter, tuple[torch.Tensor, int, int]]:
    """model param -> (the inner optimizer's main param for it, first and last+1 local element it covers)."""
    out = {}
    if distributed:
        for model_groups, main_groups in (
            (wrapper.model_float16_groups, wrapper.shard_fp32_from_float16_groups),
            (wrapper.model_fp32_groups, wrapper.shard_fp32_groups),
        ):
            for model_group, main_group in zip(model_groups, main_groups):
                for model_param, main_param in zip(model_group, main_group):
                    r = wrapper._get_model_param_range_map(model_param)["param"]
                    out[model_param] = (main_param, r.start, r.end)
    else:
        for model_group, main_group in zip(wrapper.float16_groups, wrapper.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                out[model_param] = (main_param, 0, model_param.numel())
        for group in wrapper.fp32_from_fp32_groups:
            for model_param in group:
                out[model_param] = (model_param, 0, model_param.numel())
    return out


def _bind(inner, wrapper, model_chunks, names, settings, options, distributed: bool, domain: _Domain) -> None:
    """Tell the inner optimizer where every Muon main param sits, and plan the step with every rank's holdings."""
    config = model_chunks[0].config
    muon_params = [p for g in inner.param_groups if g["use_muon"] for p in g["params"]]
    main_ranges = _main_param_ranges(wrapper, distributed)
    model_of_main = {id(main): model for model, (main, _, _) in main_ranges.items()}
    # Every Muon matrix of the domain, whether or not this rank holds a shard of it.
    muon_models = [p for p in names if is_muon_matrix(names[p], p) and p.requires_grad and domain.holds(p)]
    weights, shapes = {}, {}
    for p in muon_models:
        name = names[p]
        blocks = tuple(
            tuple(matrix_blocks(name, p, config, t, domain.tp_size, options)) for t in range(domain.tp_size)
        )
        weights[name] = LocalWeight(p.shape[0], p.shape[1], blocks)
        shapes.update(logical_shapes(name, p, config, domain.tp_size, options))

    mine, where = [], {}
    for main in muon_params:
        model = model_of_main[id(main)]
        _, start, end = main_ranges[model]
        numel, dp, r = model.numel(), domain.dp_size, domain.dp_rank
        # Replicated state: every DP replica updates the whole weight but sends only its 1/DP slice.
        gather = (start, end) if distributed else (r * numel // dp, (r + 1) * numel // dp)
        mine.append(Holding(names[model], domain.tp_rank, gather, (start, end)))
        where[main] = (names[model], start, model.shape[1])
    holdings = [None] * dist.get_world_size(domain.group)
    dist.all_gather_object(holdings, mine, group=domain.group)
    step = DistributedMuonStep(weights, shapes, holdings, domain.group, settings)
    inner.bind(step, where)
    plan = step.plan
    log_single_rank(
        logger, logging.INFO,
        f"megatron-muon: {len(plan.home)} {'expert' if domain.expert else 'dense'} logical matrices over "
        f"{dist.get_world_size(domain.group)} ranks (TP {domain.tp_size} x DP {domain.dp_size}), each orthogonalized "
        f"once; Newton-Schulz FLOPs max/mean over ranks {plan.imbalance:.3f}; {step.settings}",
    )
