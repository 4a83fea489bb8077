"""Newton-Schulz orthogonalization: an approximation of the polar factor U V^T built from matmuls only.

For G = U S V^T, Muon steps along U V^T (steepest descent under the spectral norm). An SVD is too slow on
accelerators, so X = G / ||G||_F (all singular values now in [0, 1]) is pushed through a few odd quintic
polynomials p(x) = a x + b x^3 + c x^5, each applied to every singular value at once by

    A = X X^T;  B = b A + c A A;  X <- a X + B X.

Which polynomials (the coefficient schedule) decides how close to 1 the singular values end up; which
number formats the three GEMMs use (the precision) decides the rounding noise on top. Everything here is
pure math: no torch.distributed, no Megatron, so it is testable in milliseconds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch

Coefficients = tuple[float, float, float]
Precision = Literal["fp32", "bf16", "fp8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp8")

# Keller Jordan's single quintic, tuned so that 5 steps lift tiny singular values fast while keeping all of
# them in roughly (0.7, 1.2). It never converges to exactly 1; the paper (arXiv 2505.02222, App. G) uses it.
_JORDAN: tuple[Coefficients, ...] = ((3.4445, -4.7750, 2.0315),)

# Five tuned quintics (modded-nanogpt `train_gpt_medium.py`, derivation by F. Cesista,
# https://leloykun.github.io/ponder/muon-opt-coeffs/); megatron-core's default `quintic` set. Cycled past 5 steps,
# as megatron-core does.
_QUINTIC: tuple[Coefficients, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# Polar Express (Amsel, Persson, Musco, Gower, arXiv 2505.16932, Algorithm 1): the minimax-optimal quintic for
# each step, for singular values in [1e-3, 1]. Every polynomial but the last is shrunk by a 1.01 safety factor
# (a / 1.01, b / 1.01^3, c / 1.01^5) so bf16 rounding cannot push a singular value past the stable region.
# The last one, (15 x - 10 x^3 + 3 x^5) / 8, is the classical degree-5 Newton-Schulz step, repeated after step 8.
_POLAR_EXPRESS_PUBLISHED: tuple[Coefficients, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_POLAR_EXPRESS: tuple[Coefficients, ...] = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_PUBLISHED[:-1]
) + (_POLAR_EXPRESS_PUBLISHED[-1],)


@dataclass(frozen=True)
class CoefficientSet:
    polynomials: tuple[Coefficients, ...]
    past_the_end: Literal["cycle", "repeat_last"]


COEFFICIENT_SETS: dict[str, CoefficientSet] = {
    "jordan": CoefficientSet(_JORDAN, "cycle"),
    "quintic": CoefficientSet(_QUINTIC, "cycle"),
    "polar_express": CoefficientSet(_POLAR_EXPRESS, "repeat_last"),
}
# megatron-core calls the Jordan set `simple`; accepting its name lets one flag value mean one thing everywhere.
COEFFICIENT_ALIASES: dict[str, str] = {"simple": "jordan"}

# Measured on random and rank-deficient matrices: output singular values reach 27-78 (tests/test_newton_schulz.py).
FP8_UNSTABLE_COEFFICIENTS: frozenset[str] = frozenset({"polar_express"})

NORM_EPS = 1e-7
# e4m3 holds magnitudes up to 448; scaling maps each row's (or column's) absolute max onto it.
_E4M3_MAX = 448.0
# cuBLASLt FP8 GEMMs need every dimension to be a multiple of 16; zero padding does not change the products.
_FP8_ALIGN = 16


def canonical_coefficients(name: str) -> str:
    """The registered name behind `name` (aliases resolved); ValueError naming the choices otherwise."""
    resolved = COEFFICIENT_ALIASES.get(name, name)
    if resolved not in COEFFICIENT_SETS:
        choices = sorted(COEFFICIENT_SETS) + sorted(COEFFICIENT_ALIASES)
        raise ValueError(f"unknown Newton-Schulz coefficient set {name!r}; choose one of {choices}")
    return resolved


def coefficient_schedule(name: str, steps: int) -> list[Coefficients]:
    """The (a, b, c) triple used at each of `steps` iterations."""
    if steps < 1:
        raise ValueError(f"Newton-Schulz needs at least one step, got steps={steps}")
    spec = COEFFICIENT_SETS[canonical_coefficients(name)]
    if spec.past_the_end == "cycle":
        return list(itertools.islice(itertools.cycle(spec.polynomials), steps))
    tail = [spec.polynomials[-1]] * max(0, steps - len(spec.polynomials))
    return list(spec.polynomials[:steps]) + tail


def check_precision(precision: str, device: torch.device | str = "cpu") -> None:
    """Raise before any work if `precision` is unknown or cannot run on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown Newton-Schulz precision {precision!r}; choose one of {list(PRECISIONS)}")
    if precision != "fp8":
        return
    if not (hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn")):
        raise RuntimeError(
            f"Newton-Schulz precision 'fp8' needs torch._scaled_mm and torch.float8_e4m3fn, which torch "
            f"{torch.__version__} lacks; use precision 'bf16' or upgrade torch"
        )
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(
            f"Newton-Schulz precision 'fp8' needs an FP8 tensor-core GPU (compute capability >= 8.9, e.g. H100); "
            f"{name} has {torch.cuda.get_device_capability(device)}; use precision 'bf16'"
        )


def newton_schulz_flops(rows: int, cols: int, steps: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of `steps` iterations on one rows x cols matrix.

    With m = min(rows, cols) and n = max: X X^T and B X cost 2 m^2 n each, A A costs 2 m^3.
    """
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)


def _quantize_e4m3(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled e4m3 with one fp32 scale per slice along `dim` (t ~= fp8.float() * scale).

    Scales are per row of a left operand and per column of a right operand (dim=1 and dim=0): the GEMM's
    natural row-wise scaling. One scale per tensor was measured first and diverges: a Gram matrix spans a wide
    range of magnitudes, so its small entries lose all mantissa bits, and the polynomial's slope at zero
    (3.4 to 8 per step) amplifies that noise past the stable region (output singular values up to 1e7).
    """
    amax = t.abs().amax(dim=dim, keepdim=True).float()
    # An all-zero slice would give scale 0 and 0/0 below; any positive scale represents zeros exactly.
    scale = torch.where(amax > 0, amax / _E4M3_MAX, torch.ones_like(amax))
    return (t / scale).to(torch.float8_e4m3fn), scale


def _fp8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D fp32 operands via e4m3 GEMMs with fp32 accumulation.

    The output is bf16 (upcast to fp32): cuBLASLt's row-wise scaled FP8 GEMM only writes bf16, and the CPU
    path matches it so both compute the same thing.
    """
    qa, sa = _quantize_e4m3(a, dim=1)
    qb, sb = _quantize_e4m3(b, dim=0)
    # cuBLASLt takes only row-major x column-major (the CPU kernel takes any layout, so only a GPU run
    # catches a transposed operand here).
    qa = qa.contiguous()
    qb = qb.t().contiguous().t()
    return torch._scaled_mm(qa, qb, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16).float()


def _fp8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for [batch, i, k] x [batch, k, j] fp32 stacks through e4m3 GEMMs; the result is fp32."""
    # torch._scaled_mm is 2-D only, and scales are per matrix anyway.
    return torch.stack([_fp8_matmul(ai, bi) for ai, bi in zip(a, b)])


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad_rows = -x.shape[-2] % multiple
    pad_cols = -x.shape[-1] % multiple
    if pad_rows == 0 and pad_cols == 0:
        return x
    return torch.nn.functional.pad(x, (0, pad_cols, 0, pad_rows))


@torch.no_grad()
def orthogonalize(
    x: torch.Tensor,
    steps: int = 5,
    coefficients: str = "jordan",
    precision: Precision = "fp32",
    eps: float = NORM_EPS,
) -> torch.Tensor:
    """Approximate polar factor of a matrix, or of each matrix in a stack of shape [..., m, n].

    The result has the input's shape and dtype. Every stacked matrix is normalized by its own Frobenius norm,
    so stacking same-shape matrices changes nothing but speed. `precision` chooses the GEMM operands: `fp32`;
    `bf16` (the iterate kept in bf16, fp32 accumulation, as torch.optim.Muon and megatron-core do); `fp8`
    (row-wise scaled e4m3 through torch._scaled_mm, fp32 accumulation, fp32 between GEMMs).
    """
    if x.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix or a stack of matrices [..., m, n], got shape {tuple(x.shape)}")
    check_precision(precision, x.device)
    schedule = coefficient_schedule(coefficients, steps)
    if precision == "fp8" and canonical_coefficients(coefficients) in FP8_UNSTABLE_COEFFICIENTS:
        raise ValueError(
            f"Newton-Schulz coefficient set {coefficients!r} is unstable in fp8: its first polynomials (slope up to "
            f"8 at zero) amplify e4m3 rounding noise past the stable region; use precision 'bf16' or the "
            f"'jordan' / 'quintic' sets with fp8"
        )
    rows, cols = x.shape[-2:]
    if rows == 0 or cols == 0:
        return torch.zeros_like(x)

    # One batched code path: every input becomes a [batch, m, n] stack. fp32 and bf16 iterate in that dtype
    # with each polynomial fused into GEMM epilogues (fp32 accumulation either way); fp8 keeps fp32 between GEMMs.
    X = x.float().reshape(-1, rows, cols)
    # Iterate on the wide orientation so the Gram matrix X X^T is the small side: min(m, n)^2 instead of max^2.
    transposed = rows > cols
    if transposed:
        X = X.mT
    # The norm is taken in fp32 in every precision: it sets the scale every later step depends on.
    norm = torch.linalg.matrix_norm(X, ord="fro", keepdim=True)
    X = X / (norm + eps)
    if precision == "fp8":
        X = _pad_to(X, _FP8_ALIGN)
        for a, b, c in schedule:
            A = _fp8_bmm(X, X.mT)
            B = b * A + c * _fp8_bmm(A, A)
            X = a * X + _fp8_bmm(B, X)
    else:
        X = X.to(torch.bfloat16 if precision == "bf16" else torch.float32)
        for a, b, c in schedule:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)

    if precision == "fp8":
        short, long = min(rows, cols), max(rows, cols)
        X = X[..., :short, :long]
    if transposed:
        X = X.mT
    return X.reshape(x.shape).to(x.dtype)


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
