"""The measurement behind LOW_PRECISION_STEPS: how many leading fp8 iterations a "fp8>bf16" schedule may run.

For each coefficient set, method and condition number (1e2 and 1e3), and k = 0..steps, the mean relative
Frobenius error to the exact polar factor of "fp8*k>bf16" (k = 0 is all-bf16). The split at one condition number
is the largest k before the first one whose error exceeds all-bf16's by more than the tolerance (1%) or that
orthogonalize refuses (Gram Newton-Schulz runs fp8 only before its first restart); the split is the smallest over
condition numbers, since it must hold on each. Compared with the constant in
megatron_muon/newton_schulz/precision.py; a mismatch is reported, never written back. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

# Runs from a bare checkout (no install, no megatron-core): the engine is pure torch.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from megatron_muon.newton_schulz import (  # noqa: E402
    COEFFICIENT_SETS, FP8_UNSTABLE_COEFFICIENTS, LOW_PRECISION_STEPS, orthogonalize, polar_error, spectral_matrix,
)

STABLE_IN_FP8 = [name for name in COEFFICIENT_SETS if name not in FP8_UNSTABLE_COEFFICIENTS]
# The shapes tests/test_newton_schulz.py re-checks the split on: a wide 2.5:1 matrix and a square one.
SHAPES = {"wide": (64, 160), "square": (96, 96)}


def mean_error(inputs: list[torch.Tensor], steps: int, k: int, coefficients: str, method: str) -> float | None:
    """Mean polar error of "fp8*k>bf16" over `inputs`, or None where orthogonalize refuses the schedule."""
    try:
        outs = [orthogonalize(x, steps, coefficients, f"fp8*{k}>bf16", method=method) for x in inputs]
    except ValueError:
        return None
    return sum(polar_error(x, out).relative_frobenius for x, out in zip(inputs, outs)) / len(inputs)


def split(errors: list[float | None], tolerance: float) -> int:
    """The largest k such that every schedule with 0..k fp8 iterations runs within (1 + tolerance) x all-bf16."""
    limit = (1 + tolerance) * errors[0]
    for k, error in enumerate(errors):
        if error is None or not error <= limit:
            return k - 1
    return len(errors) - 1


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/fp8_split.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="one input per shape, cond, seed")
    p.add_argument("--conds", type=float, nargs="+", default=[1e2, 1e3], help="condition numbers of the inputs")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tolerance", type=float, default=0.01, help="allowed relative excess over all-bf16's error")
    p.add_argument("--methods", nargs="+", choices=["standard", "gram"], default=["standard", "gram"])
    p.add_argument("--coefficients", nargs="+", choices=STABLE_IN_FP8, default=STABLE_IN_FP8)
    args = p.parse_args(argv)

    start = time.perf_counter()
    ks = range(args.steps + 1)
    inputs = {cond: [spectral_matrix(*shape, cond=cond, seed=seed) for seed in args.seeds for shape in SHAPES.values()]
              for cond in args.conds}
    rows = []
    for method in args.methods:
        for coefficients in args.coefficients:
            per_cond = []
            for cond in args.conds:
                errors = [mean_error(inputs[cond], args.steps, k, coefficients, method) for k in ks]
                per_cond.append(dict(cond=cond, errors=errors, split=split(errors, args.tolerance)))
            chosen = min(c["split"] for c in per_cond)
            current = LOW_PRECISION_STEPS.get(("fp8", coefficients, method))
            rows.append(dict(coefficients=coefficients, method=method, conds=per_cond, chosen=chosen,
                             low_precision_steps=current, matches=chosen == current))
    meta = dict(steps=args.steps, tolerance=args.tolerance, conds=args.conds, seeds=args.seeds, shapes=SHAPES,
                inputs_per_cond=len(args.seeds) * len(SHAPES), torch=torch.__version__,
                seconds=round(time.perf_counter() - start, 1))
    result = dict(metadata=meta, rows=rows, matches=all(r["matches"] for r in rows))

    print(f"Mean error to U V^T of fp8*k>bf16 over {meta['inputs_per_cond']} inputs per condition number (shapes "
          f"{list(SHAPES)}, seeds {args.seeds}); split: the most fp8 iterations within {100 * args.tolerance:g}% of "
          f"all-bf16 (k = 0)\n")
    print("| coefficients, method | cond | " + " | ".join(f"k={k}" for k in ks) + " | split |")
    print("|---|---|" + "---|" * (len(ks) + 1))
    for r in rows:
        for c in r["conds"]:
            cells = ["refused" if e is None else f"{e:.4f}" for e in c["errors"]]
            print(f"| {r['coefficients']}, {r['method']} | {c['cond']:g} | " + " | ".join(cells) + f" | {c['split']} |")
    print("\n| coefficients, method | split (smallest over conds) | LOW_PRECISION_STEPS |\n|---|---|---|")
    for r in rows:
        note = "" if r["matches"] else " (differs)"
        print(f"| {r['coefficients']}, {r['method']} | {r['chosen']} | {r['low_precision_steps']}{note} |")
    print(f"\nreproduces LOW_PRECISION_STEPS: {'yes' if result['matches'] else 'NO'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
