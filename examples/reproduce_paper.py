"""Both of the paper's methods at CPU scale, end to end, with seeds: see examples/reproduce_paper.md for the results.

    python examples/reproduce_paper.py [--quick] [--seeds N] [--out results/reproduce_paper] [--parallel 2]
                                       [--parametrization mup|sp]

a. Telescoping sweep (Algorithm 1) of Muon's learning rate and weight decay on tiny megatron-core GPTs in muP
   (`essential`, relative to width 32), widths 32 -> 64 -> 128, the final stage with every seed; then the
   brute-force grid at width 128, refined (`sweep brute --refine-top`: every point at one seed, its best points
   with every seed), so the telescope's miss is judged against the seed noise; the sweep report and the Fig. 13
   economics. `--parametrization sp` runs this part in standard parametrization instead (stores of their own).
b. Batch-size study: Muon and AdamW at several global batch sizes with one token budget, a few learning rates
   each, every run with every seed: R_L(B) with bootstrap intervals, tokens and steps to loss, token-optimal batch
   sizes, the compute-time plane.
c. Why muP loses to SP's tuned optimum at the final width (issue 15, point 5), weight decay fixed at 1e-3: an LR
   scan (refined: every LR at one seed, the best with every seed) in SP and in muP `essential`, `essential_exact`
   and `spectral`; a telescope over (lr, embedding LR multiplier, output multiplier) in muP `essential`, 3 points
   each (the preset's own 1 on the base grid); and at the final width the 2 x 2 factorial of the telescope's two
   multipliers against 1 at its learning rate, every corner with every seed. Each corner's loss minus SP's best,
   paired by seed, says which multiplier closes the gap and whether what is left is within the seed noise.

Cost (one thread per trial, two trials at a time, each trial ~6.5 s of process start; at 150 steps a trial takes
~10 s at width 32, ~13 s at 64, ~24 s at 128), measured on 2 cores on 2026-12-06:
full run (default: seeds 3, widths up to 128, 150 steps): 59 min 17 s
    a. 64 + 16 + 4 x 3 telescope runs and 64 + 3 x 2 brute-force runs: 31 min
    b. 5 batch sizes x 2 optimizers x 3 LRs x 3 seeds = 90 runs of 131,072 tokens: 15 min
    c. 4 x (6 LRs + 2 seeds) scan runs, 27 + 8 + 1 telescope runs, 4 x 3 factorial runs: 13 min
--quick (seeds 2, widths 32 -> 64 and everything else at width 64, 100 steps): 14 min 56 s
    a. 16 + 4 x 2 telescope runs, a 4 x 4 brute force + 2 seeded points
    b. batch sizes 4, 16, 64 x 2 optimizers x 3 LRs x 2 seeds = 36 runs of 65,536 tokens
    c. 4 x (3 LRs + 1 seed) scan runs, 27 + 8 telescope runs, 4 x 2 factorial runs

Every step is the public command with a results store, so an interrupted run resumes where it stopped and a
finished one only regenerates the plots and the summary printed at the end (results in --out/<full|quick>-seeds<N>).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from megatron_muon.study.metrics import seed_spread  # noqa: E402
from megatron_muon.sweep.report import paired_difference  # noqa: E402
from megatron_muon.sweep.runner import brute_force_optimum, grid_points  # noqa: E402
from megatron_muon.sweep.store import ResultStore  # noqa: E402

OBJECTIVE = "final"


@dataclass(frozen=True)
class Scale:
    """One size of the reproduction; the module docstring's costs follow from these numbers."""

    width: int  # the last telescope stage's, the brute force's and the gap study's
    steps: int
    seeds: int  # the default --seeds
    points: int  # per hyperparameter of the (lr, wd) telescope's base grid and of the brute-force grid
    refine_top: int  # brute-force points rerun with every seed
    batch_sizes: tuple[int, ...]
    batch_tokens: int
    batch_lrs: tuple[str, ...]
    scan_points: int  # learning rates per parametrization in the gap study


