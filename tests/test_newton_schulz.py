"""orthogonalize against independent references: the SVD polar factor, and the same polynomial applied to the
singular values of an SVD in float64 (which isolates rounding error from the polynomial's own bias)."""

import pytest
import torch

from megatron_muon import newton_schulz as ns
from megatron_muon.newton_schulz import precision as ns_precision
from megatron_muon.newton_schulz import (
    coefficient_schedule,
    newton_schulz_flops,
    orthogonalize,
    orthogonalize_via_svd,
    polar_error,
    rounding_error,
    spectral_matrix,
)

SETS = ("jordan", "quintic", "polar_express")

# Stated bounds, measured with margin on condition-number-100 inputs (3 seeds, square, tall, wide):
# max relative Frobenius error vs the exact polar factor, and the band of output singular values.
POLAR_BOUNDS = {  # (precision, coefficients): (max error, band low, band high)
    ("fp32", "jordan"): (0.25, 0.65, 1.23),
    ("fp32", "quintic"): (0.07, 0.95, 1.17),
    ("fp32", "polar_express"): (0.11, 0.85, 1.15),
    ("bf16", "jordan"): (0.25, 0.65, 1.23),
    ("bf16", "quintic"): (0.07, 0.95, 1.17),
    ("bf16", "polar_express"): (0.11, 0.85, 1.15),
    ("fp8", "jordan"): (0.30, 0.60, 1.27),
    ("fp8", "quintic"): (0.16, 0.90, 1.20),
    # fp16: measured 0.194 / 0.048 / 0.089, band as fp32's to 3 digits.
    ("fp16", "jordan"): (0.25, 0.65, 1.23),
    ("fp16", "quintic"): (0.07, 0.95, 1.17),
    ("fp16", "polar_express"): (0.11, 0.85, 1.15),
    # The measured fp8>bf16 split holds bf16's bounds (measured 0.196 / 0.051).
    ("fp8>bf16", "jordan"): (0.25, 0.65, 1.23),
    ("fp8>bf16", "quintic"): (0.07, 0.95, 1.17),
}
# Max relative Frobenius distance from exact-arithmetic Newton-Schulz (same polynomial, float64 SVD).
# Measured: fp16 0.0036, fp8>bf16 0.041 (bf16 0.029, fp8 0.134).
ROUNDING_BOUNDS = {"fp32": 1e-4, "bf16": 0.04, "fp16": 0.01, "fp8": 0.17, "fp8>bf16": 0.06}
# Condition number 1e4: 5 steps cannot lift the smallest singular values, so only rounding is bounded there.
# Measured over square / tall / wide / ragged / stacked inputs: fp32 < 5e-5, bf16 0.18, fp16 0.022, fp8 0.154,
# fp8>bf16 0.116 (largest output singular value as at condition number 100).
ILL_CONDITIONED_ROUNDING = {"fp32": 1e-3, "bf16": 0.22, "fp16": 0.03, "fp8": 0.19, "fp8>bf16": 0.15}

SHAPES = {
    "square": (64, 64),
    "tall": (256, 64),
    "wide": (64, 256),
    "ragged": (96, 200),  # not a multiple of 16: exercises the fp8 zero padding
    "stacked": (3, 48, 80),
    "stacked4d": (2, 2, 40, 24),
}


# --- coefficient schedules -----------------------------------------------------------------------------------
def test_jordan_schedule_is_the_papers_and_megatrons_simple():
    assert coefficient_schedule("jordan", 5) == [(3.4445, -4.7750, 2.0315)] * 5
    assert coefficient_schedule("simple", 7) == coefficient_schedule("jordan", 7)


def test_quintic_cycles_and_polar_express_repeats_its_last_polynomial():
    quintic = coefficient_schedule("quintic", 7)
    assert quintic[5:] == quintic[:2] and len(set(quintic[:5])) == 5
    pe = coefficient_schedule("polar_express", 10)
    assert pe[7:] == [(1.875, -1.25, 0.375)] * 3
    a, b, c = pe[0]  # the published first polynomial shrunk by the 1.01 safety factor
    assert (a * 1.01, b * 1.01**3, c * 1.01**5) == pytest.approx((8.28721201814563, -23.595886519098837, 17.300387312530933))


