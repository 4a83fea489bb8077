"""Newton-Schulz orthogonalization: an approximation of the polar factor U V^T built from matmuls only.

For G = U S V^T, Muon steps along U V^T (steepest descent under the spectral norm). An SVD is too slow on
accelerators, so X = G / ||G||_F (all singular values now in [0, 1]) is pushed through a few odd quintic
polynomials p(x) = a x + b x^3 + c x^5, each applied to every singular value at once by

    A = X X^T;  B = b A + c A A;  X <- a X + B X.

Which polynomials (coefficients.py) decides how close to 1 the singular values end up; which number formats the
GEMMs of each iteration use (precision.py) decides the rounding noise on top; the method (this loop, or Gram
Newton-Schulz on the small Gram matrix, gram.py) decides the FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_muon.newton_schulz.coefficients import Coefficients, canonical_coefficients, coefficient_schedule
from megatron_muon.newton_schulz.gram import Method, check_gram_precisions, gram_iterate, resolve_method, restart_points
from megatron_muon.newton_schulz.precision import (
    Fp8Backend, Fp8Quantization, Gemms, PrecisionSpec, check_fp8_coefficients, check_precision, fp8_gemm_backend,
    fp8_quantizer, gemms_for, pad_for_fp8, precision_schedule,
)

NORM_EPS = 1e-7


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / (||x||_F + eps) per matrix, computed as y / (||y||_F + eps / amax) with y = x / amax.

    Mathematically the same; numerically the Frobenius norm of x itself overflows fp32 from entries of ~1e37
    on (and underflows to 0 below ~1e-23), while y's lies in [1, sqrt(m n)].
    """
    # max |x| as max(max x, -min x): two reductions over x and no |x| temporary of its size.
    dims = (-2, -1)
    amax = torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg_())
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    y = x / amax
    # y is a fresh tensor, so the second division runs in place: no third m x n buffer.
    return y.div_(torch.linalg.matrix_norm(y, ord="fro", keepdim=True) + eps / amax)


def newton_schulz(X: torch.Tensor, schedule: Sequence[Coefficients], gemms: Sequence[Gemms]) -> torch.Tensor:
    """Standard Newton-Schulz on a normalized wide stack X [batch, m, n] (m <= n); gemms[t] runs iteration t."""
    for (a, b, c), ops in zip(schedule, gemms):
        X = ops.cast(X)
        # p(X) = a X + b (X X^T) X + c (X X^T)^2 X: every odd power goes through the small m x m matrix A.
        A = ops.gram(X)
        # b A + c A A and a X + B X as multiply-adds: the polynomial's sums ride in GEMM epilogues, not extra passes.
        B = ops.addmm(A, A, A, beta=b, alpha=c)
        X = ops.addmm(X, B, X, beta=a)
    return X


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
    fp8_quantization: Fp8Quantization = "auto",
) -> torch.Tensor:
    """Approximate polar factor of a matrix, or of each matrix in a stack of shape [..., m, n].

    The result has the input's shape and dtype. Every stacked matrix is normalized by its own Frobenius norm,
    so stacking same-shape matrices changes nothing but speed.

    `precision` chooses the GEMMs of each iteration (see `precision_schedule`): `fp32`; `bf16` (the iterate kept
    in bf16, fp32 accumulation, as torch.optim.Muon and megatron-core do); `fp16` (the same with fp16: 3 more
    mantissa bits, same GEMM rate on tensor cores, the published Gram Newton-Schulz's choice); `fp8` (row-wise
    scaled e4m3, fp32 accumulation, fp32 between GEMMs); or a schedule such as `"fp8>bf16"`. `method`: `standard`
    Newton-Schulz, `gram` (gram.py: iterate on the m x m Gram matrix), or `auto` (Gram from aspect ratio
    `GRAM_MIN_ASPECT` on). `fp8_backend`: `auto` (Transformer Engine on a CUDA device where installed, else
    torch._scaled_mm, which also runs on CPU), `transformer_engine` or `torch`. `fp8_quantization`, for the
    torch._scaled_mm backend: `auto` (`compiled` on a CUDA device, else `eager`), `compiled` (each operand's row
    amax, scale and cast fused by torch.compile, built on first use; the same numbers as eager on CPU, and eager
    where compiling fails) or `eager`.
    """
    if x.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix or a stack of matrices [..., m, n], got shape {tuple(x.shape)}")
    # Every refusal comes before any work, so a bad configuration fails at its first step, not mid-training.
    check_precision(precision, x.device)
    schedule = coefficient_schedule(coefficients, steps)
    name = canonical_coefficients(coefficients)
    rows, cols = x.shape[-2:]
    chosen = resolve_method(method, rows, cols, steps, name)
    precisions = precision_schedule(precision, steps, name, chosen)
    check_fp8_coefficients(coefficients, precisions)
    if chosen == "gram":
        check_gram_precisions(name, precisions)
    backend = fp8_gemm_backend(x.device, fp8_backend) if "fp8" in precisions else None
    quantization = fp8_quantizer(x.device, fp8_quantization)
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
        X = pad_for_fp8(X, backend)
    gemms = [gemms_for(p, backend, quantization) for p in precisions]
    if chosen == "gram":
        X = gram_iterate(X, schedule, gemms, restart_points(name, steps))
    else:
        X = newton_schulz(X, schedule, gemms)

    # Drops the fp8 zero padding (a no-op otherwise) before undoing the transpose.
    X = X[..., : min(rows, cols), : max(rows, cols)]
    if transposed:
        X = X.mT
    return X.reshape(x.shape).to(x.dtype)
