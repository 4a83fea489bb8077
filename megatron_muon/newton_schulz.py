"""Newton-Schulz orthogonalization: an approximation of the polar factor U V^T built from matmuls only.

For G = U S V^T, Muon steps along U V^T (steepest descent under the spectral norm). An SVD is too slow on
accelerators, so X = G / ||G||_F (all singular values now in [0, 1]) is pushed through a few odd quintic
polynomials p(x) = a x + b x^3 + c x^5, each applied to every singular value at once by

    A = X X^T;  B = b A + c A A;  X <- a X + B X.

Which polynomials (the coefficient schedule) decides how close to 1 the singular values end up; which
number formats the GEMMs of each iteration use (the precision schedule) decides the rounding noise on top;
the method (standard, or Gram Newton-Schulz on the small Gram matrix, gram_newton_schulz.py) decides the FLOPs.
Everything here is pure math: no torch.distributed, no Megatron, so it is testable in milliseconds.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch

from megatron_muon.gram_newton_schulz import GramGemms, gram_iterate, gram_newton_schulz_flops, restart_points

Coefficients = tuple[float, float, float]
Precision = Literal["fp32", "bf16", "fp16", "fp8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "fp8")
# A precision name, a "low>high" / "low*k>high" schedule string, or one name per iteration.
PrecisionSpec = Union[str, Sequence[str]]
Method = Literal["standard", "gram", "auto"]
METHODS: tuple[str, ...] = ("standard", "gram", "auto")
Fp8Backend = Literal["auto", "transformer_engine", "torch"]
FP8_BACKENDS: tuple[str, ...] = ("auto", "transformer_engine", "torch")

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

# FP8 iterations at the start of a "fp8>bf16" schedule, per (coefficient set, method): the most whose mean error
# against the exact polar factor stays within 1% of all-bf16's, on condition-number 1e2 and 1e3 inputs
# (benchmarks/README.md, "Precision schedule"; tests/test_newton_schulz.py re-checks on fresh inputs). One fp8
# step is even slightly better than bf16 (its iterate stays fp32 between GEMMs); more are not, because the noise
# of an early step lands on singular values still far below 1 and is amplified by every later polynomial.
LOW_PRECISION_STEPS: dict[tuple[str, str, str], int] = {
    ("fp8", "jordan", "standard"): 2,
    ("fp8", "quintic", "standard"): 1,
    ("fp8", "jordan", "gram"): 2,
    ("fp8", "quintic", "gram"): 0,
}

# `auto` uses Gram Newton-Schulz from this aspect ratio on. With 5 steps and restarts (2, 4) Gram costs
# 12 m^2 n + 22 m^3 FLOPs against 20 m^2 n + 10 m^3, so it breaks even at n = 1.5 m; at 3:1 it saves 17%, at
# the MLP's 4:1 22%. The margin pays for its extra small m x m GEMMs, which run further from peak than the
# rectangular ones (a projection: no GPU measurement has picked it yet). K/V (2:1) and square matrices stay standard.
GRAM_MIN_ASPECT = 3.0

NORM_EPS = 1e-7
# e4m3 holds magnitudes up to 448; scaling maps each row's (or column's) absolute max onto it.
_E4M3_MAX = 448.0
# cuBLASLt FP8 GEMMs need every dimension to be a multiple of 16; zero padding does not change the products.
_FP8_ALIGN = 16
# Transformer Engine's block-scaled FP8 quantizes 1 x 128 blocks along the reduction dimension.
_TE_ALIGN = 128
# First TE product on a device vs fp64: e4m3 operands give ~3% relative error, a wrong layout ~100%.
_TE_CHECK_TOLERANCE = 0.1
_TE_CHECKED: set[torch.device] = set()

_log = logging.getLogger(__name__)
_LOGGED_CHOICES: set[tuple[int, int, int, str]] = set()


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


def _parse_precision(precision: PrecisionSpec) -> tuple[tuple[str, int | None], ...]:
    """(name, iteration count) pairs; count None means "the rest", or for the first of two "the measured split"."""
    if not isinstance(precision, str):
        parts = tuple((name, 1) for name in precision)
    elif ">" not in precision:
        parts = ((precision, None),)
    else:
        halves = precision.split(">")
        if len(halves) != 2:
            raise ValueError(f"precision schedule {precision!r} must look like 'low>high' or 'low*k>high'")
        low, high = halves
        count = None
        if "*" in low:
            low, digits = low.split("*", 1)
            if not digits.isdigit():
                raise ValueError(f"precision schedule {precision!r}: {digits!r} after '*' is not a step count")
            count = int(digits)
        parts = ((low, count), (high, None))
    for name, _ in parts:
        if name not in PRECISIONS:
            raise ValueError(f"unknown Newton-Schulz precision {name!r}; choose one of {list(PRECISIONS)}")
    return parts


def precision_schedule(
    precision: PrecisionSpec, steps: int, coefficients: str = "jordan", method: str = "standard"
) -> tuple[str, ...]:
    """The GEMM precision of each of `steps` iterations.

    `precision` is one of `PRECISIONS` (every iteration), a sequence of them (one per iteration), or a string
    `"low>high"` / `"low*k>high"`: `low` for the first iterations, `high` for the rest. Without `*k` the split
    is the measured one for the coefficient set and resolved method (`LOW_PRECISION_STEPS`): the most
    low-precision iterations whose error against the exact polar factor stays within all-bf16's.
    """
    if steps < 1:
        raise ValueError(f"Newton-Schulz needs at least one step, got steps={steps}")
    parts = _parse_precision(precision)
    if not isinstance(precision, str):
        if len(parts) != steps:
            raise ValueError(f"precision schedule {tuple(precision)} has {len(parts)} entries for {steps} steps")
        return tuple(name for name, _ in parts)
    if len(parts) == 1:
        return (parts[0][0],) * steps
    (low, n_low), (high, _) = parts
    if n_low is None:
        key = (low, canonical_coefficients(coefficients), method)
        if key not in LOW_PRECISION_STEPS:
            raise ValueError(
                f"precision schedule {precision!r} has no measured split for coefficient set {coefficients!r} "
                f"with method {method!r}; "
                f"give the count, e.g. '{low}*2>{high}' (measured: {sorted(LOW_PRECISION_STEPS)})"
            )
        n_low = LOW_PRECISION_STEPS[key]
    n_low = min(n_low, steps)
    return (low,) * n_low + (high,) * (steps - n_low)


def check_precision(precision: PrecisionSpec, device: torch.device | str = "cpu") -> None:
    """Raise before any work if `precision` (a name or a schedule) is unknown or cannot run on `device`."""
    names = {name for name, _ in _parse_precision(precision)}
    if "fp8" not in names:
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


def orthogonalization_flops(rows: int, cols: int, steps: int = 5, coefficients: str = "jordan", method: Method = "standard") -> int:
    """FLOPs of one `orthogonalize(x, steps, coefficients, method=method)` on a rows x cols matrix."""
    if resolve_method(method, rows, cols, steps, coefficients) == "gram":
        return gram_newton_schulz_flops(rows, cols, steps, restart_points(canonical_coefficients(coefficients), steps))
    return newton_schulz_flops(rows, cols, steps)


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


# --- GEMMs per precision --------------------------------------------------------------------------------------
_DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _DenseGemms:
    """fp32, bf16 or fp16 operands and iterate, fp32 accumulation; `addmm` fuses the polynomial into GEMM epilogues."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype)

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        return x @ x.mT

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    def addmm(self, c, a, b, beta: float, alpha: float = 1.0) -> torch.Tensor:
        return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)


