"""python -m megatron_muon.mup: muP tools for a megatron-core GPT.

    coord-check   train the GPT at several widths for a few high-LR steps on one fixed batch, under standard
                  parametrization (SP) and muP; write the per-module activation and update sizes as CSV and
                  PNG plots and print how much each one spreads over the widths (flat = muP works)

Runs on CPU in one gloo process (megatron-core's local layer spec, no Transformer Engine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_muon.mup.coord_check import (
    DEFAULT_LRS,
    OPTIMIZERS,
    PARAMETRIZATIONS,
    QUANTITIES,
    CoordCheckConfig,
    coord_check,
    plot,
    spread_table,
    write_csv,
)
from megatron_muon.mup.rules import PRESETS


def _add_coord_check(subparsers) -> None:
    defaults = CoordCheckConfig()
    p = subparsers.add_parser(
        "coord-check",
        help="coordinate check of SP vs muP over widths",
        description="Coordinate check of a megatron-core GPT: mean |activation| and its change from init per module, "
        "and the spectral norm of each hidden matrix's update, per step and width, for SP and muP. "
        "Widths grow by adding query groups of whole heads (head_dim and the GQA ratio fixed); depth is fixed; "
        "the smallest width is the muP base.",
    )
    p.add_argument("--widths", type=int, nargs="+", default=list(defaults.widths), help="hidden sizes, increasing")
    p.add_argument("--num-layers", type=int, default=defaults.num_layers)
    p.add_argument("--head-dim", type=int, default=defaults.head_dim)
    p.add_argument("--heads-per-query-group", type=int, default=defaults.heads_per_query_group)
    p.add_argument("--ffn-ratio", type=int, default=defaults.ffn_ratio, help="ffn_hidden_size / hidden (gated MLP)")
    p.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    p.add_argument("--seq-length", type=int, default=defaults.seq_length)
    p.add_argument("--micro-batch", type=int, default=defaults.micro_batch, help="sequences in the fixed batch")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                   help="muon: the plugin's Muon on hidden matrices + AdamW on the rest; adamw: Megatron's Adam")
    p.add_argument("--lr", type=float, default=None,
                   help=f"constant learning rate, the same at every width (default {DEFAULT_LRS})")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--preset", choices=sorted(PRESETS), default=defaults.preset, help="muP preset")
    p.add_argument("--parametrizations", nargs="+", choices=PARAMETRIZATIONS, default=list(defaults.parametrizations))
    p.add_argument("--seeds", type=int, default=defaults.seeds, help="average over this many seeds")
    p.add_argument("--seed", type=int, default=defaults.seed, help="first seed")
    p.add_argument("--out-dir", type=Path, default=Path("results/coord_check"))
    p.set_defaults(run=_coord_check)


def _coord_check(args) -> None:
    from rich.console import Console

    try:
        config = CoordCheckConfig(
            widths=tuple(args.widths), num_layers=args.num_layers, head_dim=args.head_dim,
            heads_per_query_group=args.heads_per_query_group, ffn_ratio=args.ffn_ratio, vocab_size=args.vocab_size,
            seq_length=args.seq_length, micro_batch=args.micro_batch, steps=args.steps, optimizer=args.optimizer,
            lr=args.lr, weight_decay=args.weight_decay, preset=args.preset,
            parametrizations=tuple(args.parametrizations), seeds=args.seeds, seed=args.seed,
        )
    except ValueError as err:
        sys.exit(f"coord-check: {err}")
    result = coord_check(config, verbose=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = [args.out_dir / "coord_check.csv"]
    write_csv(result, written[0])
    for quantity in QUANTITIES:
        path = args.out_dir / f"coord_check_{quantity}.png"
        plot(result, quantity, path)
        written.append(path)
    console = Console(width=max(160, Console().width))
    console.print(spread_table(result))
    for path in written:
        console.print(f"wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_muon.mup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_coord_check(subparsers)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