def test_every_schedule_maps_one_close_to_one():
    # A polynomial sequence for orthogonalization must keep an already-orthogonal input near orthogonal.
    for name in SETS:
        value = float(ns.composed_polynomial(torch.tensor(1.0, dtype=torch.float64), 5, name))
        assert 0.65 < value < 1.25, name


@pytest.mark.parametrize("bad", ["cubic", "Jordan", ""])
def test_unknown_coefficient_set_is_an_error(bad):
    with pytest.raises(ValueError, match="unknown Newton-Schulz coefficient set"):
        orthogonalize(torch.randn(8, 8), coefficients=bad)


def test_zero_steps_is_an_error():
    with pytest.raises(ValueError, match="at least one step"):
        orthogonalize(torch.randn(8, 8), steps=0)


# --- fp32 is the polynomial, exactly ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("coefficients", SETS)
def test_fp32_equals_the_polynomial_applied_to_singular_values(shape, coefficients):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    out = orthogonalize(x, 5, coefficients, "fp32")
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rounding_error(x, out, 5, coefficients) <= ROUNDING_BOUNDS["fp32"]


def test_stack_equals_each_matrix_alone():
    x = torch.randn(4, 32, 48) * torch.tensor([1e-3, 1.0, 10.0, 1e4]).view(4, 1, 1)
    stacked = orthogonalize(x)
    for i in range(4):
        torch.testing.assert_close(stacked[i], orthogonalize(x[i]), rtol=1e-5, atol=1e-6)


def test_transpose_symmetry():
    x = torch.randn(40, 72)
    torch.testing.assert_close(orthogonalize(x.T), orthogonalize(x).T, rtol=1e-5, atol=1e-6)


# --- quality against the exact polar factor, per precision ---------------------------------------------------
@pytest.mark.parametrize("precision,coefficients", POLAR_BOUNDS.keys())
@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256), (96, 200), (3, 48, 80)])
def test_polar_error_within_stated_bound(precision, coefficients, shape):
    max_err, low, high = POLAR_BOUNDS[precision, coefficients]
    for seed in (11, 12):  # fresh inputs, not the ones the bounds were measured on
        x = spectral_matrix(*shape, seed=seed)
        out = orthogonalize(x, 5, coefficients, precision)
        err = polar_error(x, out)
        assert err.relative_frobenius <= max_err
        assert low <= err.sigma_min and err.sigma_max <= high
        assert rounding_error(x, out, 5, coefficients) <= ROUNDING_BOUNDS[precision]


# Rounding noise that lands in the null space of a rank-deficient input is amplified like a tiny singular value
# (slope ~4 per step at zero, ~1000x over 5 steps), so low precisions leak a fixed fraction of the update there.
# Measured on rank-20 80 x 120 inputs: fp32 1e-5, bf16 0.17 (iterate kept in bf16), fp16 0.022, fp8 0.17.
NULL_SPACE_LEAK = {"fp32": 1e-4, "bf16": 0.20, "fp16": 0.03, "fp8": 0.20}


@pytest.mark.parametrize("precision", ns.PRECISIONS)
def test_rank_deficient_input(precision):
    x = spectral_matrix(80, 120, rank=20, seed=13)
    out = orthogonalize(x, 5, "quintic", precision).double()
    U, _, Vh = torch.linalg.svd(x.double())
    Ur, Vr = U[:, :20], Vh[:20]
    in_range = Ur @ (Ur.T @ out @ Vr.T) @ Vr
    max_err, low, high = POLAR_BOUNDS[precision, "quintic"]
    err = polar_error(x, in_range)
    assert err.relative_frobenius <= max_err and low <= err.sigma_min and err.sigma_max <= high
    assert float((out - in_range).norm() / out.norm()) <= NULL_SPACE_LEAK[precision]


