"""Checkpointing the plugin's Muon through megatron-core's own distributed checkpointing (`dist_checkpointing`).

What is saved, per model parameter, and how it reshards:

* Muon matrices: the fp32 main param and the momentum (Muon's only moment) under
  `optimizer.state.momentum_buffer.<model key>`;
* AdamW parameters: the main param, `exp_avg` and `exp_avg_sq`, exactly as Megatron saves Adam;
* one common step and the param groups (with lr / wd scheduler fields) as Megatron's non-tensor state.

The tensors are keyed by the *model's* sharded-tensor keys, so Megatron's own resharding (TP, DP, PP, the GLU
factory of `linear_fc1`) applies to the momentum as to the weights. Nothing layout-specific (the logical Q/K/V or
gate/up split, the orthogonalization homes) is saved: a resumed run replans from its own layout.

With `use_distributed_optimizer` use Megatron's `fully_reshardable` format (`metadata={"distrib_optim_sharding_type":
"fully_reshardable"}`): it reshards over TP x DP x PP. `dp_reshardable` (bucket space) also works for the same TP x
PP (any DP). megatron-core 0.19.2's default `fully_sharded_model_space` fails for Adam as well ("ShardedTensor.flattened_range
is not supported").

MoE (`MuonChainedOptimizer`): megatron-core chains a dense and an expert optimizer under expert-parallel size > 1
and one optimizer under EP = 1, where expert weights are dense weights. The chain keys the tensors without Megatron's
`chained_<i>.` prefix (as megatron.training's metadata asks, `chained_optim_avoid_prefix`) and, given a checkpoint of
another chain, hands each optimizer the saved param groups it continues: `fully_reshardable` and replicated-state
checkpoints resume under another EP size (EP=2 <-> EP=1 tested, tests/test_checkpoint_moe.py). Megatron's own
Adam cannot (`KeyError: 'optimizer'` for EP=2 -> EP=1, "Expected 2 entries in state dict, but got 4" for EP=1 ->
EP=2). `dp_reshardable` keys its state by chain position (bucket space): same EP, TP and PP only. An explicit
`chained_optim_avoid_prefix=False` keeps megatron-core's prefixed keys (its default for direct `dist_checkpointing`
callers), for checkpoints saved that way: those too resume under their own EP size only.

How it fits Megatron's machinery (`MuonDistributedOptimizer`): the DP-zero gather behind `fully_reshardable` and
`dp_reshardable` copies the same state keys (`optimizer_state_keys`, ("exp_avg", "exp_avg_sq")) for every
parameter into one flat buffer per key. So the get/set hooks present a Muon param's momentum as `exp_avg` and an
all-zero placeholder `exp_avg_sq` inside that flat space, and the model-space format then renames the momentum to
`momentum_buffer` and drops the placeholder: the checkpoint stores no dead tensors, and a Muon momentum can never
be read as an Adam moment or the reverse. The inner optimizer's own state keeps its names (`momentum_buffer`).

Refusing what does not fit, loudly:

* param groups carry `optimizer` ("muon" / "adamw"), one of megatron-core's group identifier keys: Megatron
  matches saved groups to current ones by those keys, and without it a Muon group and the AdamW group with the same
  lr/wd multipliers would collapse into one (megatron-core keeps the last: Muon groups would come back as AdamW).
  A checkpoint whose groups lack it (Megatron's Adam, or an older plugin) is refused before any tensor is read;
* per tensor: a Muon param asks for `momentum_buffer.<key>`, an AdamW param for `exp_avg.<key>` and
  `exp_avg_sq.<key>`, so a checkpoint that classified a parameter differently fails in `dist_checkpointing.load`
  with the missing key, and the set hook names the parameter if a state tensor is missing.

Replicated state (no distributed optimizer, `Float16OptimizerWithFloat16Params`, also used for fp32 models):
megatron-core maps only the fp16/bf16 params to model tensors (fp32 params fail with "Param id 0 does not match any
model sharded param"); `replicated_sharded_state_dict` maps every inner param to its model param. The keys are
then `optimizer.state.<state key>.<model key>` as in Megatron (`momentum_buffer`, `exp_avg`, `exp_avg_sq`) plus
`optimizer.state.fp32_param.<key>` for bf16 models; the model weights themselves are the fp32 models' main params.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import merge
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import param_group_identifier_keys

from megatron_muon.runtime.distributed_muon import agree_finite

MUON_GROUP, ADAM_GROUP = "muon", "adamw"
_MOMENTUM = "momentum_buffer"
_PREFIX = "optimizer.state."
# Where MuonChainedOptimizer keeps what this layout asks the checkpoint for, apart from the saved chain's structure.
_REQUESTED = "megatron_muon.requested"


def check_saved_groups(saved_groups: list[dict]) -> None:
    """Refuse a checkpoint whose param groups were not written by this plugin's Muon."""
    for i, group in enumerate(saved_groups):
        kind = group.get("optimizer")
        if kind not in (MUON_GROUP, ADAM_GROUP) or group.get("use_muon") != (kind == MUON_GROUP):
            raise ValueError(
                f"megatron-muon: checkpoint param group {i} (optimizer={kind!r}, use_muon={group.get('use_muon')!r}) "
                "was not saved by megatron-muon's Muon (e.g. it is Megatron's Adam or nvidia_muon state); loading it "
                "would read Adam moments as Muon momentum. Start the optimizer fresh (--no-load-optim) instead."
            )


