"""Both of the paper's methods at CPU scale, end to end: see examples/reproduce_paper.md for the results.

    python examples/reproduce_paper.py [--out results/reproduce_paper] [--parallel 2] [--parametrization mup|sp]
                                       [--seeds N]

1. Telescoping sweep (Algorithm 1) of Muon's learning rate and weight decay on tiny megatron-core GPTs,
   widths 32 -> 64 -> 128 (8x8 -> 4x4 -> 2x2), then the brute-force 8x8 grid at width 128 for comparison,
   the sweep report (surfaces, distributions, drift, power law) and the Fig. 13 economics. In muP relative to
   width 32 (the paper's setting), or in standard parametrization with `--parametrization sp`.
2. Batch-size study: Muon and AdamW at 5 global batch sizes with one token budget, three learning rates each,
   giving R_L(B), tokens and steps to loss, token-optimal batch sizes and the compute-time plane.

With --seeds N (default 1) the batch study runs every (optimizer, batch size, learning rate) N times and the
telescope's final stage and the brute-force grid every point N times, so the summary carries bootstrap intervals
over seeds and judges R_L(B) > 1, its trend, and the telescope's miss against the seed noise; N times the runs of
those parts (a separate store per N). Every step is the public command with a results store, so an interrupted
run resumes where it stopped and a finished one only regenerates the plots and the summary printed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TELESCOPE = ["--base-width", "32", "--calibration-width", "128", "--points", "8",
             "--hp", "lr=1e-3:3e-1", "--hp", "wd=1e-3:1", "--fixed", "steps=150"]
BATCH = ["--batch-sizes", "4", "8", "16", "32", "64", "--tokens", "131072", "--width", "64", "--device-unit", "512",
         "--lr", "muon=0.01,0.03,0.1", "--lr", "adamw=0.003,0.01,0.03"]
# The sweep's embedded trial is in muP relative to --base-width unless its muP base is set to 0.
PARAMETRIZATION = {"mup": [], "sp": ["--fixed", "mup_base_width=0"]}


def run(*args: str) -> None:
    print("$ python", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "reproduce_paper")
    parser.add_argument("--parallel", type=int, default=2, help="trials at a time (one CPU thread each)")
    parser.add_argument("--parametrization", choices=sorted(PARAMETRIZATION), default="mup",
                        help="of the telescoping sweep's models (the batch study is at one width)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per batch-study run and per point of the telescope's final stage and brute force")
    args = parser.parse_args()
    telescope_args = TELESCOPE + PARAMETRIZATION[args.parametrization] + ["--seeds", str(args.seeds)]
    out = args.out.resolve()
    if args.seeds > 1:  # a store belongs to one config: seeded runs get their own directory
        out = out / f"seeds{args.seeds}"
    out.mkdir(parents=True, exist_ok=True)
    store = str(out / "telescope.sqlite")
    common = ["--store", store, "--parallel", str(args.parallel), "--quiet"]

    run("-m", "megatron_muon.sweep", "plan", *telescope_args)
    run("-m", "megatron_muon.sweep", "telescope", *telescope_args, *common)
    # Its own store, so it can run beside the telescope (one runner per store).
    brute = str(out / "brute.sqlite")
    run("-m", "megatron_muon.sweep", "brute", *telescope_args, *common, "--store", brute, "--width", "128")
    run("-m", "megatron_muon.sweep", "report", "--store", store, "--brute-store", brute,
        "--out", str(out / "telescope_report"))
    run("-m", "megatron_muon.sweep", "economics", "--out", str(out / "telescope_economics.png"))
    run("-m", "megatron_muon.study", "batch", *BATCH, "--seeds", str(args.seeds),
        "--store", str(out / "batch_study.sqlite"), "--out", str(out / "batch_study"), "--parallel", str(args.parallel),
        "--quiet")

    print_results(json.loads((out / "telescope_report" / "summary.json").read_text()),
                  json.loads((out / "batch_study" / "summary.json").read_text()))


def print_results(telescope: dict, batch: dict) -> None:
    """The numbers examples/reproduce_paper.md quotes, from the two summary.json files."""
    print("\n== telescoping ==")
    for s in telescope["stages"]:
        print(f"stage {s['stage']} width {s['width']:>4}: best {_spread(s['best_spread'])} at "
              + ", ".join(f"{k}={v:.4g}" for k, v in s["chosen"].items()))
    fit = telescope["power_law"]
    print(f"power law of stage minima: {fit['A']:.3g}/d^{fit['alpha']:.3f} + {fit['E']:.3f} (R^2 {fit['r_squared']:.4f})")
    for b in telescope["brute_force"]:
        print(f"brute force {b['points']}x{b['points']} at width {b['width']}: best {_spread(b['optimum_spread'])} at "
              + ", ".join(f"{k}={v:.4g}" for k, v in b["optimum"].items()))
        difference = b["loss_difference"]
        noise = ("one seed, no noise estimate" if b["difference_within_seed_noise"] is None else
                 f"[{difference['ci_low']:+.4f}, {difference['ci_high']:+.4f}], within seed noise: "
                 f"{b['difference_within_seed_noise']}")
        print("telescope choice is " + ", ".join(f"{k} {v:.2f}" for k, v in b["distance_in_brute_cells"].items())
              + f" brute-force cells away (within one: {b['within_one_brute_cell']}); loss difference "
              + f"{difference['mean']:+.4f} ({noise}); brute-force loss there "
              + (f"{b['brute_loss_at_telescope_choice']:.4f}" if "brute_loss_at_telescope_choice" in b else "n/a")
              + f"; telescope compute {100 * b['telescope_cost_share']:.1f}% of the brute force (width^2 units), "
              + f"{100 * b['telescope_wall_share']:.1f}% of its measured wall time")
    print("\n== batch size ==")
    print("chosen runs: " + ", ".join(f"{c['optimizer']}@{c['batch_tokens']}: lr {c['lr']:g}"
                                      + (f" ({c['lr_on_grid_edge']} of grid)" if c["lr_on_grid_edge"] else "")
                                      for c in batch["chosen_runs"]))
    print(f"seeds {batch['seeds']}" + ("" if len(batch["seeds"]) > 1 else " (one seed: no intervals, no verdicts)"))
    print(f"{'L':>7}  R_L(B) at B = {batch['batch_tokens']} tokens/step [CI]   R > 1 at every B   increasing (Spearman)"
          f"   B_tok A/M")
    for e in batch["per_threshold"]:
        ratios = " ".join(_interval(*v) for v in zip(e["ratio"], e["ratio_ci_low"], e["ratio_ci_high"]))
        print(f"{e['threshold']:>7.4f}  {ratios}   {e['ratio_above_1_confident']}   {e['ratio_increasing_confident']} "
              f"(rho {e['ratio_spearman']:.2f})   {e['token_optimal_batch_adamw']}/{e['token_optimal_batch_muon']}")
    print(f"thresholds with R > 1 at every B at {100 * batch['confidence']:g}%: "
          f"{_percent(batch['share_of_thresholds_with_ratio_above_1_confident'])}, increasing: "
          f"{_percent(batch['share_of_thresholds_with_ratio_increasing_confident'])}")


def _spread(spread: dict) -> str:
    text = f"{spread['mean']:.4f}"
    if spread["seeds"] > 1:
        text += f" +- {spread['std']:.4f} [{spread['ci_low']:.4f}, {spread['ci_high']:.4f}]"
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
