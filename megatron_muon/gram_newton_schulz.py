"""Gram Newton-Schulz: the same quintic iteration, run on the small Gram matrix instead of the rectangular iterate.

Newton-Schulz on a wide X (m x n, m <= n) applies X <- (a I + b R + c R^2) X with R = X X^T. Every factor in
front of X is a polynomial in the Gram matrix of the *starting* X, so X_t = Q_t X_0 with Q_t an m x m matrix,
and both Q_t and R_t = X_t X_t^T can be advanced without touching X:

    Z = b R + c R^2;   Q <- Q (a I + Z);   R <- (a I + Z) R (a I + Z).

Only the first Gram matrix (2 m^2 n) and the final Q X_0 (2 m^2 n) are rectangular; the steps between are
m x m products (Zhang, Amsel, Chen, Dao, "Gram Newton-Schulz", Dao AI Lab 2026). For the 4:1 MLP matrices of the
paper's models that cuts 22% of the FLOPs with two restarts; for square matrices it costs more (see
`gram_newton_schulz_flops`).

In exact arithmetic R stays positive semi-definite. In finite precision R picks up rounding errors of order
eps * ||R||, and an eigenvalue pushed below zero is not damped like a small positive one: the update multiplies
it by (a + b lambda + c lambda^2)^2 ~ a^2 (12 to 70) per step, so it grows without bound. A restart (X <- Q X,
R <- X X^T, Q <- I) rebuilds R as a Gram matrix, which removes those spurious eigenvalues at the price of two
more rectangular products. Where to restart depends on the coefficients; `GRAM_RESTARTS` holds measured choices.

Pure math: no torch.distributed, no Megatron. The GEMMs come from a `GramGemms` per iteration, so one code path
serves every precision (see newton_schulz.py, which owns the precisions and calls `gram_iterate`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

import torch

# Restart before these (0-based) iterations of a 5-step schedule, per coefficient set. Measured in fp32, bf16 and
# fp16 on inputs of aspect 2:1 to 8:1 and condition number 1e2 to 1e5, over restarts (), (1), (2), (3), (1, 3),
# (2, 4), (1, 2, 3, 4), by the largest output singular value (fp32: 1.20 / 1.14 / 1.12 for jordan / quintic /
# polar_express). Without a restart bf16 diverges (up to 5e7); one restart at (2), the published choice for
# fp16, still leaves bf16 at 1.40 / 1.27 / 2.04 (fp16: 1.22 / 1.15 / 1.17); (2, 4) matches fp32's band in every
# precision, so it is the default for all three sets.
GRAM_RESTARTS: dict[str, tuple[int, ...]] = {"jordan": (2, 4), "quintic": (2, 4), "polar_express": (2, 4)}
# Longer schedules keep restarting every this many iterations: negative eigenvalues grow like a^2 per step, so
# the stretch between restarts must not grow with the step count.
GRAM_RESTART_INTERVAL = 2


class GramGemms(Protocol):
    """The products one iteration needs, in one precision. `addmm` returns beta * c + alpha * a @ b."""

    def cast(self, t: torch.Tensor) -> torch.Tensor: ...

    def gram(self, x: torch.Tensor) -> torch.Tensor: ...

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...

    def addmm(self, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float = 1.0) -> torch.Tensor: ...


def restart_points(coefficients: str, steps: int) -> tuple[int, ...]:
    """Iterations (0-based) before which Gram Newton-Schulz rebuilds R from X, for a canonical coefficient name."""
    measured = tuple(t for t in GRAM_RESTARTS[coefficients] if t < steps)
    last = measured[-1] if measured else 0
    return measured + tuple(range(last + GRAM_RESTART_INTERVAL, steps, GRAM_RESTART_INTERVAL))


def gram_newton_schulz_flops(rows: int, cols: int, steps: int, restarts: Collection[int]) -> int:
    """Multiply-add FLOPs (2 per MAC) of Gram Newton-Schulz on one rows x cols matrix, as `gram_iterate` runs it.

    With m = min(rows, cols), n = max: 2 m^2 n for the first Gram matrix and for the final Q X, 4 m^2 n per
    restart (Q X and its Gram matrix); per iteration 2 m^3 for R^2, 2 m^3 for Q Z unless Q is the identity
    (first iteration after a (re)start), 4 m^3 for the R update unless the next iteration restarts or none follows.
    Symmetric products are counted in full: torch has no symmetric GEMM (a SYRK-style kernel would halve them).
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


def _identity_plus(z: torch.Tensor, a: float) -> torch.Tensor:
    q = z.clone()
    q.diagonal(dim1=-2, dim2=-1).add_(a)
    return q


def gram_iterate(
    x: torch.Tensor,
    schedule: Sequence[tuple[float, float, float]],
    gemms: Sequence[GramGemms],
    restarts: Collection[int],
) -> torch.Tensor:
    """Gram Newton-Schulz on a normalized wide stack x [batch, m, n] (m <= n); gemms[t] runs iteration t.

    The first Gram matrix and each restart use the GEMMs of the iteration that follows; the final Q X those
    of the last iteration. Returns the iterate in the last iteration's working dtype.
    """
    ops = gemms[0]
    x = ops.cast(x)
    r = ops.gram(x)
    q = None  # the identity, never materialized: the first iteration after a (re)start sets Q = a I + Z
    for t, ((a, b, c), ops) in enumerate(zip(schedule, gemms)):
        if t in restarts and t > 0:
            x = ops.matmul(ops.cast(q), ops.cast(x))
            r, q = ops.gram(x), None
        r = ops.cast(r)
        # R R is the one square every later product needs; Z, hence Q and R, stay polynomials in R.
        z = ops.addmm(r, r, r, beta=b, alpha=c)
        if q is None:
            q = _identity_plus(z, a)
        else:
            q = ops.cast(q)
            q = ops.addmm(q, q, z, beta=a)
        if t + 1 < len(schedule) and t + 1 not in restarts:
            rz = ops.addmm(r, r, z, beta=a)
            r = ops.addmm(rz, z, rz, beta=a)
    return ops.matmul(ops.cast(q), ops.cast(x))
