"""The plugin's optimizer settings as Megatron config fields and flags, one spelling everywhere.

megatron-core 0.19.2 already defines `muon_*` fields in `OptimizerConfig` and `--muon-*` flags. Fields that mean
the same thing here are reused as they are; `MuonOptimizerConfig` adds the new ones and changes defaults to the
paper's recipe (arXiv 2505.02222), so `--optimizer muon` trains as the paper did unless told otherwise.

Defaults that differ from megatron-core's (CLI defaults in brackets where they differ from the library's):

| field | megatron-core | here | why |
|---|---|---|---|
| muon_momentum | 0.95 [--muon-momentum 0.9] | 0.95 | the paper's beta |
| muon_nesterov | False | True (`--no-muon-nesterov` turns it off) | the paper's update |
| muon_coefficient_type | quintic | simple (Jordan's, the paper's) | the paper's coefficients |
| muon_scale_mode | spectral | essential, 0.2 sqrt(max(m, n)) | one lr / wd for Muon and AdamW |
| adam_beta1, adam_beta2 | 0.9, 0.999 | 0.95, 0.95 with --optimizer muon only | the paper's AdamW branch |
| muon_split_glu (new) | - | True (`--muon-no-split-glu`) | gate and up are separate matrices |
| muon_ns_precision (new) | - (`--muon-fp32-matmul-prec`) | bf16 | Newton-Schulz GEMM operands: fp32, bf16, fp16, fp8, or a schedule such as fp8>bf16 |
| muon_ns_method (new) | - | standard | Newton-Schulz on X (standard), on its Gram matrix (gram), or by aspect ratio (auto) |

`muon_tp_mode` and `muon_fp32_matmul_prec` configure NVIDIA's Muon only (reachable as `--optimizer nvidia_muon`):
this plugin always orthogonalizes full logical matrices, once, and takes its precision from muon_ns_precision.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron.core.optimizer import OptimizerConfig

from megatron_muon.integration.mup import DEFAULT_MUON_PRESET, base_widths, forward_multipliers
from megatron_muon.muon import SCALE_ALIASES, SCALE_MODES, canonical_scale_mode
from megatron_muon.mup.rules import PRESETS, ModelWidths, check_base_and_target
from megatron_muon.newton_schulz import (
    COEFFICIENT_ALIASES,
    COEFFICIENT_SETS,
    METHODS,
    PRECISIONS,
    check_precision,
    precision_schedule,
)

PAPER_ADAM_BETAS = (0.95, 0.95)
MEGATRON_ADAM_BETAS = (0.9, 0.999)


@dataclass
class MuonOptimizerConfig(OptimizerConfig):
    """megatron-core's OptimizerConfig with the plugin's fields and the paper's Muon defaults."""

    muon_nesterov: bool = True
    muon_coefficient_type: str = "simple"
    muon_scale_mode: str = "essential"
    muon_split_glu: bool = True
    muon_ns_precision: str = "bf16"
    muon_ns_method: str = "standard"


def validate_muon_config(config: OptimizerConfig, device=None) -> None:
    """Raise before any model work if the Muon settings cannot run; every message names its flag."""
    if config.fp16:
        raise ValueError("--optimizer muon trains in bf16 or fp32; --fp16 is not supported (use --bf16)")
    try:
        canonical_scale_mode(config.muon_scale_mode)
    except ValueError as err:
        raise ValueError(f"--muon-scale-mode: {err}") from None
    if config.muon_coefficient_type not in COEFFICIENT_SETS and config.muon_coefficient_type not in COEFFICIENT_ALIASES:
        raise ValueError(
            f"--muon-coefficient-type {config.muon_coefficient_type!r} is not one of "
            f"{sorted(COEFFICIENT_SETS) + sorted(COEFFICIENT_ALIASES)}"
        )
    if config.muon_num_ns_steps < 1:
        raise ValueError(f"--muon-num-ns-steps must be >= 1, got {config.muon_num_ns_steps}")
    if not 0.0 <= config.muon_momentum < 1.0:
        raise ValueError(f"--muon-momentum must be in [0, 1), got {config.muon_momentum}")
    method = getattr(config, "muon_ns_method", "standard")
    if method not in METHODS:
        raise ValueError(f"--muon-ns-method {method!r} is not one of {list(METHODS)}")
    precision = getattr(config, "muon_ns_precision", "bf16")
    try:
        precision_schedule(precision, config.muon_num_ns_steps, config.muon_coefficient_type, method)
        check_precision(precision, device if device is not None else _default_device())
    except ValueError as err:
        raise ValueError(f"--muon-ns-precision {precision!r}: {err}") from None
    except RuntimeError as err:
        raise RuntimeError(f"--muon-ns-precision {precision}: {err}") from None


