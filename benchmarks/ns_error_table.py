"""Newton-Schulz error table on CPU: per method, precision and coefficient set, the worst relative Frobenius error
to the exact polar factor, the band of output singular values and the worst rounding distance to exact-arithmetic
(float64) Newton-Schulz, over the kinds of inputs the tests use (square, tall, wide, ragged, stacked).

Produces README.md's table "Bounds the tests hold" and benchmarks/README.md's CPU error table; the tests hold
bounds with margin above these numbers on fresh seeds. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import torch

# Runs from a bare checkout (no install, no megatron-core): the engine is pure torch.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from megatron_muon.newton_schulz import (  # noqa: E402
    COEFFICIENT_SETS, PRECISIONS, orthogonalize, polar_error, rounding_error, spectral_matrix,
)

STEPS = 5
# The shapes of tests/test_newton_schulz.py's bound tests: ragged is not a multiple of 16 (fp8's zero padding),
# stacked checks that the worst matrix of a stack counts.
SHAPES = {"square": (64, 64), "tall": (256, 64), "wide": (64, 256), "ragged": (96, 200), "stacked": (3, 48, 80)}
ALL_PRECISIONS = PRECISIONS + ("fp8>bf16",)


def measure(inputs: list[torch.Tensor], method: str, precision: str, coefficients: str) -> dict:
    """One row: worst error and rounding, widest band over `inputs`; or why orthogonalize refuses the config."""
    row = dict(method=method, precision=precision, coefficients=coefficients, inputs=len(inputs), error=None,
               sigma_min=None, sigma_max=None, rounding=None, refused=None)
    try:
        outs = [orthogonalize(x, STEPS, coefficients, precision, method=method) for x in inputs]
    except ValueError as e:
        return {**row, "refused": str(e)}
    polar = torch.tensor([[e.relative_frobenius, e.sigma_min, e.sigma_max]
                          for e in (polar_error(x, out) for x, out in zip(inputs, outs))], dtype=torch.float64)
    rounding = torch.tensor([rounding_error(x, out, STEPS, coefficients) for x, out in zip(inputs, outs)],
                            dtype=torch.float64)
    # torch's max and min propagate NaN, so a diverged input cannot hide behind a finite one.
    return {**row, "error": float(polar[:, 0].max()), "sigma_min": float(polar[:, 1].min()),
            "sigma_max": float(polar[:, 2].max()), "rounding": float(rounding.max())}


def markdown(rows: list[dict]) -> str:
    lines = ["| method | precision | coefficients | error | band | rounding |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["refused"] is not None:
            cells = ["refused", "-", "-"]
        else:
            cells = [f"{r['error']:.3f}", f"[{r['sigma_min']:.2f}, {r['sigma_max']:.2f}]", f"{r['rounding']:.2g}"]
        lines.append("| " + " | ".join([r["method"], r["precision"], r["coefficients"], *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/ns_error_table.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one input per shape and seed")
    p.add_argument("--cond", type=float, default=100.0, help="condition number of every input")
    p.add_argument("--methods", nargs="+", choices=["standard", "gram"], default=["standard", "gram"])
    p.add_argument("--precisions", nargs="+", choices=ALL_PRECISIONS, default=list(ALL_PRECISIONS))
    p.add_argument("--coefficients", nargs="+", choices=list(COEFFICIENT_SETS), default=list(COEFFICIENT_SETS))
    args = p.parse_args(argv)

    start = time.perf_counter()
    inputs = [spectral_matrix(*shape, cond=args.cond, seed=seed) for seed in args.seeds for shape in SHAPES.values()]
    rows = [measure(inputs, method, precision, coefficients)
            for method in args.methods for precision in args.precisions for coefficients in args.coefficients]
    meta = dict(steps=STEPS, cond=args.cond, seeds=args.seeds, shapes=SHAPES, torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                seconds=round(time.perf_counter() - start, 1))
    result = dict(metadata=meta, rows=rows)

    print(f"{STEPS} steps, condition number {args.cond:g}, {len(inputs)} inputs (shapes {list(SHAPES)}, seeds "
          f"{args.seeds}); worst error to U V^T, band of output singular values, worst rounding vs float64 NS\n")
    print(markdown(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({meta['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