class MuonDistributedOptimizer(DistributedOptimizer):
    """Megatron's DistributedOptimizer around `ShardedMuonAdamW`, checkpointable in Megatron's reshardable formats."""

    #: model params (all of them, local shard or not) in Muon groups; set by build_muon_optimizer
    muon_model_params: set = frozenset()
    #: model param -> name, for error messages
    param_names: dict = {}

    def step_with_ready_grads(self) -> bool:
        # A step the inner optimizer skipped (non-finite orthogonalized update) is reported as Megatron reports a
        # non-finite gradient: unsuccessful, so megatron.training counts it as skipped and the scheduler waits.
        return super().step_with_ready_grads() and not self.optimizer.skipped

    def _is_muon(self, model_param) -> bool:
        return model_param in self.muon_model_params

    def _name(self, model_param) -> str:
        return self.param_names.get(model_param, f"<param of shape {tuple(model_param.shape)}>")

    # --- flat (bucket / DP-zero) space: uniform keys --------------------------------------------------------
    def _get_main_param_and_optimizer_states(self, model_param):
        tensors = super()._get_main_param_and_optimizer_states(model_param)
        if self._is_muon(model_param):
            momentum = tensors.pop(_MOMENTUM)
            # Megatron's flat formats need every key of optimizer_state_keys for every param.
            tensors["exp_avg"] = momentum
            tensors["exp_avg_sq"] = torch.zeros_like(momentum)
        return tensors

    @torch.no_grad()  # fp32 models: the main param is a view of the model param, which requires grad
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main]
        if self._is_muon(model_param):
            targets = {"param": main, "exp_avg": state[_MOMENTUM]}  # exp_avg_sq: the placeholder, ignored
        else:
            targets = {"param": main, "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
        for key, target in targets.items():
            source = tensors.get(key)
            if not isinstance(source, torch.Tensor):
                raise KeyError(
                    f"megatron-muon: the checkpoint has no '{key}' state for {self._name(model_param)} "
                    f"({'Muon' if self._is_muon(model_param) else 'AdamW'} parameter); it has {sorted(tensors)}"
                )
            if source.numel() != target.numel():
                raise ValueError(
                    f"megatron-muon: checkpoint '{key}' of {self._name(model_param)} has {source.numel()} elements "
                    f"for {target.numel()} in this rank's shard"
                )
            target.copy_(source.view_as(target))

    # --- model space (fully_reshardable): momentum under its own key -------------------------------------------
    def _params_in_format_order(self):
        """Model params in the order Megatron numbers them in the fully_reshardable state dict."""
        for gbuf_idx, _ in enumerate(self.gbuf_ranges):
            yield from self.buffers[gbuf_idx].param_index_map.keys()

    def sharded_param_state_fully_reshardable(self, model_sharded_state_dict, is_loading=False, metadata=None):
        state = super().sharded_param_state_fully_reshardable(model_sharded_state_dict, is_loading, metadata)
        if state is None:
            return None
        for idx, model_param in enumerate(self._params_in_format_order()):
            if not self._is_muon(model_param):
                continue
            tensors = state[idx]
            momentum, _ = tensors.pop("exp_avg"), tensors.pop("exp_avg_sq")
            assert momentum.key.startswith(_PREFIX + "exp_avg."), momentum.key
            key = _PREFIX + _MOMENTUM + momentum.key[len(_PREFIX + "exp_avg") :]
            tensors[_MOMENTUM] = replace(momentum, key=key)
        return state

    def load_parameter_state_from_fully_reshardable(self, state_dict: dict):
        for idx, model_param in enumerate(self._params_in_format_order()):
            if self._is_muon(model_param) and _MOMENTUM in state_dict[idx]:
                state_dict[idx]["exp_avg"] = state_dict[idx].pop(_MOMENTUM)
        super().load_parameter_state_from_fully_reshardable(state_dict)

    # --- non-tensor state -----------------------------------------------------------------------------------
    def state_dict(self):
        # Megatron reads the common step from the state: create it (zeros) if no step has run yet.
        self.optimizer.init_state()
        return super().state_dict()

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, sharding_type=None, metadata=None):
        self.optimizer.init_state()
        return super().sharded_state_dict(model_sharded_state_dict or {}, is_loading, sharding_type, metadata)

    def load_state_dict(self, state_dict):
        check_saved_groups(state_dict["optimizer"]["param_groups"])
        # Allocate the plugin's own state first, so Megatron does not allocate Adam keys for Muon params.
        self.optimizer.init_state()
        super().load_state_dict(state_dict)
        _restore_group_steps(self.optimizer)