SCALES = {
    "full": Scale(width=128, steps=150, seeds=3, points=8, refine_top=3, batch_sizes=(4, 8, 16, 32, 64),
                  batch_tokens=131072, batch_lrs=("muon=0.01,0.03,0.1", "adamw=0.003,0.01,0.03"), scan_points=6),
    # Three learning rates per optimizer in the batch study: with two, every choice is on a grid edge.
    "quick": Scale(width=64, steps=100, seeds=2, points=4, refine_top=2, batch_sizes=(4, 16, 64),
                   batch_tokens=65536, batch_lrs=("muon=0.01,0.03,0.1", "adamw=0.003,0.01,0.03"), scan_points=3),
}
# The sweep's embedded trial is in muP relative to --base-width unless its muP base is set to 0.
PARAMETRIZATION = {"mup": [], "sp": ["--fixed", "mup_base_width=0"]}
# The gap study: wd where the brute force of the first (one-seed) reproduction found the optimum at width 128.
GAP_WD = "wd=0.001"
SCANS = {"sp": ["--fixed", "mup_base_width=0"], "essential": ["--fixed", "mup_preset=essential"],
         "essential_exact": ["--fixed", "mup_preset=essential_exact"], "spectral": ["--fixed", "mup_preset=spectral"]}
SCAN_LR = "lr=8e-3:2.5e-1"
KNOBS = ("embedding_lr_mult", "output_mult")
# 3 points per knob put muP's own multipliers (1) and its optimum LR (~0.06) on the base grid.
KNOB_RANGES = ("lr=1.5e-2:2.4e-1", "embedding_lr_mult=0.25:4", "output_mult=0.25:4")
KNOB_POINTS = 3


