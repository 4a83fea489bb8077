"""Gram Newton-Schulz against standard Newton-Schulz, exact-arithmetic Newton-Schulz and the exact polar factor;
its FLOP count, restarts, and the automatic choice of method."""

import logging

import pytest
import torch

from megatron_muon import newton_schulz as ns
from megatron_muon.newton_schulz import gram
from megatron_muon.newton_schulz import orthogonalize, polar_error, rounding_error, spectral_matrix

RECTANGULAR = {"tall": (256, 64), "wide": (64, 256), "ragged": (96, 200), "stacked": (3, 48, 80), "2:1": (40, 80)}
# Stated bounds, measured on condition-number-100 inputs (3 seeds, the shapes above plus square): error vs the
# exact polar factor, output singular-value band, and distance from exact-arithmetic Newton-Schulz.
# Measured: bf16 0.201 / 0.055 / 0.099, band up to 1.20 for polar_express, rounding 0.038 / 0.026 / 0.045;
# fp16 as fp32 to 3 digits, rounding <= 0.006; fp8>bf16 (fp8 before the restart) 0.202 / 0.055, rounding 0.055.
GRAM_BOUNDS = {  # (precision, coefficients): (max error, band low, band high, rounding)
    ("fp32", "jordan"): (0.25, 0.65, 1.23, 1e-4),
    ("fp32", "quintic"): (0.07, 0.95, 1.17, 1e-4),
    ("fp32", "polar_express"): (0.11, 0.85, 1.15, 1e-4),
    ("bf16", "jordan"): (0.25, 0.65, 1.23, 0.05),
    ("bf16", "quintic"): (0.07, 0.95, 1.17, 0.04),
    ("bf16", "polar_express"): (0.12, 0.85, 1.23, 0.06),
    ("fp16", "jordan"): (0.25, 0.65, 1.23, 0.01),
    ("fp16", "quintic"): (0.07, 0.95, 1.17, 0.01),
    ("fp16", "polar_express"): (0.11, 0.85, 1.15, 0.01),
    ("fp8>bf16", "jordan"): (0.25, 0.65, 1.23, 0.07),
    ("fp8>bf16", "quintic"): (0.07, 0.95, 1.17, 0.04),
}


def test_flops_hand_count():
    # m = 2, n = 8, one step, no restart: X X^T (2*2*2*8 = 64), R R (2*8 = 16), Q X (64); Q = a I + Z is free.
    assert ns.gram_newton_schulz_flops(2, 8, 1, ()) == 144
    # 5 steps, restart before step 2: rectangular 2 m^2 n x (2 + 2) and 28 m^3 of square products
    # (per step R R, Q Z, R update: 2+0+4, 2+2+0, 2+0+4, 2+2+4, 2+2+0).
    m, n = 4, 16
    assert ns.gram_newton_schulz_flops(n, m, 5, (2,)) == 8 * m * m * n + 28 * m**3
    # Restarts (2, 4): 12 m^2 n + 22 m^3. On the MLP's 4:1 shape of the paper's 3.67B model: 70 vs 90 m^3.
    assert ns.gram_newton_schulz_flops(n, m, 5, (2, 4)) == 12 * m * m * n + 22 * m**3
    saved = 1 - ns.gram_newton_schulz_flops(10240, 2560, 5, (2, 4)) / ns.newton_schulz_flops(10240, 2560, 5)
    assert saved == pytest.approx(2 / 9)


def test_restart_points():
    assert ns.restart_points("polar_express", 5) == (2, 4)
    assert ns.restart_points("jordan", 2) == ()
    assert ns.restart_points("quintic", 9) == (2, 4, 6, 8)


@pytest.mark.parametrize("shape", RECTANGULAR.values(), ids=RECTANGULAR.keys())
@pytest.mark.parametrize("coefficients", ["jordan", "quintic", "polar_express"])
def test_fp32_gram_equals_standard(shape, coefficients):
    x = spectral_matrix(*shape, cond=1e3, seed=41)
    gram = orthogonalize(x, 5, coefficients, "fp32", method="gram")
    standard = orthogonalize(x, 5, coefficients, "fp32", method="standard")
    assert float((gram - standard).norm() / standard.norm()) <= 1e-4


