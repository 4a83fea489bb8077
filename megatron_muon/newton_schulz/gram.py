"""Gram Newton-Schulz: the same quintic iteration, run on the small Gram matrix instead of the rectangular iterate;
and the choice between it and standard Newton-Schulz.

Newton-Schulz on a wide X (m x n, m <= n) applies X <- (a I + b R + c R^2) X with R = X X^T. Every factor in
front of X is a polynomial in the Gram matrix of the *starting* X, so X_t = Q_t X_0 with Q_t an m x m matrix,
and both Q_t and R_t = X_t X_t^T can be advanced without touching X:

    Z = b R + c R^2;   Q <- Q (a I + Z);   R <- (a I + Z) R (a I + Z).

Only the first Gram matrix (2 m^2 n) and the final Q X_0 (2 m^2 n) are rectangular; the steps between are
m x m products (Zhang, Amsel, Chen, Dao, "Gram Newton-Schulz", Dao AI Lab 2026). For the 4:1 MLP matrices of the
paper's models that cuts 22% of the FLOPs with two restarts; for square matrices it costs more (see
`flops.gram_newton_schulz_flops`).

In exact arithmetic R stays positive semi-definite. In finite precision R picks up rounding errors of order
eps * ||R||, and an eigenvalue pushed below zero is not damped like a small positive one: the update multiplies
it by (a + b lambda + c lambda^2)^2 ~ a^2 (12 to 70) per step, so it grows without bound. A restart (X <- Q X,
R <- X X^T, Q <- I) rebuilds R as a Gram matrix, which removes those spurious eigenvalues at the price of two
more rectangular products. Where to restart depends on the coefficients; `GRAM_RESTARTS` holds measured choices.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Literal

import torch

from megatron_muon.newton_schulz.coefficients import Coefficients, canonical_coefficients
from megatron_muon.newton_schulz.flops import gram_newton_schulz_flops, newton_schulz_flops
from megatron_muon.newton_schulz.precision import Gemms

Method = Literal["standard", "gram", "auto"]
METHODS: tuple[str, ...] = ("standard", "gram", "auto")

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

# `auto` uses Gram Newton-Schulz from this aspect ratio on. With 5 steps and restarts (2, 4) Gram costs
# 12 m^2 n + 22 m^3 FLOPs against 20 m^2 n + 10 m^3, so it breaks even at n = 1.5 m; at 3:1 it saves 17%, at
# the MLP's 4:1 22%. The margin pays for its extra small m x m GEMMs, which run further from peak than the
# rectangular ones (a projection: no GPU measurement has picked it yet). K/V (2:1) and square matrices stay standard.
GRAM_MIN_ASPECT = 3.0

_log = logging.getLogger(__name__)
_LOGGED_CHOICES: set[tuple[int, int, int, str]] = set()


def restart_points(coefficients: str, steps: int) -> tuple[int, ...]:
    """Iterations (0-based) before which Gram Newton-Schulz rebuilds R from X, for a canonical coefficient name."""
    measured = tuple(t for t in GRAM_RESTARTS[coefficients] if t < steps)
    last = measured[-1] if measured else 0
    return measured + tuple(range(last + GRAM_RESTART_INTERVAL, steps, GRAM_RESTART_INTERVAL))


def check_gram_precisions(coefficients: str, precisions: Sequence[str]) -> None:
    """Raise if fp8 runs at or after the first restart, where Gram Newton-Schulz diverges in fp8."""
    restarts = restart_points(canonical_coefficients(coefficients), len(precisions))
    if restarts and "fp8" in precisions[restarts[0]:]:
        raise ValueError(
            f"Gram Newton-Schulz runs fp8 only before its first restart (iteration {restarts[0]}): from there on "
            f"e4m3 noise in the Gram matrix gives it negative eigenvalues that grow ~a^2 per step (measured output "
            f"singular values 5-15); got precisions {precisions}"
        )


def resolve_method(method: Method, rows: int, cols: int, steps: int = 5, coefficients: str = "jordan") -> str:
    """`standard` or `gram`; `auto` picks Gram Newton-Schulz from the aspect ratio alone (see `GRAM_MIN_ASPECT`).

    Deterministic in (rows, cols): every rank resolves the same matrix the same way. `auto` logs its choice once
    per (shape, steps, coefficients) at INFO on this module's logger.
    """
    if method not in METHODS:
        raise ValueError(f"unknown Newton-Schulz method {method!r}; choose one of {list(METHODS)}")
    if method != "auto":
        return method
    short, long = min(rows, cols), max(rows, cols)
    chosen = "gram" if short > 0 and long >= GRAM_MIN_ASPECT * short else "standard"
    key = (short, long, steps, canonical_coefficients(coefficients))
    if key not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add(key)
        saved = 1 - orthogonalization_flops(rows, cols, steps, coefficients, "gram") / max(newton_schulz_flops(rows, cols, steps), 1)
        _log.info(
            "Newton-Schulz method for %dx%d (%d steps, %s): %s (aspect %.2f, threshold %.1f; Gram would save %.0f%% "
            "of the FLOPs)", rows, cols, steps, key[3], chosen, long / max(short, 1), GRAM_MIN_ASPECT, 100 * saved,
        )
    return chosen


def orthogonalization_flops(rows: int, cols: int, steps: int = 5, coefficients: str = "jordan", method: Method = "standard") -> int:
    """FLOPs of one `orthogonalize(x, steps, coefficients, method=method)` on a rows x cols matrix."""
    if resolve_method(method, rows, cols, steps, coefficients) == "gram":
        return gram_newton_schulz_flops(rows, cols, steps, restart_points(canonical_coefficients(coefficients), steps))
    return newton_schulz_flops(rows, cols, steps)


def _identity_plus(z: torch.Tensor, a: float) -> torch.Tensor:
    q = z.clone()
    q.diagonal(dim1=-2, dim2=-1).add_(a)
    return q


def gram_iterate(
    x: torch.Tensor,
    schedule: Sequence[Coefficients],
    gemms: Sequence[Gemms],
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
