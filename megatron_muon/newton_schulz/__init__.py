"""Newton-Schulz orthogonalization, the engine behind Muon's update; pure math, no torch.distributed, no Megatron.

core.py is the iteration and `orthogonalize`, its entry point; coefficients.py the polynomial schedules;
precision.py the GEMM formats per iteration (fp32, bf16, fp16, fp8 and schedules of them); gram.py Gram
Newton-Schulz and the choice of method; flops.py what each method costs; reference.py the float64 SVD
references and the error metric the tests and benchmarks judge it by.
"""

from megatron_muon.newton_schulz.coefficients import (
    COEFFICIENT_ALIASES,
    COEFFICIENT_SETS,
    Coefficients,
    CoefficientSet,
    canonical_coefficients,
    coefficient_schedule,
)
from megatron_muon.newton_schulz.core import NORM_EPS, newton_schulz, orthogonalize
from megatron_muon.newton_schulz.flops import gram_newton_schulz_flops, newton_schulz_flops
from megatron_muon.newton_schulz.gram import (
    GRAM_MIN_ASPECT,
    GRAM_RESTART_INTERVAL,
    GRAM_RESTARTS,
    METHODS,
    Method,
    check_gram_precisions,
    gram_iterate,
    orthogonalization_flops,
    resolve_method,
    restart_points,
)
from megatron_muon.newton_schulz.precision import (
    FP8_BACKENDS,
    FP8_QUANTIZATIONS,
    FP8_UNSTABLE_COEFFICIENTS,
    LOW_PRECISION_STEPS,
    PRECISIONS,
    Fp8Backend,
    Fp8Quantization,
    Gemms,
    Precision,
    PrecisionSpec,
    check_fp8_coefficients,
    check_precision,
    fp8_gemm_backend,
    fp8_quantizer,
    precision_schedule,
)
from megatron_muon.newton_schulz.reference import (
    PolarError,
    composed_polynomial,
    orthogonalize_via_svd,
    polar_error,
    rounding_error,
    spectral_matrix,
)

__all__ = [
    "COEFFICIENT_ALIASES", "COEFFICIENT_SETS", "Coefficients", "CoefficientSet", "canonical_coefficients",
    "coefficient_schedule",
    "NORM_EPS", "newton_schulz", "orthogonalize",
    "gram_newton_schulz_flops", "newton_schulz_flops",
    "GRAM_MIN_ASPECT", "GRAM_RESTART_INTERVAL", "GRAM_RESTARTS", "METHODS", "Method", "check_gram_precisions",
    "gram_iterate", "orthogonalization_flops", "resolve_method", "restart_points",
    "FP8_BACKENDS", "FP8_QUANTIZATIONS", "FP8_UNSTABLE_COEFFICIENTS", "LOW_PRECISION_STEPS", "PRECISIONS",
    "Fp8Backend", "Fp8Quantization", "Gemms", "Precision", "PrecisionSpec", "check_fp8_coefficients",
    "check_precision", "fp8_gemm_backend", "fp8_quantizer", "precision_schedule",
    "PolarError", "composed_polynomial", "orthogonalize_via_svd", "polar_error", "rounding_error", "spectral_matrix",
]