def _default_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def add_muon_arguments(parser: argparse.ArgumentParser) -> None:
    """Extend megatron.training's parser in place: new flags, and the paper's defaults on Megatron's own."""
    actions = {opt: action for action in parser._actions for opt in action.option_strings}

    def redefault(flag: str, default, help_text: str, choices=None):
        action = actions[flag]
        action.default = default
        action.help = help_text
        if choices is not None:
            action.choices = choices

    redefault("--muon-momentum", 0.95, "Muon momentum beta (paper: 0.95).")
    redefault("--muon-nesterov", True, "Nesterov look-ahead for Muon (on by default; --no-muon-nesterov turns it off).")
    redefault("--muon-coefficient-type", "simple",
              f"Newton-Schulz coefficients: {sorted(COEFFICIENT_SETS) + sorted(COEFFICIENT_ALIASES)} "
              f"(simple = jordan, the paper's).", choices=sorted(COEFFICIENT_SETS) + sorted(COEFFICIENT_ALIASES))
    redefault("--muon-scale-mode", "essential",
              "Muon update scale: essential 0.2*sqrt(max(m,n)) (the paper's), spectral sqrt(max(m,n)), "
              "unit_rms_norm sqrt(fan_out/fan_in), shape_scaling sqrt(max(1,fan_out/fan_in)).",
              choices=sorted(SCALE_MODES) + sorted(SCALE_ALIASES))
    # None means "the optimizer's default": 0.95 for --optimizer muon (the paper), Megatron's otherwise.
    redefault("--adam-beta1", None, "Adam beta1 (default 0.9; 0.95 with --optimizer muon, the paper's).")
    redefault("--adam-beta2", None, "Adam beta2 (default 0.999; 0.95 with --optimizer muon, the paper's).")
    optimizer = actions["--optimizer"]
    optimizer.choices = [*optimizer.choices, "nvidia_muon"]
    optimizer.help += " muon: megatron-muon's distributed Muon; nvidia_muon: megatron-core's built-in Muon."

    group = parser.add_argument_group(title="megatron-muon")
    group.add_argument("--no-muon-nesterov", action="store_false", dest="muon_nesterov",
                       help="Plain momentum instead of the Nesterov look-ahead.")
    group.add_argument("--muon-no-split-glu", action="store_false", dest="muon_split_glu", default=True,
                       help="Orthogonalize a gated MLP's fused [gate; up] weight as one matrix.")
    group.add_argument("--muon-ns-precision", default="bf16",
                       help=f"Newton-Schulz GEMM operands: one of {list(PRECISIONS)} (default bf16; fp8 = e4m3, "
                            f"row-wise scaled), or a schedule 'low>high' / 'low*k>high' (e.g. fp8>bf16: fp8 for the "
                            f"first iterations, the measured split unless k is given).")
    group.add_argument("--muon-ns-method", choices=list(METHODS), default="standard",
                       help="Newton-Schulz on the matrix (standard), on its Gram matrix (gram: fewer FLOPs on "
                            "rectangular matrices such as the MLP's), or gram where the aspect ratio pays (auto).")
    # muP: Megatron's --use-mup / --mup-base-hidden-size / --mup-base-head-dim stay the switch and the base model.
    group.add_argument("--mup-preset", choices=sorted(PRESETS), default=None,
                       help="Per-parameter muP rules (init, forward, LR, weight decay, Adam eps) on top of --use-mup: "
                            "essential (the paper's; the default with --optimizer muon) or spectral. Without it, "
                            "--use-mup with another optimizer is megatron-core's own muP.")
    group.add_argument("--mup-base-ffn-hidden-size", type=int, default=None,
                       help="The muP base model's ffn_hidden_size (default: the target's, scaled by the hidden ratio).")
    group.add_argument("--mup-base-num-query-groups", type=int, default=None,
                       help="The muP base model's K/V head count (default: the target's heads per group kept).")