def _quantize_e4m3(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled e4m3 with one fp32 scale per slice along `dim` (t ~= fp8.float() * scale), batched over a stack.

    Scales are per row of a left operand and per column of a right operand (dim=-1 and dim=-2): the GEMM's
    natural row-wise scaling. One scale per tensor was measured first and diverges: a Gram matrix spans a wide
    range of magnitudes, so its small entries lose all mantissa bits, and the polynomial's slope at zero
    (3.4 to 8 per step) amplifies that noise past the stable region (output singular values up to 1e7).
    """
    amax = t.abs().amax(dim=dim, keepdim=True).float()
    # A zero or subnormal slice would give a zero scale and 0/0; clamping keeps every scale a normal float, and
    # the clamp below keeps a symmetric operand's near-equal row and column maxima from overflowing e4m3.
    scale = (amax / _E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (t / scale).clamp_(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn), scale


def _scaled_mm(qa: torch.Tensor, sa: torch.Tensor, qb_t: torch.Tensor, sb_t: torch.Tensor) -> torch.Tensor:
    """Stacked qa @ qb_t.mT with row scales sa [batch, i, 1] and sb_t [batch, j, 1] of qb_t's rows, fp32 out.

    cuBLASLt takes only a row-major left and a column-major right operand: qb_t is row-major [j, k], so qb_t.mT
    is exactly the column-major [k, j] it wants, with no copy. The output is bf16 (the only dtype cuBLASLt's
    row-wise scaled FP8 GEMM writes), upcast; the CPU kernel is called the same way so both compute the same.
    torch._scaled_mm is 2-D only, hence one call per matrix of the stack.
    """
    return torch.stack([
        torch._scaled_mm(a, b.mT, scale_a=s, scale_b=t.mT, out_dtype=torch.bfloat16)
        for a, s, b, t in zip(qa.contiguous(), sa, qb_t.contiguous(), sb_t)
    ]).float()


class _Fp8Gemms:
    """e4m3 operands, fp32 accumulation, fp32 iterate between GEMMs.

    A symmetric operand's column scales equal its row scales, so X X^T and the square of a symmetric matrix
    quantize their operand once instead of twice (half the quantization traffic of a general product).
    """

    def __init__(self, backend: str):
        self.backend = backend

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "transformer_engine":
            return _te_bmm(x, x.mT)
        q, s = _quantize_e4m3(x, dim=-1)
        return _scaled_mm(q, s, q, s)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.backend == "transformer_engine":
            return _te_bmm(a, b)
        qa, sa = _quantize_e4m3(a, dim=-1)
        qb, sb = _quantize_e4m3(b.mT, dim=-1)
        return _scaled_mm(qa, sa, qb, sb)

    def addmm(self, c, a, b, beta: float, alpha: float = 1.0) -> torch.Tensor:
        # `a is b` only ever happens for the square of a symmetric matrix (A A, R R), which is a Gram matrix.
        product = self.gram(a) if a is b else self.matmul(a, b)
        return beta * c + alpha * product


def fp8_gemm_backend(device: torch.device | str, requested: Fp8Backend = "auto") -> str:
    """`transformer_engine` on a CUDA device with Transformer Engine installed (`auto`), else `torch._scaled_mm`."""
    if requested not in FP8_BACKENDS:
        raise ValueError(f"unknown fp8_backend {requested!r}; choose one of {list(FP8_BACKENDS)}")
    device = torch.device(device)
    if requested == "torch":
        return "torch._scaled_mm"
    te_usable = device.type == "cuda" and importlib.util.find_spec("transformer_engine") is not None
    if requested == "transformer_engine" and not te_usable:
        raise RuntimeError(
            f"fp8_backend='transformer_engine' needs Transformer Engine and a CUDA device; got device {device} "
            f"with Transformer Engine {'installed' if importlib.util.find_spec('transformer_engine') else 'missing'}"
        )
    return "transformer_engine" if te_usable else "torch._scaled_mm"


def _te_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stacked a @ b through Transformer Engine's 1x128-block-scaled e4m3 GEMM (Hopper), fp32 out.

    Written against Transformer Engine 2.x internals (`general_gemm`, `Float8BlockQuantizer`), which change
    between releases; `_check_te_once` compares the first product on each device with fp32 and refuses a
    wrong result rather than training on it. TE fuses the quantization (amax, scale, cast, transpose) that the
    eager `torch._scaled_mm` path pays for separately.
    """
    import transformer_engine_torch as tex
    from transformer_engine.pytorch.cpp_extensions import general_gemm
    from transformer_engine.pytorch.module.base import get_workspace
    from transformer_engine.pytorch.tensor.float8_blockwise_tensor import Float8BlockQuantizer

    quantizer = Float8BlockQuantizer(tex.DType.kFloat8E4M3, rowwise=True, columnwise=False, block_scaling_dim=1)
    outs = []
    for ai, bi in zip(a, b):
        # "TN" computes second @ first^T with both operands row-major in the reduction dimension.
        qa = quantizer.quantize(ai.contiguous())
        qb = quantizer.quantize(bi.mT.contiguous())
        out, *_ = general_gemm(qb, qa, get_workspace(), out_dtype=torch.float32, layout="TN")
        outs.append(out)
    result = torch.stack(outs)
    _check_te_once(a, b, result)
    return result


def _check_te_once(a: torch.Tensor, b: torch.Tensor, result: torch.Tensor) -> None:
    if a.device in _TE_CHECKED:
        return
    exact = a[0].double() @ b[0].double()
    error = float((result[0].double() - exact).norm() / exact.norm().clamp_min(1e-30))
    if not error <= _TE_CHECK_TOLERANCE:
        raise RuntimeError(
            f"Transformer Engine's FP8 GEMM returned a product {error:.3g} (relative Frobenius) away from fp32 on "
            f"{a.device}, above {_TE_CHECK_TOLERANCE}: its API likely changed; use fp8_backend='torch'"
        )
    _TE_CHECKED.add(a.device)


def _gemms_for(precision: str, fp8_backend: str) -> GramGemms:
    if precision == "fp8":
        return _Fp8Gemms(fp8_backend)
    return _DenseGemms(_DENSE_DTYPES[precision])


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad_rows = -x.shape[-2] % multiple
    pad_cols = -x.shape[-1] % multiple
    if pad_rows == 0 and pad_cols == 0:
        return x
    return torch.nn.functional.pad(x, (0, pad_cols, 0, pad_rows))


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / (||x||_F + eps) per matrix, computed as y / (||y||_F + eps / amax) with y = x / amax.

    Mathematically the same; numerically the Frobenius norm of x itself overflows fp32 from entries of ~1e37
    on (and underflows to 0 below ~1e-23), while y's lies in [1, sqrt(m n)].
    """
    amax = x.abs().amax(dim=(-2, -1), keepdim=True)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    y = x / amax
    return y / (torch.linalg.matrix_norm(y, ord="fro", keepdim=True) + eps / amax)


@torch.no_grad()
def orthogonalize(
    x: torch.Tensor,
    steps: int = 5,
    coefficients: str = "jordan",
    precision: PrecisionSpec = "fp32",
    eps: float = NORM_EPS,
    *,
    method: Method = "standard",
    fp8_backend: Fp8Backend = "auto",
) -> torch.Tensor:
    """Approximate polar factor of a matrix, or of each matrix in a stack of shape [..., m, n].

    The result has the input's shape and dtype. Every stacked matrix is normalized by its own Frobenius norm,
    so stacking same-shape matrices changes nothing but speed.

    `precision` chooses the GEMMs of each iteration (see `precision_schedule`): `fp32`; `bf16` (the iterate kept
    in bf16, fp32 accumulation, as torch.optim.Muon and megatron-core do); `fp16` (the same with fp16: 3 more
    mantissa bits, same GEMM rate on tensor cores, the published Gram Newton-Schulz's choice); `fp8` (row-wise
    scaled e4m3, fp32 accumulation, fp32 between GEMMs); or a schedule such as `"fp8>bf16"`. `method`: `standard` Newton-Schulz,
    `gram` (gram_newton_schulz.py: iterate on the m x m Gram matrix), or `auto` (Gram from aspect ratio
    `GRAM_MIN_ASPECT` on). `fp8_backend`: `auto` (Transformer Engine on a CUDA device where installed, else
    torch._scaled_mm, which also runs on CPU), `transformer_engine` or `torch`.
    """
    if x.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix or a stack of matrices [..., m, n], got shape {tuple(x.shape)}")
    check_precision(precision, x.device)
    schedule = coefficient_schedule(coefficients, steps)
    name = canonical_coefficients(coefficients)
    rows, cols = x.shape[-2:]
    chosen = resolve_method(method, rows, cols, steps, name)
    precisions = precision_schedule(precision, steps, name, chosen)
    if "fp8" in precisions and name in FP8_UNSTABLE_COEFFICIENTS:
        raise ValueError(
            f"Newton-Schulz coefficient set {coefficients!r} is unstable in fp8: its first polynomials (slope up to "
            f"8 at zero) amplify e4m3 rounding noise past the stable region; use precision 'bf16' or the "
            f"'jordan' / 'quintic' sets with fp8"
        )
    restarts = restart_points(name, steps)
    if chosen == "gram" and restarts and "fp8" in precisions[restarts[0]:]:
        raise ValueError(
            f"Gram Newton-Schulz runs fp8 only before its first restart (iteration {restarts[0]}): from there on "
            f"e4m3 noise in the Gram matrix gives it negative eigenvalues that grow ~a^2 per step (measured output "
            f"singular values 5-15); got precisions {precisions}"
        )
    backend = fp8_gemm_backend(x.device, fp8_backend) if "fp8" in precisions else None
    if rows == 0 or cols == 0:
        return torch.zeros_like(x)

    # One batched code path: every input becomes a [batch, m, n] stack.
    X = x.float().reshape(-1, rows, cols)
    # Iterate on the wide orientation so the Gram matrix X X^T is the small side: min(m, n)^2 instead of max^2.
    transposed = rows > cols
    if transposed:
        X = X.mT
    # The norm is taken in fp32 in every precision: it sets the scale every later step depends on.
    X = _normalize(X, eps)
    if backend is not None:
        # Zero padding changes no product; cuBLASLt's FP8 GEMMs need multiples of 16, TE's block scaling 128.
        X = _pad_to(X, _TE_ALIGN if backend == "transformer_engine" else _FP8_ALIGN)
    gemms = [_gemms_for(p, backend) for p in precisions]
    if chosen == "gram":
        X = gram_iterate(X, schedule, gemms, restarts)
    else:
        for (a, b, c), ops in zip(schedule, gemms):
            X = ops.cast(X)
            A = ops.gram(X)
            B = ops.addmm(A, A, A, beta=b, alpha=c)
            X = ops.addmm(X, B, X, beta=a)

    X = X[..., : min(rows, cols), : max(rows, cols)]
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