@pytest.mark.parametrize("precision", ns.PRECISIONS + ("fp8>bf16",))
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-12])
def test_zero_and_tiny_norm_inputs_stay_finite_and_follow_the_eps_rule(precision, scale):
    x = torch.randn(32, 48) * scale
    out = orthogonalize(x, 5, "jordan", precision)
    assert torch.isfinite(out).all()
    # X / (||X|| + 1e-7) for ||X|| << 1e-7 is tiny, so the update is tiny, exactly as the paper's formula says.
    exact = orthogonalize_via_svd(x, 5, "jordan")
    # fp16's smallest subnormal is 6e-8: an iterate of ~1e-23 flushes to an all-zero update, off by all of it.
    bound = 1.0 if precision == "fp16" and 0 < scale < 1e-20 else ROUNDING_BOUNDS[precision]
    assert float((out.double() - exact).norm()) <= bound * max(float(exact.norm()), 1e-30)


@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("precision", ns.PRECISIONS + ("fp8>bf16",))
@pytest.mark.parametrize("scale", [1e30, 1e37])
def test_huge_norm_inputs_stay_finite_and_within_rounding(method, precision, scale):
    # ||x||_F of 1e37-sized entries overflows fp32; normalizing by the largest entry first keeps it finite.
    if method == "gram" and precision == "fp8":
        pytest.skip("Gram Newton-Schulz refuses fp8 after its restart (tested in test_gram_newton_schulz.py)")
    x = spectral_matrix(32, 96, seed=3) * scale
    out = orthogonalize(x, 5, "jordan", precision, method=method)
    assert torch.isfinite(out).all()
    assert rounding_error(x, out, 5, "jordan") <= ROUNDING_BOUNDS[precision]


@pytest.mark.parametrize("precision", ns.PRECISIONS + ("fp8>bf16",))
@pytest.mark.parametrize("coefficients", SETS)
def test_ill_conditioned_inputs_stay_in_band_and_within_rounding(precision, coefficients):
    if "fp8" in precision and coefficients in ns.FP8_UNSTABLE_COEFFICIENTS:
        pytest.skip("refused in fp8")
    for shape, seed in (((96, 200), 21), ((3, 48, 80), 22)):
        x = spectral_matrix(*shape, cond=1e4, seed=seed)
        out = orthogonalize(x, 5, coefficients, precision)
        assert torch.isfinite(out).all()
        assert polar_error(x, out).sigma_max <= POLAR_BOUNDS[precision, coefficients][2]
        assert rounding_error(x, out, 5, coefficients) <= ILL_CONDITIONED_ROUNDING[precision]


def test_nan_input_never_passes_a_quality_check():
    x = torch.randn(16, 24)
    x[3, 5] = float("nan")
    err = polar_error(x.nan_to_num(), orthogonalize(x))
    assert not err.relative_frobenius <= 1.0
    assert not err.sigma_max <= 10.0


def test_polar_error_of_the_exact_polar_factor_is_zero():
    x = spectral_matrix(30, 50, seed=1)
    U, _, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    err = polar_error(x, U @ Vh)
    assert err.relative_frobenius < 1e-12
    assert err.sigma_min == pytest.approx(1.0) and err.sigma_max == pytest.approx(1.0)


def test_bf16_input_keeps_its_dtype():
    out = orthogonalize(torch.randn(16, 32, dtype=torch.bfloat16), precision="bf16")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# --- errors, not silent fallbacks --------------------------------------------------------------------------------
def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="unknown Newton-Schulz precision 'int8'"):
        orthogonalize(torch.randn(8, 8), precision="int8")


def test_fp8_with_polar_express_is_refused():
    with pytest.raises(ValueError, match="unstable in fp8"):
        orthogonalize(torch.randn(32, 32), coefficients="polar_express", precision="fp8")


def test_fp8_without_scaled_mm_is_an_error(monkeypatch):
    monkeypatch.delattr(torch, "_scaled_mm")
    with pytest.raises(RuntimeError, match="needs torch._scaled_mm"):
        orthogonalize(torch.randn(32, 32), precision="fp8")


def test_vector_input_is_an_error():
    with pytest.raises(ValueError, match="matrix or a stack"):
        orthogonalize(torch.randn(8))


