"""The number formats of Newton-Schulz's GEMMs, per iteration, and the GEMMs that run in them.

Which formats the GEMMs of each iteration use (the precision schedule) decides the rounding noise on top of what
the polynomials leave. Dense formats (fp32, bf16, fp16) are plain torch products; fp8 is row-wise scaled e4m3
through `torch._scaled_mm` or, on a GPU where installed, Transformer Engine (imported only when called). For
`torch._scaled_mm` the quantization of each operand (row amax, scale, cast) runs eagerly or as one
`torch.compile`d kernel (`fp8_quantization`).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Literal, Protocol, Union

import torch

from megatron_muon.newton_schulz.coefficients import canonical_coefficients

Precision = Literal["fp32", "bf16", "fp16", "fp8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "fp8")
# A precision name, a "low>high" / "low*k>high" schedule string, or one name per iteration.
PrecisionSpec = Union[str, Sequence[str]]
Fp8Backend = Literal["auto", "transformer_engine", "torch"]
FP8_BACKENDS: tuple[str, ...] = ("auto", "transformer_engine", "torch")
Fp8Quantization = Literal["auto", "compiled", "eager"]
FP8_QUANTIZATIONS: tuple[str, ...] = ("auto", "compiled", "eager")

# Measured on random and rank-deficient matrices: output singular values reach 27-78 (tests/test_newton_schulz.py).
FP8_UNSTABLE_COEFFICIENTS: frozenset[str] = frozenset({"polar_express"})

# FP8 iterations at the start of a "fp8>bf16" schedule, per (coefficient set, method): the most whose mean error
# against the exact polar factor stays within 1% of all-bf16's, on condition-number 1e2 inputs and on 1e3 inputs
# alike (measured by benchmarks/fp8_split.py; tests/test_newton_schulz.py re-checks on fresh inputs). One fp8 step
# is even slightly better than bf16 (its iterate stays fp32 between GEMMs); more are not, because the noise of an
# early step lands on singular values still far below 1 and is amplified by every later polynomial.
LOW_PRECISION_STEPS: dict[tuple[str, str, str], int] = {
    ("fp8", "jordan", "standard"): 2,
    ("fp8", "quintic", "standard"): 1,
    ("fp8", "jordan", "gram"): 2,
    ("fp8", "quintic", "gram"): 0,
}

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


def check_fp8_coefficients(coefficients: str, precisions: Sequence[str]) -> None:
    """Raise if any iteration of `precisions` runs fp8 with a coefficient set that diverges there."""
    if "fp8" in precisions and canonical_coefficients(coefficients) in FP8_UNSTABLE_COEFFICIENTS:
        raise ValueError(
            f"Newton-Schulz coefficient set {coefficients!r} is unstable in fp8: its first polynomials (slope up to "
            f"8 at zero) amplify e4m3 rounding noise past the stable region; use precision 'bf16' or the "
            f"'jordan' / 'quintic' sets with fp8"
        )


class Gemms(Protocol):
    """The products one iteration needs, in one precision. `addmm` returns beta * c + alpha * a @ b."""

    def cast(self, t: torch.Tensor) -> torch.Tensor: ...

    def gram(self, x: torch.Tensor) -> torch.Tensor: ...

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...

    def addmm(self, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float = 1.0) -> torch.Tensor: ...


_DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _DenseGemms:
    """fp32, bf16 or fp16 operands and iterate, fp32 accumulation; `addmm` fuses the polynomial into GEMM epilogues."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype)

    # torch.bmm, not `@`: for a stack, `x @ x.mT` goes through matmul's expand and reshape, after which the CPU
    # kernel copies the transposed operand to contiguous memory, one extra pass over X per iteration; bmm hands
    # the transposed view to BLAS as a transposed operand, as torch.optim.Muon's 2-D `X @ X.T` does.
    def gram(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, x.mT)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b)

    def addmm(self, c, a, b, beta: float, alpha: float = 1.0) -> torch.Tensor:
        return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)


