"""Float64 SVD references for `orthogonalize`, kept independent of its GEMM code so that they can judge it, and
the inputs they judge it on (the tests and benchmarks/ns_error_table.py, benchmarks/fp8_split.py share them).

Two references, two questions: the exact polar factor U V^T (how far do a few steps of a schedule get?) and the
schedule's polynomial applied to exact singular values (what is left is rounding error alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_muon.newton_schulz.coefficients import coefficient_schedule
from megatron_muon.newton_schulz.core import NORM_EPS


def spectral_matrix(*shape: int, cond: float = 100.0, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    """Random U diag(s) V^T with singular values log-spaced over [1/cond, 1] (gradient-like decay), fp32."""
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    r = rank or min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, r, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)
    return ((U * s) @ V.mT).float()


def composed_polynomial(sigma: torch.Tensor, steps: int = 5, coefficients: str = "jordan") -> torch.Tensor:
    """What exact-arithmetic Newton-Schulz does to each (already normalized) singular value."""
    for a, b, c in coefficient_schedule(coefficients, steps):
        s2 = sigma * sigma
        sigma = sigma * (a + s2 * (b + c * s2))
    return sigma


@torch.no_grad()
def orthogonalize_via_svd(
    x: torch.Tensor, steps: int = 5, coefficients: str = "jordan", eps: float = NORM_EPS
) -> torch.Tensor:
    """Independent float64 reference of `orthogonalize`: U p(S / (||x||_F + eps)) V^T from an SVD."""
    x64 = x.double()
    U, S, Vh = torch.linalg.svd(x64, full_matrices=False)
    norm = torch.linalg.matrix_norm(x64, ord="fro")[..., None]
    P = composed_polynomial(S / (norm + eps), steps, coefficients)
    return (U * P[..., None, :]) @ Vh


def rounding_error(x: torch.Tensor, out: torch.Tensor, steps: int = 5, coefficients: str = "jordan") -> float:
    """||out - orthogonalize_via_svd(x)||_F / ||orthogonalize_via_svd(x)||_F over the whole stack: rounding alone."""
    exact = orthogonalize_via_svd(x, steps, coefficients)
    return float((out.double() - exact).norm() / exact.norm())


@dataclass(frozen=True)
class PolarError:
    """How far an orthogonalization `out` of `x` is from the exact polar factor of `x`.

    `relative_frobenius` = ||out - U V^T||_F / ||U V^T||_F with U, V spanning the numerically non-zero singular
    values of x (on the null space the exact answer is 0, and Newton-Schulz gives 0 there too).
    `sigma_min` / `sigma_max` bound the singular values of `out` on that range: the band Muon's update lives in.
    For a stack, the worst matrix counts. NaN anywhere makes every field NaN, so `err <= bound` fails.
    """

    relative_frobenius: float
    sigma_min: float
    sigma_max: float


@torch.no_grad()
def polar_error(x: torch.Tensor, out: torch.Tensor, rank_rtol: float = 1e-6) -> PolarError:
    x64 = x.double().reshape(-1, *x.shape[-2:])
    o64 = out.double().reshape(-1, *out.shape[-2:])
    if not torch.isfinite(o64).all():
        return PolarError(math.nan, math.nan, math.nan)
    worst_err, lo, hi = 0.0, math.inf, 0.0
    for xi, oi in zip(x64, o64):
        U, S, Vh = torch.linalg.svd(xi, full_matrices=False)
        rank = int((S > S[0] * rank_rtol).sum()) if S.numel() and S[0] > 0 else 0
        if rank == 0:
            worst_err = max(worst_err, float(torch.linalg.matrix_norm(oi)))
            continue
        Ur, Vr = U[:, :rank], Vh[:rank]
        polar = Ur @ Vr
        worst_err = max(worst_err, float(torch.linalg.matrix_norm(oi - polar) / math.sqrt(rank)))
        # Singular values of out restricted to x's range: those of Ur^T out Vr^T.
        band = torch.linalg.svdvals(Ur.mT @ oi @ Vr.mT)
        lo, hi = min(lo, float(band.min())), max(hi, float(band.max()))
    return PolarError(worst_err, lo if lo != math.inf else 0.0, hi)
