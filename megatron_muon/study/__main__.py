"""python -m megatron_muon.study batch: Muon vs AdamW across global batch sizes (arXiv 2505.02222, Sec. 2.3-2.5).

Run mode (the default): trains both optimizers at every --batch-sizes entry with the same token budget, over a
learning-rate grid per optimizer, with --seeds seeds each (model init and data order), through the sweep's store
and backends, so a killed study resumes with the same command. Per batch size the rate with the best final loss
averaged over seeds is analysed; one on an end of its grid is flagged. Import mode: --tensorboard and/or
--from-store analyse existing runs instead of training (repeat a --tensorboard run's OPT:TOKENS_PER_STEP for more
seeds of it).

With two or more seeds T_L(B), R_L(B) and T_A - T_M come with percentile-bootstrap intervals over seeds, and the
summary says per loss threshold whether R_L(B) > 1 at every B and whether R_L(B) increases with B (Spearman rank
correlation) at --confidence.

Outputs in --out: batch_study.csv (per threshold and batch: T_L, S_L, R_L(B), T_A - T_M with *_ci_low / *_ci_high,
devices, hours), token_optimal.csv, token_ratio.png, steps_and_tokens_to_loss.png (intervals as bands),
compute_time.png, curves.png, summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from megatron_muon.study.metrics import (
    BOOTSTRAP_RNG_SEED,
    DEFAULT_CONFIDENCE,
    DEFAULT_EMA,
    DEFAULT_RESAMPLES,
    DeviceRule,
)
from megatron_muon.study.batch import (
    OPTIMIZERS,
    STUDY_TEMPLATE,
    BatchStudyConfig,
    analyse,
    best_curves_from_store,
    curves_from_tensorboard,
    print_summary,
    run_study,
)
from megatron_muon.sweep.__main__ import add_runner_args, parse_value, run_with_store
from megatron_muon.sweep.store import ResultStore, StoreError


def parse_lr_grid(text: str) -> list[float]:
    """"0.01,0.03" (a list) or "1e-2:1e-1:5" (5 log-spaced points from 1e-2 to 1e-1, both included), or a comma
    list mixing the two; sorted, duplicates dropped."""
    values = set()
    for part in text.split(","):
        bounds = part.split(":")
        if len(bounds) == 1:
            values.add(float(part))
            continue
        if len(bounds) != 3:
            raise ValueError(f"learning-rate range {part!r}: expected LOW:HIGH:POINTS")
        low, high, points = float(bounds[0]), float(bounds[1]), int(bounds[2])
        if not (0 < low < high and points >= 2):
            raise ValueError(f"learning-rate range {part!r}: needs 0 < LOW < HIGH and POINTS >= 2")
        values.update(float(v) for v in np.geomspace(low, high, points))
    return sorted(values)


def parse_per_optimizer(items: list[str], what: str, many: bool) -> dict:
    """["muon=0.01,0.02", "adamw=1e-3:1e-2:3"] -> {"muon": [0.01, 0.02], "adamw": [0.001, 0.00316..., 0.01]};
    many=False takes one number per optimizer."""
    out = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in OPTIMIZERS or not values:
            raise ValueError(f"{what} {item!r}: expected OPTIMIZER=VALUE[,VALUE...] with OPTIMIZER in {OPTIMIZERS}")
        out[name] = parse_lr_grid(values) if many else float(values)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_muon.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("batch", help="token ratio, tokens/steps to loss, token-optimal batch, compute-time plane")
    g = p.add_argument_group("runs (fingerprinted into the store)")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="sequences per step")
    g.add_argument("--lr", action="append", default=[], metavar="OPT=LR[,LR...]|OPT=LOW:HIGH:POINTS",
                   help="learning rates tried per optimizer: a list, or POINTS log-spaced rates from LOW to HIGH "
                        "(default muon=0.01,0.03 adamw=0.003,0.01)")
    g.add_argument("--tokens", type=int, default=262144, help="token budget of every run")
    g.add_argument("--seq-length", type=int, default=32)
    g.add_argument("--width", type=int, default=64)
    g.add_argument("--wd", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=1234, help="the first seed (model init and data order)")
    g.add_argument("--seeds", type=int, default=1,
                   help="seeds per (optimizer, batch size, learning rate): --seed, --seed + 1, ...")
    g.add_argument("--template", default=STUDY_TEMPLATE)
    g.add_argument("--fixed", action="append", default=[], metavar="NAME=VALUE")
    add_runner_args(p)
    p.set_defaults(store=Path("batch_study.sqlite"))
    g = p.add_argument_group("import instead of running")
    g.add_argument("--tensorboard", action="append", default=[], metavar="OPT:TOKENS_PER_STEP:LOGDIR",
                   help="a Megatron run's TensorBoard directory (repeat)")
    g.add_argument("--tb-tag", default="lm loss")
    g.add_argument("--from-store", type=Path, help="analyse the finished runs of an existing store")
    g = p.add_argument_group("analysis")
    g.add_argument("--out", type=Path, default=Path("batch_study"))
    g.add_argument("--thresholds", type=float, nargs="+", help="loss thresholds L (default: --num-thresholds, auto)")
    g.add_argument("--num-thresholds", type=int, default=8)
    g.add_argument("--ema", type=float, default=DEFAULT_EMA, help="smoothing of the curves before T_L is read")
    g.add_argument("--device-unit", type=float, default=2.0 ** 20,
                   help="tokens that play the paper's 1M in its device rule (8/16/32/64/128 devices at <1/2/4/8 units)")
    g.add_argument("--throughput", action="append", default=[], metavar="OPT=TOKENS_PER_S",
                   help="per-device throughput for the hours axis (default: measured from the runs)")
    g.add_argument("--token-optimal-rtol", type=float, default=0.0,
                   help="B_tok = largest B with T_L(B) <= (1 + rtol) min T_L")
    g.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                   help="of the bootstrap intervals over seeds and of the summary's verdicts")
    g.add_argument("--bootstrap-resamples", type=int, default=DEFAULT_RESAMPLES)
    g.add_argument("--bootstrap-seed", type=int, default=BOOTSTRAP_RNG_SEED,
                   help="of the bootstrap's RNG, so the same runs give the same intervals")
    p.set_defaults(run=cmd_batch)
    return parser


def cmd_batch(args) -> int:
    analysis = dict(
        thresholds=args.thresholds, num_thresholds=args.num_thresholds, beta=args.ema,
        device_rule=DeviceRule(token_unit=args.device_unit),
        tokens_per_second=parse_per_optimizer(args.throughput, "--throughput", many=False) or None,
        token_optimal_rtol=args.token_optimal_rtol, confidence=args.confidence,
        resamples=args.bootstrap_resamples, rng_seed=args.bootstrap_seed,
    )
    if analysis["tokens_per_second"] and set(analysis["tokens_per_second"]) != set(OPTIMIZERS):
        raise ValueError(f"--throughput needs both {OPTIMIZERS}")
    if args.tensorboard or args.from_store:
        curves, chosen = [], []
        if args.from_store:
            with ResultStore(args.from_store) as store:
                curves, chosen = best_curves_from_store(store)
        # A run given again at the same optimizer and tokens per step is another seed of it, numbered in order.
        repeats = Counter()
        for spec in args.tensorboard:
            curve = curves_from_tensorboard(spec, args.tb_tag)
            curves.append(replace(curve, seed=repeats[curve.optimizer, curve.batch_tokens]))
            repeats[curve.optimizer, curve.batch_tokens] += 1
        return _finish(analyse(curves, args.out, chosen=chosen, **analysis), args.out)

    learning_rates = {"muon": [0.01, 0.03], "adamw": [0.003, 0.01]}
    learning_rates.update(parse_per_optimizer(args.lr, "--lr", many=True))
    fixed = {}
    for item in args.fixed:
        name, _, value = item.partition("=")
        fixed[name] = parse_value(value)
    config = BatchStudyConfig(
        batch_sizes=tuple(args.batch_sizes), learning_rates=learning_rates, tokens=args.tokens,
        seq_length=args.seq_length, width=args.width, wd=args.wd, seed=args.seed, template=args.template, fixed=fixed,
        seeds=args.seeds,
    )

    def body(runner):
        run_study(config, runner)
        curves, chosen = best_curves_from_store(runner.store)
        summary = analyse(curves, args.out, chosen=chosen, **analysis)
        print_summary(summary, file=sys.stderr)
        return dict(out=str(args.out), store=str(args.store))

    columns = ["optimizer", "global_batch", "lr", *(["seed"] if config.seeds > 1 else [])]
    return run_with_store(args, config.fingerprint_dict(), columns, "final", body)


def _finish(summary: dict, out: Path) -> int:
    print_summary(summary)
    print(json.dumps(dict(out=str(out)), indent=2))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