def _quantize_e4m3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled e4m3 with one fp32 scale per row (t ~= fp8.float() * scale), batched over a stack.

    A left operand a is quantized as is, a right operand b as b.mT: scales per row of a and per column of b,
    the GEMM's natural row-wise scaling. One scale per tensor was measured first and diverges: a Gram matrix spans
    a wide range of magnitudes, so its small entries lose all mantissa bits, and the polynomial's slope at zero
    (3.4 to 8 per step) amplifies that noise past the stable region (output singular values up to 1e7).
    The fp8 tensor is row-major whatever t's layout (b.mT is column-major): `_scaled_mm` takes it as it is.
    """
    amax = t.abs().amax(dim=-1, keepdim=True).float()
    # A zero or subnormal row would give a zero scale and 0/0; clamping keeps every scale a normal float, and
    # the clamp below keeps a symmetric operand's near-equal row and column maxima from overflowing e4m3.
    scale = (amax / _E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (t / scale).clamp_(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn).contiguous(), scale


# Eagerly, `_quantize_e4m3` is six passes over the operand (abs, amax, divide, clamp, cast, and the copy to
# row-major for a right operand) through two fp32 temporaries; torch.compile fuses them into one kernel that
# reads the operand twice (row amax, then scale and cast) and writes only e4m3 and the scales. Built on the first
# call, with dynamic shapes: a kernel per layout (row- or column-major, a stack of one or more) serves every
# operand shape. Compiled per shape, a model's few matrix shapes (3 or 4 operand shapes each) would pass Dynamo's
# limit of 8 recompiles per function and run eagerly from then on.
_compiled_quantize = None
# Why compiling failed, once it has (no C++ compiler or Triton, an unsupported Python): from then on every call
# runs the eager function, which computes the same numbers.
_compile_failure: str | None = None


def _quantize_e4m3_compiled(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_quantize_e4m3` through torch.compile, falling back to it (with one warning) where compiling fails."""
    global _compiled_quantize, _compile_failure
    if _compile_failure is None:
        try:
            if _compiled_quantize is None:
                # fullgraph: a graph break would silently run part of the quantization eagerly, unfused.
                _compiled_quantize = torch.compile(_quantize_e4m3, dynamic=True, fullgraph=True)
            return _compiled_quantize(t)
        except Exception as e:  # whatever the compiler stack raises; the eager path below re-raises input errors
            _compile_failure = f"{type(e).__name__}: {e}"
            _log.warning("fused fp8 quantization unavailable, using the eager one: %s", _compile_failure)
    return _quantize_e4m3(t)


def _scaled_mm(qa: torch.Tensor, sa: torch.Tensor, qb_t: torch.Tensor, sb_t: torch.Tensor) -> torch.Tensor:
    """Stacked qa @ qb_t.mT with row scales sa [batch, i, 1] and sb_t [batch, j, 1] of qb_t's rows, fp32 out.

    cuBLASLt takes only a row-major left and a column-major right operand: qa and qb_t are row-major (as
    `_quantize_e4m3` returns them), so qb_t.mT is exactly the column-major [k, j] it wants, with no copy. The
    output is bf16 (the only dtype cuBLASLt's row-wise scaled FP8 GEMM writes), upcast; the CPU kernel is called
    the same way so both compute the same. torch._scaled_mm is 2-D only, hence one call per matrix of the stack.
    """
    return torch.stack([
        torch._scaled_mm(a, b.mT, scale_a=s, scale_b=t.mT, out_dtype=torch.bfloat16)
        for a, s, b, t in zip(qa, sa, qb_t, sb_t)
    ]).float()


class _Fp8Gemms:
    """e4m3 operands, fp32 accumulation, fp32 iterate between GEMMs.

    A symmetric operand's column scales equal its row scales, so X X^T and the square of a symmetric matrix
    quantize their operand once instead of twice (half the quantization traffic of a general product).
    """

    def __init__(self, backend: str, quantization: str = "eager"):
        self.backend = backend
        self.quantize = _quantize_e4m3_compiled if quantization == "compiled" else _quantize_e4m3

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "transformer_engine":
            return _te_bmm(x, x.mT)
        q, s = self.quantize(x)
        return _scaled_mm(q, s, q, s)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.backend == "transformer_engine":
            return _te_bmm(a, b)
        qa, sa = self.quantize(a)
        qb, sb = self.quantize(b.mT)
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


def fp8_quantizer(device: torch.device | str, requested: Fp8Quantization = "auto") -> str:
    """How the torch._scaled_mm backend quantizes its operands: `compiled` on a CUDA device (`auto`), else `eager`.

    On a GPU the eager quantization traffic is what benchmarks/README.md's H100 run found making fp8 slower than
    bf16; on a CPU those passes are cheap next to the GEMMs, while the first compile in a process costs 10-20 s
    (a C++ build), so CPU runs (the tests among them) ask for it explicitly. Transformer Engine quantizes in its
    own fused kernels and ignores this choice.
    """
    if requested not in FP8_QUANTIZATIONS:
        raise ValueError(f"unknown fp8_quantization {requested!r}; choose one of {list(FP8_QUANTIZATIONS)}")
    if requested == "auto":
        return "compiled" if torch.device(device).type == "cuda" else "eager"
    return requested


def gemms_for(precision: str, fp8_backend: str | None, fp8_quantization: str = "eager") -> Gemms:
    """The GEMMs of one iteration in `precision`; where fp8 runs, `fp8_backend` is `fp8_gemm_backend`'s answer
    and `fp8_quantization` `fp8_quantizer`'s."""
    if precision == "fp8":
        return _Fp8Gemms(fp8_backend, fp8_quantization)
    return _DenseGemms(_DENSE_DTYPES[precision])


def pad_for_fp8(x: torch.Tensor, fp8_backend: str) -> torch.Tensor:
    """x zero-padded to the FP8 GEMMs' alignment: zero rows and columns change no product, only its shape."""
    multiple = _TE_ALIGN if fp8_backend == "transformer_engine" else _FP8_ALIGN
    pad_rows = -x.shape[-2] % multiple
    pad_cols = -x.shape[-1] % multiple
    if pad_rows == 0 and pad_cols == 0:
        return x
    return torch.nn.functional.pad(x, (0, pad_cols, 0, pad_rows))
