"""The plugin's settings as Megatron config fields and flags, derived from `MuonConfig` (muon_config.py).

megatron-core 0.19.2 already defines `muon_*` fields in `OptimizerConfig` and `--muon-*` flags. Every MuonConfig
setting names its field and flag (`muon_config.SETTINGS`): megatron-core's spelling where it means the same thing,
a new one otherwise. From that one table, `MuonOptimizerConfig` is OptimizerConfig with each such field defaulting
to MuonConfig's (the paper's recipe, arXiv 2505.02222), `add_muon_arguments` gives megatron.training's parser the
same defaults, choices and help and adds the new flags, and `muon_config_from` reads a config (or parsed arguments)
back into one MuonConfig, which validates it. Adam's betas default to the paper's (0.95, 0.95) with
`--optimizer muon` only.

`muon_tp_mode` and `muon_fp32_matmul_prec` configure NVIDIA's Muon only (reachable as `--optimizer nvidia_muon`):
this plugin always orthogonalizes full logical matrices, once, and takes its precision from muon_ns_precision.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from megatron.core.optimizer import OptimizerConfig

from megatron_muon.integration.mup import DEFAULT_MUON_PRESET, base_widths, forward_multipliers
from megatron_muon.muon_config import SETTINGS, MuonConfig
from megatron_muon.mup.rules import PRESETS, ModelWidths, check_base_and_target

PAPER_ADAM_BETAS = (0.95, 0.95)
MEGATRON_ADAM_BETAS = (0.9, 0.999)

_DEFAULTS = MuonConfig()

MuonOptimizerConfig = dataclasses.make_dataclass(
    "MuonOptimizerConfig",
    [(SETTINGS[f.name].megatron_field, f.type, dataclasses.field(default=getattr(_DEFAULTS, f.name)))
     for f in dataclasses.fields(MuonConfig)],
    bases=(OptimizerConfig,),
    namespace={"__doc__": "megatron-core's OptimizerConfig with every Muon field, defaulting to MuonConfig's."},
    module=__name__,
)


def muon_config_from(config) -> MuonConfig:
    """The Muon settings of an OptimizerConfig (or of megatron.training's parsed arguments), validated."""
    missing = [s.megatron_field for s in SETTINGS.values() if not hasattr(config, s.megatron_field)]
    if missing:
        raise TypeError(
            f"{type(config).__name__} has no {', '.join(missing)}: build the config as "
            f"megatron_muon.integration.flags.MuonOptimizerConfig, or call megatron_muon.install() before "
            f"megatron.training builds it"
        )
    return MuonConfig(**{name: getattr(config, s.megatron_field) for name, s in SETTINGS.items()})


def validate_muon_config(config, device: torch.device | None = None) -> MuonConfig:
    """The Muon settings of `config`, or an error naming the flag, before any model work.

    `device` is where Newton-Schulz runs; None (argument time, before each rank has chosen its GPU) leaves the
    device check to the optimizer build.
    """
    if config.fp16:
        raise ValueError("--optimizer muon trains in bf16 or fp32; --fp16 is not supported (use --bf16)")
    muon = muon_config_from(config)
    if device is not None:
        muon.check_device(device)
    return muon


def add_muon_arguments(parser: argparse.ArgumentParser) -> None:
    """Extend megatron.training's parser in place: new flags, and MuonConfig's defaults on Megatron's own."""
    actions = {opt: action for action in parser._actions for opt in action.option_strings}
    # set_defaults also redefaults Megatron's actions of these dests, and is what the new ones below default to.
    parser.set_defaults(**{s.megatron_field: getattr(_DEFAULTS, name) for name, s in SETTINGS.items()})
    group = parser.add_argument_group(title="megatron-muon")
    for f in dataclasses.fields(MuonConfig):
        setting = SETTINGS[f.name]
        help_text = setting.help if f.type is bool else f"{setting.help} Default: %(default)s."
        for action in parser._actions:
            if action.dest == setting.megatron_field:
                action.help = help_text
                action.choices = setting.accepted or None
        if setting.flag in actions:
            continue
        if f.type is bool:
            switch = "store_false" if getattr(_DEFAULTS, f.name) else "store_true"
            group.add_argument(setting.flag, action=switch, dest=setting.megatron_field, help=help_text)
        else:
            group.add_argument(setting.flag, type=f.type, dest=setting.megatron_field, choices=setting.accepted or None,
                               help=help_text)

    # None means "the optimizer's default": 0.95 for --optimizer muon (the paper), Megatron's otherwise.
    actions["--adam-beta1"].default = None
    actions["--adam-beta1"].help = "Adam beta1 (default 0.9; 0.95 with --optimizer muon, the paper's)."
    actions["--adam-beta2"].default = None
    actions["--adam-beta2"].help = "Adam beta2 (default 0.999; 0.95 with --optimizer muon, the paper's)."
    optimizer = actions["--optimizer"]
    optimizer.choices = [*optimizer.choices, "nvidia_muon"]
    optimizer.help += " muon: megatron-muon's distributed Muon; nvidia_muon: megatron-core's built-in Muon."

    # muP: Megatron's --use-mup / --mup-base-hidden-size / --mup-base-head-dim stay the switch and the base model.
    group.add_argument("--mup-preset", choices=sorted(PRESETS), default=None,
                       help="Per-parameter muP rules (init, forward, LR, weight decay, Adam eps) on top of --use-mup: "
                            "essential (the paper's; the default with --optimizer muon), essential_exact (the paper's "
                            "update scale with Muon's width-exact LR) or spectral. Without it, "
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