def _restore_group_steps(inner) -> None:
    """Megatron writes the common step back as a float; the plugin counts steps in ints, from its state."""
    for group in inner.param_groups:
        steps = {float(inner.state[p]["step"]) for p in group["params"] if "step" in inner.state[p]}
        if len(steps) > 1:
            raise ValueError(f"megatron-muon: parameters of one group were loaded at different steps {sorted(steps)}")
        group["step"] = int(steps.pop()) if steps else int(group.get("step", 0))
        for p in group["params"]:
            state = inner.state[p]
            if "step" in state:
                # Megatron's loader shares one step tensor among all params: give each its own.
                state["step"] = state["step"].detach().clone()


def replicated_sharded_state_dict(wrapper, model_sharded_state_dict, is_loading: bool = False) -> dict:
    """`Float16OptimizerWithFloat16Params.sharded_state_dict`, with every inner param mapped to its model param.

    megatron-core maps the inner params' ids to `float16_groups` only, which is wrong as soon as a group holds an
    fp32 model param (its main param is the model param itself, in `fp32_from_fp32_groups`)."""
    wrapper.optimizer.init_state()
    state_dict = wrapper.state_dict()
    model_of_main = {
        main: model
        for model_group, main_group in zip(wrapper.float16_groups, wrapper.fp32_from_float16_groups)
        for model, main in zip(model_group, main_group)
    }
    # torch numbers state by position over param_groups; follow the same order.
    in_state_order = [model_of_main.get(p, p) for group in wrapper.optimizer.param_groups for p in group["params"]]
    id_to_sharded = get_param_id_to_sharded_param_map(model_sharded_state_dict, in_state_order)
    missing = [i for i in range(len(in_state_order)) if i not in id_to_sharded]
    if missing:
        raise ValueError(f"megatron-muon: {len(missing)} optimizer params have no model sharded tensor (ids {missing[:5]})")
    saved_groups = state_dict["optimizer"]["param_groups"]
    state_dict["fp32_from_fp16_params"] = [
        [
            make_sharded_optimizer_tensor(id_to_sharded[param_id], main, prefix=_PREFIX + "fp32_param")
            for param_id, main in zip(
                (pid for pid, p in zip(group["params"], inner["params"]) if p in model_of_main), mains
            )
        ]
        for mains, group, inner in zip(state_dict["fp32_from_fp16_params"], saved_groups, wrapper.optimizer.param_groups)
    ]
    step = wrapper._extract_common_per_param_step(state_dict["optimizer"])
    optim_state_to_sharding_state(state_dict["optimizer"], id_to_sharded, exclude_keys="step")
    if step:
        state_dict["optimizer"]["state"]["common_step"] = step
    return state_dict


def replicated_load_state_dict(wrapper, load, state_dict) -> None:
    """Check the groups, load with Megatron's `load` (the wrapper's base method), and fix the step counts."""
    check_saved_groups(state_dict["optimizer"]["param_groups"])
    wrapper.optimizer.init_state()
    load(state_dict)
    _restore_group_steps(wrapper.optimizer)


