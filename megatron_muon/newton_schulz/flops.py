"""Hand counts of the multiply-add FLOPs (2 per MAC) each method runs, as its code runs it.

They feed the planner's load balance and `auto`'s method choice, so they count the GEMMs the code issues, not an
ideal: symmetric products in full (torch has no symmetric GEMM; a SYRK-style kernel would halve them), fp8 zero
padding not at all.
"""

from __future__ import annotations

from collections.abc import Collection


def newton_schulz_flops(rows: int, cols: int, steps: int) -> int:
    """FLOPs of `steps` standard iterations on one rows x cols matrix.

    With m = min(rows, cols) and n = max: X X^T and B X cost 2 m^2 n each, A A costs 2 m^3.
    """
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)


def gram_newton_schulz_flops(rows: int, cols: int, steps: int, restarts: Collection[int]) -> int:
    """FLOPs of Gram Newton-Schulz on one rows x cols matrix, as `gram.gram_iterate` runs it.

    With m = min(rows, cols), n = max: 2 m^2 n for the first Gram matrix and for the final Q X, 4 m^2 n per
    restart (Q X and its Gram matrix); per iteration 2 m^3 for R^2, 2 m^3 for Q Z unless Q is the identity
    (first iteration after a (re)start), 4 m^3 for the R update unless the next iteration restarts or none follows.
    """
    m, n = min(rows, cols), max(rows, cols)
    restarts = {t for t in restarts if 0 < t < steps}
    rectangular = 2 * m * m * n * (2 + 2 * len(restarts))
    square = 0
    for t in range(steps):
        square += 2 * m**3
        if t != 0 and t not in restarts:
            square += 2 * m**3
        if t + 1 < steps and t + 1 not in restarts:
            square += 4 * m**3
    return rectangular + square