def resolve_adam_betas(args: argparse.Namespace) -> None:
    """Fill Adam betas left at None by add_muon_arguments: the paper's for Muon, Megatron's otherwise."""
    betas = PAPER_ADAM_BETAS if args.optimizer == "muon" else MEGATRON_ADAM_BETAS
    if args.adam_beta1 is None:
        args.adam_beta1 = betas[0]
    if args.adam_beta2 is None:
        args.adam_beta2 = betas[1]


def resolve_mup_args(args: argparse.Namespace) -> None:
    """Check the muP flags against the model and fill in what the preset decides, before anything is built.

    Runs after Megatron's validate_args (which fills ffn_hidden_size and kv_channels). The preset's forward
    multipliers go into Megatron's own mup_embedding_mult / mup_output_mult; an explicit different value is refused.
    """
    if args.mup_preset is not None and not args.use_mup:
        raise ValueError("--mup-preset needs --use-mup (with --mup-base-hidden-size, the width the LR was tuned at)")
    if not args.use_mup:
        return
    if args.mup_preset is None and args.optimizer == "muon":
        args.mup_preset = DEFAULT_MUON_PRESET
    if args.mup_preset is None:
        return
    base, target = mup_widths_from_args(args)
    check_base_and_target(base, target)
    if args.mup_base_head_dim is None:
        # The standard 1/sqrt(head_dim) attention scale at the base width (see mup.transformer_config_fields).
        args.mup_base_head_dim = base.head_dim
    embedding_mult, output_mult = forward_multipliers(args.mup_preset, base.hidden, args.hidden_size)
    for flag, field, value in (("--mup-embedding-mult", "mup_embedding_mult", embedding_mult),
                               ("--mup-output-mult", "mup_output_mult", output_mult)):
        given = getattr(args, field)
        if given != 1.0 and abs(given - value) > 1e-12 * abs(value):
            raise ValueError(f"{flag} {given} conflicts with --mup-preset {args.mup_preset}, which sets {value:.6g}")
        setattr(args, field, value)
    if args.decoupled_lr is not None:
        raise ValueError("--decoupled-lr sets the embedding / output LR that --mup-preset sets: drop one of them")


def mup_widths_from_args(args: argparse.Namespace) -> tuple[ModelWidths, ModelWidths]:
    """(base, target) model widths from Megatron's model flags and --mup-base-* flags; see mup.base_widths."""
    groups = args.num_query_groups if args.group_query_attention and args.num_query_groups else args.num_attention_heads
    experts = getattr(args, "num_experts", None)
    target = ModelWidths(
        hidden=args.hidden_size, ffn_hidden=args.ffn_hidden_size, num_heads=args.num_attention_heads,
        num_query_groups=groups, head_dim=args.kv_channels, num_experts=experts,
        moe_ffn_hidden=(getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size) if experts else None,
    )
    head_dim = args.mup_base_head_dim
    if head_dim is not None and float(head_dim) != int(head_dim):
        raise ValueError(f"--mup-base-head-dim {head_dim} must be an integer head dimension")
    base = base_widths(
        target, args.mup_base_hidden_size or args.hidden_size, args.mup_base_ffn_hidden_size,
        None if head_dim is None else int(head_dim), args.mup_base_num_query_groups,
    )
    return base, target
