"""python -m megatron_muon.sweep: the telescoping muP sweep of arXiv 2505.02222 (Algorithm 1) as a command.

    plan       print the stages, grids and predicted compute of a telescope (nothing runs)
    telescope  run it: stage by stage, resumable (rerun the same command after a crash)
    brute      the full base grid at one width, for comparison with the telescope (same store; --refine-top K:
               one seed per point, all seeds at the best K)
    report     heatmaps, per-stage distributions, drift, power-law fit, brute-force comparison
    economics  the paper's Fig. 13: % saved vs brute force and % of compute on the final run

Trials default to tiny Megatron GPTs on this machine's CPU (megatron_muon.sweep.trial); --template plugs in any
command that writes the result JSON to {out}, and --backend slurm runs them as sbatch job arrays.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from megatron_muon.study.metrics import seed_spread
from megatron_muon.sweep.runner import (
    DEFAULT_FIXED,
    DEFAULT_TEMPLATE,
    OPTIONAL_TRIAL_FIELDS,
    RunnerOptions,
    SweepIncomplete,
    TelescopeConfig,
    TrialRunner,
    chosen_values,
    run_brute_force,
    run_telescope,
)
from megatron_muon.sweep.store import ResultStore, StoreError
from megatron_muon.sweep.telescope import LogRange

DEFAULT_RANGES = ("lr=1e-3:1e-1", "wd=1e-3:1")


def parse_range(text: str) -> LogRange:
    try:
        name, bounds = text.split("=", 1)
        low, high = bounds.split(":", 1)
        return LogRange(name.strip(), float(low), float(high))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--hp {text!r}: expected NAME=LOW:HIGH with positive numbers ({e})")


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_fixed(items: list[str]) -> dict:
    fixed = dict(DEFAULT_FIXED)
    for item in items:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--fixed {item!r}: expected NAME=VALUE")
        name, value = item.split("=", 1)
        fixed[name.strip()] = parse_value(value)
    return fixed


def add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sweep config (fingerprinted into the store)")
    g.add_argument("--base-width", type=int, default=32, help="N0: width of the full grid")
    g.add_argument("--calibration-width", type=int, default=128, help="Nc: widest swept width (N0 doubled)")
    g.add_argument("--final-width", type=int, help="N: width of the final run, for cost accounting (default Nc)")
    g.add_argument("--hp", action="append", type=parse_range, metavar="NAME=LOW:HIGH",
                   help=f"a swept hyperparameter, log scale (repeat; default {' '.join(DEFAULT_RANGES)})")
    g.add_argument("--points", type=int, default=8, help="m0: grid points per hyperparameter at the base width")
    g.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help="trial command; {field}s come from --fixed, width, the hyperparameters, and the runner's "
                        "{python} {out} {run_dir}; the default passes the trial's "
                        + ", ".join(f"--{n.replace('_', '-')}" for n in OPTIONAL_TRIAL_FIELDS)
                        + " when a --hp or --fixed names them")
    g.add_argument("--fixed", action="append", default=[], metavar="NAME=VALUE",
                   help=f"a template field held constant (repeat; defaults {DEFAULT_FIXED})")
    g.add_argument("--objective", choices=("final", "smoothed"), default="final",
                   help="final: the trial's held-out loss at the end; smoothed: EMA(0.95) of its training curve")
    g.add_argument("--cost-exponent", type=float, default=2.0, help="cost of a run ~ width^this")
    g.add_argument("--seeds", type=int, default=1,
                   help="runs per grid point of the final stage and of the brute-force grid, with seeds --fixed "
                        "seed, seed + 1, ...: the chosen point is reported with its spread over seeds")
    g.add_argument("--seed-every-stage", action="store_true",
                   help="--seeds for every stage, so each stage's optimum is a mean over seeds")


def add_runner_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("running (may change between restarts)")
    g.add_argument("--store", type=Path, default=Path("sweep.sqlite"))
    g.add_argument("--runs-dir", type=Path, help="attempt directories (default: <store>-runs next to the store)")
    g.add_argument("--backend", choices=("local", "slurm"), default="local")
    g.add_argument("--parallel", type=int, default=1, help="local: trials at a time")
    g.add_argument("--threads-per-trial", type=int, default=1, help="local: OMP_NUM_THREADS of each trial")
    g.add_argument("--max-attempts", type=int, default=2, help="launches per trial before it counts as failed")
    g.add_argument("--poll-s", type=float, default=1.0)
    g.add_argument("--quiet", action="store_true", help="no live table")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="slurm: an #SBATCH line, e.g. --sbatch-arg=--partition=gpu (repeat)")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                   help="slurm: a shell line run before each trial (module load, source venv; repeat)")
    g.add_argument("--slurm-max-running", type=int, help="slurm: array throttle (%%N)")


def config_from(args) -> TelescopeConfig:
    template, fixed = args.template, parse_fixed(args.fixed)
    ranges = tuple(args.hp or [parse_range(r) for r in DEFAULT_RANGES])
    if template == DEFAULT_TEMPLATE:
        # The embedded trial in muP relative to the sweep's base width: the swept LR / WD are the base model's.
        template += " --mup-base-width {mup_base_width}"
        fixed.setdefault("mup_base_width", args.base_width)
        named = set(fixed) | {r.name for r in ranges}
        template += "".join(f" --{name.replace('_', '-')} {{{name}}}" for name in OPTIONAL_TRIAL_FIELDS
                            if name in named)
    return TelescopeConfig(
        base_width=args.base_width, calibration_width=args.calibration_width, ranges=ranges, points=args.points,
        final_width=args.final_width, template=template, fixed=fixed,
        objective=args.objective, cost_exponent=args.cost_exponent, seeds=args.seeds,
        seed_every_stage=args.seed_every_stage,
    )


def make_backend(args, runs_dir: Path):
    from megatron_muon.sweep.backends import LocalBackend, SlurmBackend

    if args.backend == "local":
        return LocalBackend(parallel=args.parallel, threads=args.threads_per_trial)
    return SlurmBackend(runs_dir / "slurm", sbatch_args=args.sbatch_arg, setup=args.slurm_setup,
                        max_running=args.slurm_max_running)


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_with_store(args, config_dict: dict, columns, objective: str, body) -> int:
    """Open the store, lock it, run `body(runner)`, and turn every expected failure into a message and exit code."""
    previous_handler = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        return _run_locked(args, config_dict, columns, objective, body)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _run_locked(args, config_dict: dict, columns, objective: str, body) -> int:
    store = ResultStore(args.store, config_dict)
    runs_dir = args.runs_dir or args.store.with_name(args.store.stem + "-runs")
    with store:
        store.acquire_lock()
        runner = TrialRunner(store, make_backend(args, runs_dir), config_dict.get("template", DEFAULT_TEMPLATE),
                             runs_dir, RunnerOptions(max_attempts=args.max_attempts, poll_s=args.poll_s))
        try:
            if args.quiet:
                result = body(runner)
            else:
                from megatron_muon.sweep.display import LiveDisplay

                with LiveDisplay(columns, objective) as display:
                    runner.display = display
                    result = body(runner)
        except SweepIncomplete as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted: finished trials are kept; rerun the same command to resume", file=sys.stderr)
            return 130
        finally:
            runner.shutdown()
    print(json.dumps(result, indent=2))
    return 0


def cmd_plan(args) -> int:
    config = config_from(args)
    plan = config.plan()
    from megatron_muon.sweep.report import format_plan

    print(format_plan(plan))
    if config.seeds > 1:
        seeded = [s.index for s in plan.stages if config.seed_values(s) != [None]]
        print(f"seeds: {config.seeds} runs per grid point at stage(s) {seeded} and of the brute-force grid")
    return 0


def _columns(config) -> list[str]:
    return ["width", *(r.name for r in config.ranges), *(["seed"] if config.seeds > 1 else [])]


def _spread(point, objective: str) -> dict:
    return asdict(seed_spread(point.values(objective)))


def cmd_telescope(args) -> int:
    config = config_from(args)
    names = [r.name for r in config.ranges]

    def body(runner):
        chosen = run_telescope(config, runner)
        return dict(chosen=dict(zip(names, chosen_values(chosen, names))),
                    chosen_loss=_spread(chosen, config.objective), store=str(args.store))

    return run_with_store(args, config.fingerprint_dict(), _columns(config), config.objective, body)


def cmd_brute(args) -> int:
    config = config_from(args)
    names = [r.name for r in config.ranges]
    width = args.width or config.calibration_width
    points = args.brute_points or config.points

    def body(runner):
        chosen = run_brute_force(config, runner, width, points, args.refine_top)
        return dict(brute_force_optimum=dict(zip(names, chosen_values(chosen, names))),
                    optimum_loss=_spread(chosen, config.objective), width=width, points=points,
                    refine_top=args.refine_top)

    return run_with_store(args, config.fingerprint_dict(), _columns(config), config.objective, body)


def cmd_report(args) -> int:
    from megatron_muon.sweep.report import write_report

    summary = write_report(ResultStore(args.store), args.out or args.store.with_name(args.store.stem + "-report"),
                           loss_cap=args.loss_cap, brute_force_stores=tuple(ResultStore(p) for p in args.brute_store))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_economics(args) -> int:
    from megatron_muon.sweep.report import economics_figure

    rows = economics_figure(args.grid_runs, args.levels, args.out)
    print(f"{'G':>5} {'levels':>6} {'Nc/N':>7} {'sweep':>8} {'final %':>8} {'saved %':>8}")
    for r in rows:
        print(f"{r['base_grid_runs']:>5} {r['levels']:>6} {r['calibration_over_final']:>7.4f} {r['sweep_cost']:>8.3f} "
              f"{100 * r['final_run_share']:>8.1f} {100 * r['saving_vs_brute_force']:>8.1f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_muon.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="stages and predicted compute")
    add_config_args(p)
    p.set_defaults(run=cmd_plan)
    p = sub.add_parser("telescope", help="run Algorithm 1")
    add_config_args(p)
    add_runner_args(p)
    p.set_defaults(run=cmd_telescope)
    p = sub.add_parser("brute", help="full base grid at one width")
    add_config_args(p)
    add_runner_args(p)
    p.add_argument("--width", type=int, help="default: the calibration width")
    p.add_argument("--brute-points", type=int, help="points per hyperparameter (default --points)")
    p.add_argument("--refine-top", type=int, metavar="K",
                   help="with --seeds N: the grid at the first seed only, then its best K points with all N seeds; "
                        "the optimum is the best mean over seeds among those K (default: every point N times)")
    p.set_defaults(run=cmd_brute)
    p = sub.add_parser("report", help="plots and tables from a store")
    p.add_argument("--store", type=Path, default=Path("sweep.sqlite"))
    p.add_argument("--out", type=Path, help="directory (default <store>-report)")
    p.add_argument("--loss-cap", type=float, help="truncate losses above this in the distribution plot")
    p.add_argument("--brute-store", type=Path, action="append", default=[],
                   help="another store of the same config holding a brute-force grid (repeat)")
    p.set_defaults(run=cmd_report)
    p = sub.add_parser("economics", help="Fig. 13 as a table and a PNG")
    p.add_argument("--grid-runs", type=int, nargs="+", default=[256, 64, 16, 4], help="G = m0^2")
    p.add_argument("--levels", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--out", type=Path, default=Path("telescope_economics.png"))
    p.set_defaults(run=cmd_economics)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
