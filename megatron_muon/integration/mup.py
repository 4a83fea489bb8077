"""muP on a megatron-core GPT: the per-parameter rules of `megatron_muon.mup.rules`, through Megatron's own fields.

Megatron's `TransformerConfig` already carries muP: `use_mup` turns it on, `mup_base_hidden_size` names the proxy,
`mup_embedding_mult` / `mup_output_mult` multiply the embedding output and the logits, `mup_base_head_dim` and
`mup_attn_scale_power` set the attention logit scale. It scales every hidden init by one width multiplier and
gives Muon matrices no LR rule and no parameter any weight-decay rule. A muP *preset* (`--mup-preset essential`, the
paper's; `essential_exact`, its update scale with Muon's width-exact LR; or `spectral`) keeps Megatron's switches and adds what is missing:

* forward multipliers: the preset's embedding and logit multipliers go into `mup_embedding_mult` /
  `mup_output_mult` (`forward_multipliers`), so Megatron's own forward applies them;
* init: after Megatron built the model with its `use_mup` init, `apply_mup` rescales each logical matrix (Q, K, V,
  gate, up separately inside the fused weights, on every TP shard) from Megatron's multiplier to the rule's, which
  uses that matrix's own fan ratios (MLP down: ffn; K/V: query groups x head dim);
* LR / weight decay / Adam eps: `apply_mup` tags each parameter with its `ParamRule` (`param.mup_rule`), and
  `mup_config_overrides` turns the tags into Megatron param-group overrides (max_lr, min_lr, wd_mult, eps) for the
  plugin's Muon and its chained Adam, or for Megatron's own Adam (the AdamW baseline under the same muP);
* two hyperparameters on top of a preset: `MupSpec.embedding_lr_mult` multiplies the word embedding's LR rule and
  `output_mult` the logit multiplier (1: the preset as it is), so a sweep can tune them on the base model.

Base widths not given default to the target's shape ratios (`base_widths`): only the hidden size is required.

Written against megatron-core 0.19.2: `TransformerConfig.__post_init__`'s use_mup init (hidden init std / sqrt(m),
embedding and untied output head unscaled) and `_get_param_groups`' override keys.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace
from fractions import Fraction

import torch

from megatron_muon.mup.rules import (
    EMBEDDING,
    OUTPUT,
    ROUTER,
    ModelWidths,
    ParamRule,
    get_preset,
    rule,
)

logger = logging.getLogger(__name__)

# The paper trains with Muon and muP together; this preset applies when --optimizer muon is given without one.
DEFAULT_MUON_PRESET = "essential"

_ROLE_BY_NAME = [
    (re.compile(r"(^|\.)experts\.(local_experts\.\d+\.)?linear_fc1\.weight\d*$"), "expert_fc1"),
    (re.compile(r"(^|\.)experts\.(local_experts\.\d+\.)?linear_fc2\.weight\d*$"), "expert_down"),
    (re.compile(r"(^|\.)linear_qkv\.weight$"), "qkv"),
    (re.compile(r"(^|\.)self_attention\.linear_proj\.weight$"), "proj"),
    (re.compile(r"(^|\.)mlp\.linear_fc1\.weight$"), "fc1"),
    (re.compile(r"(^|\.)mlp\.linear_fc2\.weight$"), "down"),
    (re.compile(r"(^|\.)router\.weight$"), ROUTER),
    (re.compile(r"(^|\.)embedding\.word_embeddings\.weight$"), EMBEDDING),
    (re.compile(r"(^|\.)output_layer\.weight$"), OUTPUT),
]


@dataclass(frozen=True)
class MupSpec:
    """What a muP run needs beyond the TransformerConfig: the preset, the base (proxy) model's widths, and what
    trains the hidden matrices: "muon" (Muon, with Adam on embeddings, head and vectors) or "adam" (everything).

    Two tunable multipliers on top of the preset, width-independent like the base model's hyperparameters (1: the
    preset as it is): `embedding_lr_mult` on the word embedding's LR (peak and floor; with tied embeddings that is
    the output head's too), `output_mult` on the logits (the model must be built with it:
    `transformer_config_fields(..., output_mult=...)`)."""

    preset: str
    base: ModelWidths
    optimizer: str = "muon"
    embedding_lr_mult: float = 1.0
    output_mult: float = 1.0

    def __post_init__(self):
        if self.optimizer not in ("muon", "adam"):
            raise ValueError(f"MupSpec.optimizer must be 'muon' or 'adam', got {self.optimizer!r}")
        check_multiplier("embedding_lr_mult", self.embedding_lr_mult)
        check_multiplier("output_mult", self.output_mult)


def check_multiplier(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"muP {name} must be finite and > 0, got {value!r}")


def target_widths(config) -> ModelWidths:
    """The logical widths of the model `config` (a TransformerConfig) describes; TP does not enter."""
    return ModelWidths(
        hidden=config.hidden_size,
        ffn_hidden=config.ffn_hidden_size,
        num_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        num_experts=config.num_moe_experts,
        moe_ffn_hidden=config.moe_ffn_hidden_size if config.num_moe_experts else None,
    )


def base_widths(
    target: ModelWidths,
    base_hidden: int,
    base_ffn_hidden: int | None = None,
    base_head_dim: int | None = None,
    base_num_query_groups: int | None = None,
    base_moe_ffn_hidden: int | None = None,
) -> ModelWidths:
    """The proxy's widths: given ones as they are, the others scaled from the target by base_hidden / hidden.

    The attention width (heads x head_dim) scales with hidden; with base_head_dim given (Megatron's
    --mup-base-head-dim) the head count follows from it. Query groups keep the target's heads-per-group.
    """
    ratio = Fraction(base_hidden, target.hidden)

    def scaled(value: int, what: str, flag: str) -> int:
        exact = value * ratio
        if exact.denominator != 1:
            raise ValueError(
                f"muP base {what} = {value} x {base_hidden}/{target.hidden} = {float(exact):g} is not an integer; "
                f"give it with {flag}"
            )
        return int(exact)

    head_dim = int(base_head_dim) if base_head_dim is not None else target.head_dim
    attention = scaled(target.num_heads * target.head_dim, "attention width (heads x head_dim)", "--mup-base-head-dim")
    if attention % head_dim:
        raise ValueError(
            f"muP base attention width {attention} is not a multiple of the base head dim {head_dim} "
            f"(--mup-base-head-dim)"
        )
    heads = attention // head_dim
    if base_num_query_groups is None:
        per_group = target.num_heads // target.num_query_groups
        if heads % per_group:
            raise ValueError(
                f"muP base model has {heads} heads, not a multiple of the target's {per_group} heads per query group; "
                f"give --mup-base-num-query-groups"
            )
        base_num_query_groups = heads // per_group
    ffn = base_ffn_hidden if base_ffn_hidden is not None else scaled(
        target.ffn_hidden, "ffn_hidden_size", "--mup-base-ffn-hidden-size"
    )
    moe_ffn = None
    if target.moe_ffn_hidden is not None:
        moe_ffn = base_moe_ffn_hidden or scaled(target.moe_ffn_hidden, "moe_ffn_hidden_size", "--mup-base-ffn-hidden-size")
    return ModelWidths(
        hidden=base_hidden, ffn_hidden=ffn, num_heads=heads, num_query_groups=base_num_query_groups,
        head_dim=head_dim, num_experts=target.num_experts, moe_ffn_hidden=moe_ffn,
    )


def forward_multipliers(preset: str, base_hidden: int, hidden: int) -> tuple[float, float]:
    """(mup_embedding_mult, mup_output_mult) for TransformerConfig under `preset`."""
    p = get_preset(preset)
    r = hidden / base_hidden
    return r ** float(p.embedding_forward_power), r ** float(p.output_forward_power)


def transformer_config_fields(preset: str, base_hidden: int, hidden: int, base_head_dim: int,
                              output_mult: float = 1.0) -> dict:
    """The TransformerConfig muP fields for `preset` (megatron.training sets them from the flags), with the logits
    multiplied by `output_mult` on top of the preset's (MupSpec.output_mult).

    mup_base_head_dim makes Megatron's attention scale sqrt(base_head_dim) / head_dim: the standard
    1 / sqrt(head_dim) at the base, so the base model is the SP model the hyperparameters were tuned on (left
    unset, Megatron uses 1 / head_dim at every width, the base included).
    """
    check_multiplier("output_mult", output_mult)
    embedding_mult, preset_output_mult = forward_multipliers(preset, base_hidden, hidden)
    return dict(use_mup=True, mup_base_hidden_size=base_hidden, mup_embedding_mult=embedding_mult,
                mup_output_mult=preset_output_mult * output_mult, mup_base_head_dim=base_head_dim)


def megatron_init_mult(role: str, config) -> float:
    """The init std multiplier Megatron's own `use_mup` already applied to a parameter with `role`.

    megatron-core 0.19.2: init_method (QKV, fc1, router, expert fc1) and output_layer_init_method (proj, fc2)
    take std / sqrt(mup_width_mult); the word embedding and an untied output head take embedding_init_method,
    which is unscaled. A tied head is the embedding.
    """
    if not config.use_mup or role in (EMBEDDING, OUTPUT):
        return 1.0
    return 1.0 / math.sqrt(config.mup_width_mult)


def roles(name: str, param: torch.Tensor, config) -> dict[str, str] | str:
    """A parameter's muP role(s): one role for unfused weights and vectors, logical matrix -> role for fused ones.

    Megatron marks the tied output head's copy on the last pipeline stage `shared_embedding`: it is the embedding.
    """
    if param.ndim == 1:
        return "bias" if name.endswith(".bias") else "norm"
    if getattr(param, "shared_embedding", False):
        return EMBEDDING
    for pattern, role in _ROLE_BY_NAME:
        if pattern.search(name):
            break
    else:
        raise ValueError(
            f"muP: no rule for parameter {name} of shape {tuple(param.shape)}; megatron-muon knows the GPT's "
            f"embedding, output head, linear_qkv, linear_proj, linear_fc1/fc2 (dense and expert), router and norms"
        )
    if role == "qkv":
        return {f"{name}:{part}": part for part in ("q", "k", "v")}
    if role in ("fc1", "expert_fc1"):
        prefix = "expert_" if role == "expert_fc1" else ""
        if not config.gated_linear_unit:
            return prefix + "up"
        return {f"{name}:gate": prefix + "gate", f"{name}:up": prefix + "up"}
    return role


def _tp_of(param) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not getattr(param, "allreduce", True):  # expert weights are sharded over the expert TP group
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def apply_mup(model_chunks: list, spec: MupSpec) -> dict[str, ParamRule]:
    """Rescale the init of every parameter from Megatron's use_mup init to the rule's, and tag it with its rule.

    Call once, on the freshly built model (megatron.training does it through `install()`), before the optimizer
    is built: the optimizer copies main params and reads the tags. Returns name -> rule of this rank's params.
    """
    from megatron_muon.integration.layouts import LayoutOptions, matrix_blocks

    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    config = _unwrap(chunks[0]).config
    if not config.use_mup:
        raise ValueError("muP preset given but the model was built without use_mup (--use-mup)")
    embedding_mult, output_mult = forward_multipliers(spec.preset, spec.base.hidden, config.hidden_size)
    output_mult *= spec.output_mult
    for field, value in (("mup_embedding_mult", embedding_mult), ("mup_output_mult", output_mult)):
        if not math.isclose(getattr(config, field), value, rel_tol=1e-9):
            raise ValueError(
                f"TransformerConfig.{field} is {getattr(config, field)}, but muP preset {spec.preset} with base hidden "
                f"{spec.base.hidden} (output_mult {spec.output_mult:g}) needs {value:.6g}: build the model with "
                f"transformer_config_fields(...)"
            )
    target = target_widths(config)
    applied = {}
    for chunk in chunks:
        for name, param in _unwrap(chunk).named_parameters():
            if getattr(param, "mup_rule", None) is not None:
                raise RuntimeError(f"muP was already applied to {name}: apply_mup must run once per model")
            found = roles(name, param, config)
            parts = found if isinstance(found, dict) else {name: found}
            rules = {
                matrix: rule(role, spec.base, target, spec.preset, "adam" if spec.optimizer == "adam" else None)
                for matrix, role in parts.items()
            }
            first = next(iter(rules.values()))
            mixed = {m: r for m, r in rules.items() if (r.lr_mult, r.wd_mult, r.eps_mult) != (first.lr_mult, first.wd_mult, first.eps_mult)}
            if mixed:
                raise ValueError(
                    f"muP gives the logical matrices of the fused weight {name} different LR / WD / eps multipliers "
                    f"({ {m: (r.lr_mult, r.wd_mult, r.eps_mult) for m, r in rules.items()} }); one param group "
                    f"cannot hold them"
                )
            with torch.no_grad():
                if isinstance(found, dict):
                    tp_rank, tp_size = _tp_of(param)
                    for block in matrix_blocks(name, param, config, tp_rank, tp_size, LayoutOptions(True, True)):
                        r = block.local
                        correction = rules[block.matrix].init_std_mult / megatron_init_mult(parts[block.matrix], config)
                        param.data[r.row0 : r.row0 + r.rows, r.col0 : r.col0 + r.cols].mul_(correction)
                elif first.column != "vector":  # norms start at 1 and biases at 0: no width to correct for
                    param.data.mul_(first.init_std_mult / megatron_init_mult(found, config))
            if found == EMBEDDING:
                first = replace(first, lr_mult=first.lr_mult * spec.embedding_lr_mult)
            param.mup_rule = first
            applied[name] = first
    from megatron.core.utils import log_single_rank

    lr_mults = sorted({f"{r.lr_mult:.4g}" for r in applied.values()})
    log_single_rank(
        logger, logging.INFO,
        f"megatron-muon: muP preset {spec.preset} for {spec.optimizer}, base {spec.base} -> target {target}: per-matrix init applied to "
        f"{len(applied)} parameters, LR multipliers {lr_mults}, embedding x{embedding_mult:.4g}, "
        f"logits x{output_mult:.4g}"
        + (f", embedding LR x{spec.embedding_lr_mult:g} on the preset's" if spec.embedding_lr_mult != 1.0 else ""),
    )
    return applied


def mup_config_overrides(config, model_chunks: list) -> dict:
    """Megatron param-group overrides from the `mup_rule` tags: one key per distinct (lr, wd, eps) multiplier set.

    Only multipliers that differ from 1 are written, so norms and biases keep Megatron's standard wd_mult = 0.
    """
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    tagged = {
        (r.lr_mult, r.wd_mult, r.eps_mult)
        for chunk in model_chunks
        for p in _unwrap(chunk).parameters()
        if (r := getattr(p, "mup_rule", None)) is not None
    }
    # Only a model that muP tagged conflicts with --decoupled-lr; without muP it is Megatron's feature as usual.
    if tagged and config.decoupled_lr is not None:
        raise ValueError("--decoupled-lr sets the embedding / output LR that muP sets: drop one of them")
    overrides = {}
    for lr_mult, wd_mult, eps_mult in sorted(tagged):
        override = {}
        if lr_mult != 1.0:
            override["max_lr"] = config.lr * lr_mult
            if config.min_lr is not None:
                override["min_lr"] = config.min_lr * lr_mult
        if wd_mult != 1.0:
            override["wd_mult"] = wd_mult
        if eps_mult != 1.0:
            override["eps"] = config.adam_eps * eps_mult
        if not override:
            continue

        def matches(param, _name, key=(lr_mult, wd_mult, eps_mult)) -> bool:
            r = getattr(param, "mup_rule", None)
            return r is not None and (r.lr_mult, r.wd_mult, r.eps_mult) == key

        label = f"megatron-muon mup lr x{lr_mult:.6g} wd x{wd_mult:.6g} eps x{eps_mult:.6g}"
        overrides[ParamKey(with_name_predicate=ParamWithNamePredicate(name=label, fn=matches))] = override
    return overrides


def _unwrap(module):
    """The GPTModel inside DDP / Float16Module wrappers, whose parameter names the roles are read from."""
    while hasattr(module, "module"):
        module = module.module
    return module