class MuonChainedOptimizer(ChainedOptimizer):
    """Megatron's ChainedOptimizer over the plugin's wrappers, whose checkpoints resume under another EP size.

    megatron-core tags expert weights `allreduce=False` only when they need expert process groups (EP > 1, or an
    expert TP other than TP); otherwise they are ordinary dense weights. So EP > 1 chains a dense and an expert
    optimizer, EP = 1 one optimizer holding both, and Megatron's ChainedOptimizer saves one state dict per
    optimizer ({0: dense, 1: expert}) or the lone optimizer's own: loading either into the other chain fails
    (`KeyError: 'optimizer'`, or "Expected 2 entries in state dict"). Here, the tensors are keyed by model keys
    without the `chained_<i>.` prefix, which therefore do not depend on the chain, and a checkpoint from another
    chain is loaded by giving each optimizer the saved param groups it needs (`regroup`).
    """

    def step_with_ready_grads(self) -> bool:
        """One decision for the whole chain: the dense and the expert optimizers both step, or neither does.

        Each inner optimizer computes its orthogonalized update first (`prepare`, collective over its own group);
        one agreement over every rank then says whether all of them are finite, and each wrapper's step applies or
        discards accordingly. Deciding per optimizer could apply the dense update and skip the experts'.
        """
        inners = [o.optimizer for o in self.chained_optimizers]
        finite = agree_finite([inner.prepare() for inner in inners], inners[0].routing_device)
        for inner in inners:
            inner.decision = finite
        return super().step_with_ready_grads() and finite

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
        # Megatron keeps the prefix for bucket-space formats (dp_reshardable), whose object keys would collide. An
        # explicit False still loads a checkpoint saved with prefixed keys, under its own EP size.
        kwargs["metadata"] = {"chained_optim_avoid_prefix": True, **(kwargs.get("metadata") or {})}
        state = super().sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)
        if not is_loading:
            return state
        # dist_checkpointing.load returns the saved (common) structure with the tensors loaded into this request
        # merged in; kept under a key of its own, the two stay apart even when the chains differ.
        chain = self.chained_optimizers
        return {_REQUESTED: {0: state} if len(chain) == 1 else {i: state[i] for i in range(len(chain))}}

    def load_state_dict(self, state_dict):
        if _REQUESTED not in state_dict:  # not from dist_checkpointing (e.g. megatron.training's torch format)
            super().load_state_dict(state_dict)
            return
        requested = state_dict[_REQUESTED]
        saved = {k: v for k, v in state_dict.items() if k != _REQUESTED}
        # A chain of several optimizers saves one state dict each under 0, 1, ...; a chain of one its own.
        saved = [saved[i] for i in range(len(saved))] if 0 in saved else [saved]
        chain = self.chained_optimizers
        if len(saved) == len(chain):
            states = [merge(s, requested[i]) for i, s in enumerate(saved)]
        else:
            layout = (
                f"loading a checkpoint of {len(saved)} chained optimizer(s) into {len(chain)} under expert-parallel "
                f"size {parallel_state.get_expert_model_parallel_world_size()}"
            )
            states = [_state_from_another_chain(o, saved, requested[i], layout) for i, o in enumerate(chain)]
        for optimizer, state in zip(chain, states):
            optimizer.load_state_dict(state)
        self._synchronize_steps()


def _identity(group: dict) -> tuple:
    """Megatron's identifier of a param group (`param_group_identifier_keys`, NeMo's `pre_` aliases included),
    without `is_expert_parallel`: the one identifier an expert-parallel size changes."""
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys if k != "is_expert_parallel")


def regroup(current_groups: list[dict], saved_groups: list[dict], layout: str) -> list[dict]:
    """For each current param group, the saved one (params left out) it continues, from any optimizer of the saved
    chain: dense and expert groups are one group under EP = 1 and two under EP > 1, told apart only by
    `is_expert_parallel`. Saved groups merged into one must agree on every value (lr, weight decay, step, ...)."""
    out = []
    for group in current_groups:
        matches = [g for g in saved_groups if _identity(g) == _identity(group)]
        if not matches:
            raise ValueError(
                f"megatron-muon: {layout}: the checkpoint has no param group for "
                f"{dict(zip((k for k in param_group_identifier_keys if k != 'is_expert_parallel'), _identity(group)))}"
            )
        fields = {k for g in matches for k in g} - {"params", "is_expert_parallel"}
        differ = sorted(k for k in fields if any(g.get(k) != matches[0].get(k) for g in matches))
        if differ:
            raise ValueError(
                f"megatron-muon: {layout}: the checkpoint's dense and expert param groups that become one group "
                f"here differ in {differ}; resume under the expert-parallel size it was saved with"
            )
        out.append({**{k: v for k, v in matches[0].items() if k != "params"},
                    "is_expert_parallel": group["is_expert_parallel"]})
    return out


def _state_from_another_chain(optimizer, saved: list[dict], requested: dict, layout: str) -> dict:
    """`optimizer`'s state dict from a checkpoint whose chain had another number of optimizers: its tensors as
    loaded for this layout, its param groups regrouped from all saved optimizers, the rest from the dense one."""
    groups = regroup(optimizer.optimizer.param_groups, [g for s in saved for g in s["optimizer"]["param_groups"]],
                     layout)
    dense = saved[0]
    # The replicated wrapper's main params of fp16 / bf16 models come with the requested tensors (the saved list
    # follows the saved groups), and so do its groups' param ids (megatron-core does not persist them).
    base = copy.deepcopy({k: v for k, v in dense.items() if k != "fp32_from_fp16_params"})  # merge writes into it
    base["optimizer"]["param_groups"] = groups
    state = merge(base, requested)
    if not isinstance(optimizer, DistributedOptimizer):
        # No fp16 / bf16 params (an fp32 model): nothing of the main params was requested.
        state.setdefault("fp32_from_fp16_params", [])
    return state


__all__ = [
    "ADAM_GROUP",
    "MUON_GROUP",
    "MuonChainedOptimizer",
    "MuonDistributedOptimizer",
    "check_saved_groups",
    "regroup",
    "replicated_load_state_dict",
    "replicated_sharded_state_dict",
]
