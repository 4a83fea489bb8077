"""Single-device Muon exactly as in "Practical Efficiency of Muon for Pretraining" (arXiv 2505.02222, Eq. 1, App. G).

For every weight matrix W (m x n) with gradient G:

    M <- G + beta * M                                   momentum, no dampening, no bias correction
    U <- G + beta * M   (Nesterov)   or   M             what gets orthogonalized
    O <- orthogonalize(U)                               Newton-Schulz, see newton_schulz.py
    W <- W - lr * (scale(m, n) * O + wd * W)            weight decay coupled to the learning rate

`scale` defaults to 0.2 * sqrt(max(m, n)) so O's RMS matches a typical AdamW update (0.2) and one learning
rate and weight decay serve both Muon and the AdamW that trains embeddings, the output head and norms.
Everything else in a model (anything not 2-D, embeddings, head) goes to AdamW with the paper's betas
(0.95, 0.95) and eps 1e-8: `MuonWithAdamW` trains a whole model with one optimizer object.

No Megatron and no torch.distributed here: the distributed optimizer reuses these formulas.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_muon.muon_config import SCALE_ALIASES, SCALE_MODES, SETTINGS, UPDATE_SETTINGS, MuonConfig
from megatron_muon.newton_schulz import orthogonalize


# ---------------------------------------------------------------------------------------------------------------
# Update scale (the modes are defined with the other settings, in muon_config.py).
# ---------------------------------------------------------------------------------------------------------------
def canonical_scale_mode(name: str) -> str:
    resolved = SCALE_ALIASES.get(name, name)
    if resolved not in SCALE_MODES:
        raise ValueError(f"unknown Muon scale mode {name!r}; choose one of {SETTINGS['scale_mode'].accepted}")
    return resolved


def update_scale(mode: str, fan_out: int, fan_in: int, extra_factor: float = 1.0) -> float:
    """Multiplier on the orthogonalized update of a logical fan_out x fan_in matrix (never a shard's shape)."""
    return extra_factor * SCALE_MODES[canonical_scale_mode(mode)](fan_out, fan_in)


# ---------------------------------------------------------------------------------------------------------------
# The two update rules as in-place tensor functions (shared with the distributed optimizer), over lists of tensors
# (`torch._foreach_*`: on a GPU one multi-tensor kernel per op for a whole param group, not one kernel per
# parameter; on the CPU the same per-tensor kernels). The single-tensor update and AdamW call them with one tensor.
# ---------------------------------------------------------------------------------------------------------------
def advance_momenta(grads: list[torch.Tensor], momenta: list[torch.Tensor], beta: float) -> list[torch.Tensor]:
    """M <- G + beta M, as new tensors (the momenta are left as they are)."""
    advanced = torch._foreach_mul(momenta, beta)
    torch._foreach_add_(advanced, grads)
    return advanced


def muon_directions_(out: list[torch.Tensor], grads: list[torch.Tensor], momenta: list[torch.Tensor], beta: float,
                     nesterov: bool) -> None:
    """Write the matrices to orthogonalize into `out`: G + beta M (Nesterov, M already advanced) or M."""
    torch._foreach_copy_(out, grads if nesterov else momenta)
    if nesterov:
        torch._foreach_add_(out, momenta, alpha=beta)


def muon_direction(grad: torch.Tensor, momentum: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    """Advance `momentum` in place (M <- G + beta M) and return the matrix to orthogonalize: the same arithmetic
    as `advance_momenta` and `muon_directions_`, for the single-device Muon, which updates its state directly."""
    momentum.mul_(beta).add_(grad)
    return grad.add(momentum, alpha=beta) if nesterov else momentum


def apply_muon_updates_(params: list[torch.Tensor], orthogonals: list[torch.Tensor], lr: float, weight_decay: float,
                        scale: float) -> None:
    """W <- W - lr * (scale * O + wd * W), in place, for every W."""
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, [o.to(p.dtype) for p, o in zip(params, orthogonals)], alpha=-lr * scale)


def apply_muon_update_(param: torch.Tensor, orthogonal: torch.Tensor, lr: float, weight_decay: float, scale: float):
    """W <- W - lr * (scale * O + wd * W), in place."""
    apply_muon_updates_([param], [orthogonal], lr, weight_decay, scale)


def adamw_updates_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step (torch.optim.AdamW's formula, bias-corrected), in place, for parameters sharing `step` and the
    hyperparameters; `step` counts from 1."""
    beta1, beta2 = betas
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(bias2))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / bias1)


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
):
    """One AdamW step (torch.optim.AdamW's formula, bias-corrected), in place; `step` counts from 1."""
    adamw_updates_([param], [grad], [exp_avg], [exp_avg_sq], step, lr, betas, eps, weight_decay)


# ---------------------------------------------------------------------------------------------------------------
# Routing: which parameters Muon may train.
# ---------------------------------------------------------------------------------------------------------------
# Name fragments of input embeddings and output heads across common model code (Megatron, HF, nanoGPT).
HEAD_AND_EMBEDDING_NAMES: tuple[str, ...] = ("embed", "wte", "wpe", "lm_head", "output_layer", "logits")


@dataclass
class ParamSplit:
    muon: list[nn.Parameter] = field(default_factory=list)
    adamw: list[nn.Parameter] = field(default_factory=list)
    muon_names: list[str] = field(default_factory=list)
    adamw_names: list[str] = field(default_factory=list)


def is_muon_matrix(name: str, param: torch.Tensor, module: nn.Module | None = None) -> bool:
    """Hidden 2-D weights go to Muon; embeddings, output heads, norms, biases and anything not 2-D do not.

    Megatron tags embedding and output-layer weights with `is_embedding_or_output_parameter`; other code is
    recognized by module type (nn.Embedding) or by name.
    """
    if param.ndim != 2:
        return False
    if getattr(param, "is_embedding_or_output_parameter", False) or isinstance(module, nn.Embedding):
        return False
    lowered = name.lower()
    return not any(fragment in lowered for fragment in HEAD_AND_EMBEDDING_NAMES)


def split_params(model: nn.Module) -> ParamSplit:
    """Partition a model's trainable parameters into Muon matrices and AdamW parameters.

    A parameter shared by several modules (tied embedding and head) is routed once, to AdamW if any of its
    uses is an embedding or head.
    """
    owner_module = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if isinstance(module, nn.Embedding) or p not in owner_module:
                owner_module[p] = module
    names: dict[nn.Parameter, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names[p].append(name)
    split = ParamSplit()
    for p, aliases in names.items():
        if all(is_muon_matrix(n, p, owner_module.get(p)) for n in aliases):
            split.muon.append(p)
            split.muon_names.append(aliases[0])
        else:
            split.adamw.append(p)
            split.adamw_names.append(aliases[0])
    return split


# ---------------------------------------------------------------------------------------------------------------
# Optimizers.
# ---------------------------------------------------------------------------------------------------------------
ADAMW_DEFAULTS = dict(betas=(0.95, 0.95), eps=1e-8)


def _muon_defaults(options: dict, known: dict) -> dict:
    """`known` updated by `options`, with a TypeError naming any keyword that is not one of `known`'s."""
    unknown = set(options) - set(known)
    if unknown:
        raise TypeError(f"unknown Muon options {sorted(unknown)}; known: {sorted(known)}")
    return {**known, **options}


def _validate_muon_group(group: dict) -> None:
    """Check a Muon group's settings through MuonConfig and store them resolved (aliases to canonical names)."""
    for p in group["params"]:
        if p.ndim != 2:
            raise ValueError(
                f"Muon orthogonalizes 2-D weight matrices only; got a parameter of shape {tuple(p.shape)}. Route "
                f"embeddings, heads, norms, biases and other non-matrix parameters to AdamW (see split_params)"
            )
    config = MuonConfig(**{name: group[name] for name in UPDATE_SETTINGS})
    group.update(config.update_options())
    for device in {p.device for p in group["params"]} or {torch.device("cpu")}:
        config.check_device(device)


def _muon_step_group(group: dict, state: dict) -> None:
    """Apply Muon to every parameter of `group`; same-shape matrices are orthogonalized as one batched stack."""
    by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    directions: dict[torch.Tensor, torch.Tensor] = {}
    for p in group["params"]:
        if p.grad is None:
            continue
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p)
        directions[p] = muon_direction(p.grad, state[p]["momentum_buffer"], group["momentum"], group["nesterov"])
        by_shape[(tuple(p.shape), p.dtype, p.device)].append(p)
    for (shape, _, _), params in by_shape.items():
        stack = torch.stack([directions[p] for p in params])
        orthogonal = orthogonalize(
            stack, group["ns_steps"], group["coefficients"], group["ns_precision"], method=group["ns_method"]
        )
        scale = update_scale(group["scale_mode"], shape[0], shape[1], group["extra_scale_factor"])
        for p, o in zip(params, orthogonal):
            apply_muon_update_(p, o, group["lr"], group["weight_decay"], scale)


def _adamw_step_group(group: dict, state: dict) -> None:
    for p in group["params"]:
        if p.grad is None:
            continue
        s = state[p]
        if not s:
            s["step"] = 0
            s["exp_avg"] = torch.zeros_like(p)
            s["exp_avg_sq"] = torch.zeros_like(p)
        s["step"] += 1
        adamw_update_(p, p.grad, s["exp_avg"], s["exp_avg_sq"], s["step"], group["lr"], group["betas"],
                      group["eps"], group["weight_decay"])


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weight matrices (see the module docstring for the exact update).

    Args:
        lr: learning rate (AdamW-like magnitude under the default `essential` scale).
        weight_decay: coupled weight decay: W <- W * (1 - lr * wd) each step.
        muon_options: any `MuonConfig` field but the layout ones (momentum, nesterov, ns_steps, coefficients,
            ns_precision, ns_method, scale_mode, extra_scale_factor), with MuonConfig's defaults and checks.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1, **muon_options):
        options = _muon_defaults(muon_options, MuonConfig().update_options())
        super().__init__(params, dict(options, lr=lr, weight_decay=weight_decay))
        for group in self.param_groups:
            _validate_muon_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _muon_step_group(group, self.state)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer for a whole model: Muon on hidden matrices, AdamW on everything else.

    Both share the learning rate and weight decay (the paper's setup): one LR scheduler drives all groups.
    Each param group carries `use_muon`; build the groups from a model with `MuonWithAdamW.for_model`.
    """

    def __init__(self, param_groups: list[dict], lr: float = 1e-3, weight_decay: float = 0.1, **options):
        known = dict(MuonConfig().update_options(), **ADAMW_DEFAULTS, lr=lr, weight_decay=weight_decay)
        defaults = _muon_defaults(options, known)
        for group in param_groups:
            if "use_muon" not in group:
                raise ValueError("every MuonWithAdamW param group needs a `use_muon` flag")
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                _validate_muon_group(group)

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> "MuonWithAdamW":
        split = split_params(model)
        groups = [dict(params=split.muon, use_muon=True), dict(params=split.adamw, use_muon=False)]
        return cls([g for g in groups if g["params"]], **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (_muon_step_group if group["use_muon"] else _adamw_step_group)(group, self.state)
        return loss