def run(*args: str) -> None:
    print("$ python", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the <= 15 minute version (see above)")
    parser.add_argument("--seeds", type=int, help="per batch-study run, per point of the telescope's final stage, the "
                                                  "refined brute-force and LR-scan points and the factorial "
                                                  "(default 3; --quick 2)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "reproduce_paper")
    parser.add_argument("--parallel", type=int, default=2, help="trials at a time (one CPU thread each)")
    parser.add_argument("--parametrization", choices=sorted(PARAMETRIZATION), default="mup",
                        help="of part a's telescope and brute force (parts b and c are the same either way)")
    args = parser.parse_args()
    name = "quick" if args.quick else "full"
    scale = SCALES[name]
    seeds = args.seeds or scale.seeds
    if seeds < 2:
        parser.error("every comparison here is judged against the seed noise: --seeds 2 or more")
    out = args.out.resolve() / f"{name}-seeds{seeds}"  # a store belongs to one config
    out.mkdir(parents=True, exist_ok=True)
    runner = ["--parallel", str(args.parallel), "--quiet"]
    widths = ["--base-width", "32", "--calibration-width", str(scale.width), "--fixed", f"steps={scale.steps}"]
    common = [*widths, "--seeds", str(seeds)]

    # a. The telescope and its brute force (own store, so it could run beside the telescope: one runner per store).
    tag = "" if args.parametrization == "mup" else f"_{args.parametrization}"
    telescope = [*common, "--points", str(scale.points), "--hp", "lr=1e-3:3e-1", "--hp", "wd=1e-3:1",
                 *PARAMETRIZATION[args.parametrization]]
    store, brute = str(out / f"telescope{tag}.sqlite"), str(out / f"brute{tag}.sqlite")
    run("-m", "megatron_muon.sweep", "plan", *telescope)
    run("-m", "megatron_muon.sweep", "telescope", *telescope, "--store", store, *runner)
    run("-m", "megatron_muon.sweep", "brute", *telescope, "--store", brute, "--width", str(scale.width),
        "--refine-top", str(scale.refine_top), *runner)
    report = out / f"telescope_report{tag}"
    run("-m", "megatron_muon.sweep", "report", "--store", store, "--brute-store", brute, "--out", str(report))
    run("-m", "megatron_muon.sweep", "economics", "--out", str(out / "telescope_economics.png"))

    # b. The batch-size study.
    lrs = [flag for lr in scale.batch_lrs for flag in ("--lr", lr)]
    run("-m", "megatron_muon.study", "batch", "--batch-sizes", *map(str, scale.batch_sizes),
        "--tokens", str(scale.batch_tokens), "--width", "64", "--device-unit", "512", *lrs, "--seeds", str(seeds),
        "--store", str(out / "batch_study.sqlite"), "--out", str(out / "batch_study"), *runner)

    # c. The gap between muP and SP at the final width.
    gap = out / "gap"
    scan = [*common, "--hp", SCAN_LR, "--points", str(scale.scan_points), "--fixed", GAP_WD,
            "--width", str(scale.width), "--refine-top", "1"]
    for parametrization, fixed in SCANS.items():
        run("-m", "megatron_muon.sweep", "brute", *scan, *fixed, "--store", str(gap / f"scan_{parametrization}.sqlite"),
            *runner)
    # One seed: the factorial below gives the seeds, at the final width.
    knobs = [*widths, "--points", str(KNOB_POINTS), *(f for r in KNOB_RANGES for f in ("--hp", r)), "--fixed", GAP_WD]
    run("-m", "megatron_muon.sweep", "telescope", *knobs, "--store", str(gap / "knobs.sqlite"), *runner)
    run("-m", "megatron_muon.sweep", "report", "--store", str(gap / "knobs.sqlite"), "--out", str(gap / "knobs_report"))
    chosen = json.loads((gap / "knobs_report" / "summary.json").read_text())["chosen"]
    factorial = [*common, "--points", "2", "--width", str(scale.width), "--fixed", f"lr={chosen['lr']!r}",
                 "--fixed", GAP_WD,
                 *(f for k in KNOBS for f in ("--hp", f"{k}={min(1.0, chosen[k])!r}:{max(1.0, chosen[k])!r}"))]
    run("-m", "megatron_muon.sweep", "brute", *factorial, "--store", str(gap / "factorial.sqlite"), *runner)
    gap_summary = gap_study(gap, scale.width)
    (gap / "gap_study.json").write_text(json.dumps(gap_summary, indent=2))

    print_results(json.loads((report / "summary.json").read_text()),
                  json.loads((out / "batch_study" / "summary.json").read_text()), gap_summary)


def gap_study(gap: Path, width: int) -> dict:
    """Part c's numbers from its stores: each LR scan's best (mean over seeds) and its loss minus SP's best paired by
    seed; the knob telescope's stages; the factorial's corners against the preset's and against SP's best."""
    bests, scans = {}, {}
    for parametrization in SCANS:
        points = sorted(_brute_points(gap / f"scan_{parametrization}.sqlite"), key=lambda p: p.params["lr"])
        best = bests[parametrization] = brute_force_optimum(points, OBJECTIVE)
        scans[parametrization] = dict(
            lrs=[p.params["lr"] for p in points],
            first_seed_loss=[min(p.trials, key=lambda t: t.params["seed"]).objective(OBJECTIVE) for p in points],
            best_lr=best.params["lr"], best_lr_on_scan_edge=best in (points[0], points[-1]),
            best=asdict(seed_spread(best.values(OBJECTIVE))),
            minus_sp=asdict(paired_difference(best, bests["sp"], OBJECTIVE)) if parametrization != "sp" else None,
        )
    _scan_plot(gap / "lr_scans.png", scans, width)
    knob_report = json.loads((gap / "knobs_report" / "summary.json").read_text())
    corners = {tuple(not math.isclose(p.params[k], 1.0, rel_tol=1e-6) for k in KNOBS): p
               for p in _brute_points(gap / "factorial.sqlite")}
    preset, sp = corners[False, False], bests["sp"]
    gap_at_lr = preset.loss(OBJECTIVE) - sp.loss(OBJECTIVE)
    rows = []
    for key, label in (((False, False), "preset (1, 1)"), ((True, False), "embedding LR only"),
                       ((False, True), "output mult only"), ((True, True), "both")):
        point = corners[key]
        minus_sp = asdict(paired_difference(point, sp, OBJECTIVE))
        rows.append(dict(
            label=label, **{k: point.params[k] for k in KNOBS}, loss=asdict(seed_spread(point.values(OBJECTIVE))),
            gain_over_preset=asdict(paired_difference(preset, point, OBJECTIVE)),
            share_of_gap_closed=(preset.loss(OBJECTIVE) - point.loss(OBJECTIVE)) / gap_at_lr if gap_at_lr > 0 else None,
            minus_sp=minus_sp,
            # Not worse than SP's best by more than the seed noise: the interval of the paired difference reaches 0.
            closes_gap=minus_sp["ci_low"] <= 0 if math.isfinite(minus_sp["ci_low"]) else None,
        ))
    return dict(
        width=width, scans=scans,
        knob_telescope=[dict(width=s["width"], chosen=s.get("chosen"), best_loss=s.get("best_loss"))
                        for s in knob_report["stages"]],
        factorial=dict(lr=preset.params["lr"], corners=rows),
    )


def _brute_points(path: Path):
    with ResultStore(path) as store:
        return grid_points(store.trials(kind="brute_force"))


def _scan_plot(path: Path, scans: dict, width: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for parametrization, s in scans.items():
        (line,) = ax.plot(s["lrs"], s["first_seed_loss"], marker="o", ms=3, label=parametrization)
        best = s["best"]
        interval = [[best["mean"] - best["ci_low"]], [best["ci_high"] - best["mean"]]]
        ax.errorbar([s["best_lr"]], [best["mean"]], yerr=interval, color=line.get_color(), marker="*", ms=10, capsize=4)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (muP: the width-32 model's; SP: this model's)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"width {width}: first seed per LR; star: best, mean over seeds with its interval", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def print_results(telescope: dict, batch: dict, gap: dict) -> None:
    """The numbers examples/reproduce_paper.md quotes, from the three summaries."""
    print("\n== a. telescoping ==")
    for s in telescope["stages"]:
        print(f"stage {s['stage']} width {s['width']:>4}: best {_spread(s['best_spread'])} at {_values(s['chosen'])}")
    fit = telescope["power_law"]
    print("power law of stage minima: " + ("none (fewer than 3 widths)" if fit is None else
                                           f"{fit['A']:.3g}/d^{fit['alpha']:.3f} + {fit['E']:.3f} "
                                           f"(R^2 {fit['r_squared']:.4f})"))
    for b in telescope["brute_force"]:
        difference = b["loss_difference"]
        print(f"brute force {b['points']}x{b['points']} at width {b['width']} ({b['runs']} runs: one seed per point, "
              f"{b['seeded_points']} with {b['seeds']} seeds): best {_spread(b['optimum_spread'])} at "
              f"{_values(b['optimum'])}")
        print("telescope choice is " + ", ".join(f"{k} {v:.2f}" for k, v in b["distance_in_brute_cells"].items())
              + f" brute-force cells away (within one: {b['within_one_brute_cell']}); loss difference "
              + f"{_difference(difference)}, within seed noise: {b['difference_within_seed_noise']}; brute-force "
              + "loss there " + (f"{b['brute_loss_at_telescope_choice']:.4f}" if "brute_loss_at_telescope_choice" in b
                                 else "n/a")
              + f"; telescope compute {100 * b['telescope_cost_share']:.1f}% of the brute force (width^2 units), "
              + f"{100 * b['telescope_wall_share']:.1f}% of its measured wall time")

    print("\n== b. batch size ==")
    print("chosen runs: " + ", ".join(f"{c['optimizer']}@{c['batch_tokens']}: lr {c['lr']:g}"
                                      + (f" ({c['lr_on_grid_edge']} of grid)" if c["lr_on_grid_edge"] else "")
                                      for c in batch["chosen_runs"]))
    print(f"seeds {batch['seeds']}")
    print(f"{'L':>7}  R_L(B) at B = {batch['batch_tokens']} tokens/step [CI]   R > 1 at every B   increasing (Spearman)"
          f"   B_tok A/M")
    for e in batch["per_threshold"]:
        ratios = " ".join(_interval(*v) for v in zip(e["ratio"], e["ratio_ci_low"], e["ratio_ci_high"]))
        print(f"{e['threshold']:>7.4f}  {ratios}   {e['ratio_above_1_confident']}   {e['ratio_increasing_confident']} "
              f"(rho {e['ratio_spearman']:.2f})   {e['token_optimal_batch_adamw']}/{e['token_optimal_batch_muon']}")
    print(f"thresholds with R > 1 at every B at {100 * batch['confidence']:g}%: "
          f"{_percent(batch['share_of_thresholds_with_ratio_above_1_confident'])}, increasing: "
          f"{_percent(batch['share_of_thresholds_with_ratio_increasing_confident'])}")

    print(f"\n== c. muP vs SP at width {gap['width']} (wd 1e-3) ==")
    for parametrization, s in gap["scans"].items():
        scanned = " ".join(f"{lr:.3g}:{loss:.4f}" for lr, loss in zip(s["lrs"], s["first_seed_loss"]))
        print(f"{parametrization:>15}: best {_spread(s['best'])} at lr {s['best_lr']:.4g}"
              + (" (scan edge)" if s["best_lr_on_scan_edge"] else "")
              + ("" if s["minus_sp"] is None else f", minus SP's best {_difference(s['minus_sp'])}")
              + f"; first seed lr:loss {scanned}")
    for s in gap["knob_telescope"]:
        print(f"knob telescope width {s['width']:>4}: best {s['best_loss']:.4f} at {_values(s['chosen'])}")
    factorial = gap["factorial"]
    print(f"factorial at lr {factorial['lr']:.4g} (muP essential):")
    for c in factorial["corners"]:
        print(f"{c['label']:>17} (embedding LR x{c['embedding_lr_mult']:.3g}, output x{c['output_mult']:.3g}): "
              f"{_spread(c['loss'])}; gain over the preset {_difference(c['gain_over_preset'])}"
              + ("" if c["share_of_gap_closed"] is None
                 else f", {100 * c['share_of_gap_closed']:.0f}% of the gap to SP")
              + f"; minus SP's best {_difference(c['minus_sp'])}, "
              f"closes the gap (within seed noise): {c['closes_gap']}")


def _values(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


def _spread(spread: dict) -> str:
    text = f"{spread['mean']:.4f}"
    if spread["seeds"] > 1:
        text += f" +- {spread['std']:.4f} [{spread['ci_low']:.4f}, {spread['ci_high']:.4f}]"
    return text


def _difference(spread: dict) -> str:
    text = f"{spread['mean']:+.4f}"
    if spread["seeds"] > 1 and math.isfinite(spread["ci_low"]):
        text += f" [{spread['ci_low']:+.4f}, {spread['ci_high']:+.4f}]"
    return text


def _interval(value, low, high) -> str:
    """summary.json holds NaN (no interval, or a loss some seed never reached) as NaN or null."""
    if value is None or not math.isfinite(value):
        return "  -  "
    if low is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _percent(share) -> str:
    return "n/a (one seed)" if share is None or not math.isfinite(share) else f"{100 * share:.0f}%"


if __name__ == "__main__":
    main()
