"""The fused (torch.compile) fp8 quantization against the eager one it replaces, and orthogonalize through it.

On CPU the compiled kernel computes the same e4m3 codes and scales as the eager path, bit for bit, so orthogonalize's
fp8 results are identical too. The first test pays for the compile (C++ build, ~10-20 s on a loaded 2-core machine);
every later one reuses its kernels, which take any shape (dynamic shapes), so the file stays small shapes only.
"""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from megatron_muon import newton_schulz as ns
from megatron_muon.newton_schulz import orthogonalize, polar_error, precision, rounding_error, spectral_matrix
from tests.test_newton_schulz import POLAR_BOUNDS, ROUNDING_BOUNDS


def _operand():
    """Rows over 60 decades, a zero row, a subnormal row and entries near fp32's max: every branch of the scaling."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 48, 80, generator=g) * torch.logspace(-30, 30, 48)[None, :, None]
    x[0, 3] = 0.0
    x[1, 5] = 1e-44
    x[2, 7, :5] = 3e38
    return x


def _assert_same_quantization(t):
    q_eager, s_eager = precision._quantize_e4m3(t)
    q_fused, s_fused = precision._quantize_e4m3_compiled(t)
    assert precision._compile_failure is None, precision._compile_failure  # the fused kernel ran, not the fallback
    assert q_fused.dtype == torch.float8_e4m3fn and q_fused.is_contiguous()
    assert torch.equal(q_fused.view(torch.uint8), q_eager.view(torch.uint8))
    assert torch.equal(s_fused, s_eager)


@torch.no_grad()
def test_compiled_quantization_equals_eager_bit_for_bit():
    x = _operand()
    _assert_same_quantization(x)  # a left operand, row-major
    _assert_same_quantization(x.mT)  # a right operand b is quantized as b.mT: column-major in, row-major out
    graphs = counters["stats"]["unique_graphs"]
    # Another shape of the same layout runs the same dynamic-shape kernels: no compile per shape.
    _assert_same_quantization(_operand()[:, 5:37, 3:67] * 7.0)
    _assert_same_quantization(x[:2].mT.contiguous())
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("precision_name,coefficients,method", [
    ("fp8", "jordan", "standard"), ("fp8", "quintic", "standard"),
    ("fp8>bf16", "jordan", "standard"), ("fp8>bf16", "jordan", "gram"),
])
@pytest.mark.parametrize("shape", [(96, 200), (200, 96), (3, 48, 80)], ids=["ragged", "tall", "stacked"])
def test_orthogonalize_with_compiled_quantization_equals_eager_and_holds_the_fp8_bounds(
        precision_name, coefficients, method, shape):
    x = spectral_matrix(*shape, seed=81)
    fused = orthogonalize(x, 5, coefficients, precision_name, method=method, fp8_quantization="compiled")
    eager = orthogonalize(x, 5, coefficients, precision_name, method=method, fp8_quantization="eager")
    assert torch.equal(fused, eager)
    max_err, low, high = POLAR_BOUNDS[precision_name, coefficients]
    err = polar_error(x, fused)
    assert err.relative_frobenius <= max_err and low <= err.sigma_min and err.sigma_max <= high
    assert rounding_error(x, fused, 5, coefficients) <= ROUNDING_BOUNDS[precision_name]


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(precision, "_compiled_quantize", None)
    monkeypatch.setattr(precision, "_compile_failure", None)
    x = spectral_matrix(48, 80, seed=82)
    eager = orthogonalize(x, precision="fp8", fp8_quantization="eager")
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        for _ in range(2):
            assert torch.equal(orthogonalize(x, precision="fp8", fp8_quantization="compiled"), eager)
    warnings = [r.getMessage() for r in caplog.records if r.name == precision.__name__]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0]
    assert "no C++ compiler found" in precision._compile_failure


def test_cpu_default_quantizes_eagerly_and_never_compiles(monkeypatch):
    # CI runs fp8 on CPU throughout the suite: `auto` must not make every process pay for a compile.
    def must_not_compile(*args, **kwargs):
        raise AssertionError("torch.compile called for fp8_quantization='auto' on CPU")

    monkeypatch.setattr(torch, "compile", must_not_compile)
    monkeypatch.setattr(precision, "_compiled_quantize", None)
    orthogonalize(spectral_matrix(48, 80, seed=83), precision="fp8")
    assert precision._compiled_quantize is None


def test_quantization_choice():
    assert ns.fp8_quantizer("cpu") == "eager"
    assert ns.fp8_quantizer("cuda") == "compiled"
    assert ns.fp8_quantizer("cpu", "compiled") == "compiled"
    assert ns.fp8_quantizer("cuda", "eager") == "eager"
    with pytest.raises(ValueError, match="unknown fp8_quantization 'fused'"):
        orthogonalize(torch.randn(8, 8), precision="fp8", fp8_quantization="fused")