def test_flops_hand_count():
    # m = 2, n = 3, one step: X X^T (2*2*2*3 = 24) + A A (2*2*2*2 = 16) + B X (24) = 64.
    assert newton_schulz_flops(2, 3, 1) == 64
    assert newton_schulz_flops(3, 2, 5) == 5 * 64


# --- precision schedules ------------------------------------------------------------------------------------------
def test_precision_schedule_forms():
    assert ns.precision_schedule("bf16", 3) == ("bf16",) * 3
    assert ns.precision_schedule("fp8*3>bf16", 5) == ("fp8",) * 3 + ("bf16",) * 2
    assert ns.precision_schedule("fp8*9>fp16", 2) == ("fp8", "fp8")
    assert ns.precision_schedule(["fp8", "fp32"], 2) == ("fp8", "fp32")
    measured = ns.LOW_PRECISION_STEPS["fp8", "quintic", "standard"]
    assert ns.precision_schedule("fp8>bf16", 5, "quintic") == ("fp8",) * measured + ("bf16",) * (5 - measured)


@pytest.mark.parametrize("bad,match", [
    ("fp8>bf16>fp32", "must look like"), ("fp8*x>bf16", "not a step count"), ("fp4>bf16", "unknown Newton-Schulz precision 'fp4'"),
    (("bf16", "fp32"), "2 entries for 5 steps"),
])
def test_malformed_precision_schedule_is_an_error(bad, match):
    with pytest.raises(ValueError, match=match):
        orthogonalize(torch.randn(8, 8), precision=bad)


def test_schedule_without_a_measured_split_is_an_error():
    with pytest.raises(ValueError, match="no measured split"):
        ns.precision_schedule("fp16>fp32", 5, "jordan")


def _mean_polar_error(precision, coefficients, method, seeds):
    errors = [polar_error(x, orthogonalize(x, 5, coefficients, precision, method=method)).relative_frobenius
              for seed in seeds for x in (spectral_matrix(64, 160, seed=seed), spectral_matrix(96, 96, seed=seed))]
    return sum(errors) / len(errors)


@pytest.mark.parametrize("coefficients,method", [("jordan", "standard"), ("quintic", "standard")])
def test_measured_fp8_split_is_no_worse_than_bf16_and_one_more_fp8_step_is(coefficients, method):
    # The rule behind LOW_PRECISION_STEPS, re-run on fresh seeds: within 1% of all-bf16's mean polar error.
    seeds = (31, 32, 33)
    bf16 = _mean_polar_error("bf16", coefficients, method, seeds)
    k = ns.LOW_PRECISION_STEPS["fp8", coefficients, method]
    assert _mean_polar_error("fp8>bf16", coefficients, method, seeds) <= 1.01 * bf16
    assert _mean_polar_error(f"fp8*{k + 1}>bf16", coefficients, method, seeds) > 1.01 * bf16


# --- FP8 GEMM backend ----------------------------------------------------------------------------------------------
def test_cpu_uses_scaled_mm_even_with_transformer_engine_installed(monkeypatch):
    real_find_spec = ns_precision.importlib.util.find_spec
    monkeypatch.setattr(ns_precision.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "transformer_engine" else real_find_spec(name, *a))
    assert ns.fp8_gemm_backend("cpu") == "torch._scaled_mm"
    with pytest.raises(RuntimeError, match="needs Transformer Engine and a CUDA device"):
        orthogonalize(torch.randn(32, 32), precision="fp8", fp8_backend="transformer_engine")


def test_importing_the_engine_never_imports_transformer_engine():
    import subprocess
    import sys

    code = ("import sys, torch; import megatron_muon.newton_schulz as ns; "
            "ns.orthogonalize(torch.randn(32, 48), precision='fp8>bf16'); "
            "assert not any(m.startswith('transformer_engine') for m in sys.modules), 'TE imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fp8_backend_torch_matches_auto_on_cpu():
    x = spectral_matrix(48, 80, seed=4)
    torch.testing.assert_close(orthogonalize(x, precision="fp8", fp8_backend="torch"), orthogonalize(x, precision="fp8"))