@pytest.mark.parametrize("precision,coefficients", GRAM_BOUNDS.keys())
@pytest.mark.parametrize("shape", [(256, 64), (64, 256), (96, 200), (3, 48, 80), (64, 64)])
def test_gram_within_stated_bound(precision, coefficients, shape):
    max_err, low, high, rounding = GRAM_BOUNDS[precision, coefficients]
    for seed in (51, 52):
        x = spectral_matrix(*shape, seed=seed)
        out = orthogonalize(x, 5, coefficients, precision, method="gram")
        err = polar_error(x, out)
        assert err.relative_frobenius <= max_err
        assert low <= err.sigma_min and err.sigma_max <= high
        assert rounding_error(x, out, 5, coefficients) <= rounding


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp8>bf16"])
def test_ill_conditioned_gram_stays_bounded(precision):
    # Condition number 1e5: the regime where spurious negative eigenvalues of R would blow up without restarts.
    for coefficients in ("jordan", "quintic"):
        x = spectral_matrix(2, 64, 512, cond=1e5, seed=61)
        err = polar_error(x, orthogonalize(x, 5, coefficients, precision, method="gram"))
        assert err.sigma_max <= GRAM_BOUNDS[precision, coefficients][2]


def test_restart_removes_the_blow_up(monkeypatch):
    # Measured: bf16 Polar Express without a restart reaches singular values ~5e7; with the chosen restarts it
    # stays in its band. The test fails if restarts stop being applied.
    x = spectral_matrix(2, 64, 512, cond=1e3, seed=5)
    good = polar_error(x, orthogonalize(x, 5, "polar_express", "bf16", method="gram"))
    assert good.sigma_max <= GRAM_BOUNDS["bf16", "polar_express"][2]
    monkeypatch.setitem(gram.GRAM_RESTARTS, "polar_express", ())
    monkeypatch.setattr(gram, "GRAM_RESTART_INTERVAL", 99)
    bad = polar_error(x, orthogonalize(x, 5, "polar_express", "bf16", method="gram"))
    assert not bad.sigma_max <= 2.0


def test_stack_equals_each_matrix_alone():
    x = torch.randn(3, 24, 96) * torch.tensor([1e-3, 1.0, 1e4]).view(3, 1, 1)
    stacked = orthogonalize(x, method="gram")
    for i in range(3):
        torch.testing.assert_close(stacked[i], orthogonalize(x[i], method="gram"), rtol=1e-5, atol=1e-6)


def test_fp8_after_the_restart_is_refused():
    with pytest.raises(ValueError, match="fp8 only before its first restart"):
        orthogonalize(torch.randn(32, 128), precision="fp8", method="gram")


def test_zero_input_gives_zero():
    assert torch.equal(orthogonalize(torch.zeros(16, 64), method="gram"), torch.zeros(16, 64))


# --- automatic method choice ----------------------------------------------------------------------------------
def test_auto_choice_by_aspect_ratio_on_the_paper_shapes():
    assert ns.resolve_method("auto", 10240, 2560) == "gram"  # gate, up: 4:1
    assert ns.resolve_method("auto", 2560, 10240) == "gram"  # down
    assert ns.resolve_method("auto", 1280, 2560) == "standard"  # K, V: 2:1 saves only 12% of the FLOPs
    assert ns.resolve_method("auto", 2560, 2560) == "standard"
    assert ns.resolve_method("auto", 300, 100) == ns.resolve_method("auto", 100, 300) == "gram"  # at the threshold
    assert ns.resolve_method("auto", 299, 100) == "standard"


def test_auto_choice_is_logged_once_per_shape(caplog, monkeypatch):
    monkeypatch.setattr(gram, "_LOGGED_CHOICES", set())
    with caplog.at_level(logging.INFO, logger=ns.__name__):
        for _ in range(3):
            orthogonalize(torch.randn(2, 96, 24), method="auto")
        orthogonalize(torch.randn(24, 24), method="auto")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "96x24" in messages[0] and ": gram (aspect 4.00" in messages[0]
    assert "24x24" in messages[1] and ": standard" in messages[1]


def test_auto_uses_what_it_chose():
    x = spectral_matrix(40, 160, seed=71)
    torch.testing.assert_close(orthogonalize(x, precision="bf16", method="auto"),
                               orthogonalize(x, precision="bf16", method="gram"))


def test_orthogonalization_flops_follow_the_method():
    assert ns.orthogonalization_flops(2560, 2560, method="auto") == ns.newton_schulz_flops(2560, 2560, 5)
    assert ns.orthogonalization_flops(10240, 2560, method="auto") == ns.gram_newton_schulz_flops(10240, 2560, 5, (2, 4))


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown Newton-Schulz method 'newton'"):
        orthogonalize(torch.randn(8, 8), method="newton")
