"""The scripts that produce the READMEs' Newton-Schulz numbers (benchmarks/ns_error_table.py, fp8_split.py), run
small: their JSON has the documented fields and their numbers hold the bounds the engine's tests hold."""

import importlib.util
import json
import pathlib

import pytest

from megatron_muon.newton_schulz import LOW_PRECISION_STEPS, orthogonalize, polar_error, spectral_matrix
from tests.test_gram_newton_schulz import GRAM_BOUNDS
from tests.test_newton_schulz import POLAR_BOUNDS, ROUNDING_BOUNDS

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bounds(method, precision, coefficients):
    """(max error, band low, band high, max rounding) the tests hold for this configuration."""
    if method == "gram":
        return GRAM_BOUNDS[precision, coefficients]
    return (*POLAR_BOUNDS[precision, coefficients], ROUNDING_BOUNDS[precision])


def test_ns_error_table(tmp_path, capsys):
    table = _load("ns_error_table")
    out = tmp_path / "table.json"
    table.main(["--out", str(out), "--seeds", "11", "--precisions", "fp32", "bf16", "fp8",
                "--coefficients", "jordan", "polar_express"])
    result = json.loads(out.read_text())
    assert {"steps", "cond", "seeds", "shapes", "seconds"} <= result["metadata"].keys()
    rows = {(r["method"], r["precision"], r["coefficients"]): r for r in result["rows"]}
    assert len(rows) == 2 * 3 * 2
    refused = {key for key, r in rows.items() if r["refused"] is not None}
    assert refused == {("standard", "fp8", "polar_express"), ("gram", "fp8", "jordan"), ("gram", "fp8", "polar_express")}
    for key, r in rows.items():
        assert r.keys() == {"method", "precision", "coefficients", "inputs", "error", "sigma_min", "sigma_max",
                            "rounding", "refused"}
        assert r["inputs"] == len(table.SHAPES)
        if key in refused:
            assert r["error"] is None
            continue
        max_err, low, high, rounding = _bounds(*key)
        assert r["error"] <= max_err and low <= r["sigma_min"] and r["sigma_max"] <= high, key
        assert 0 < r["rounding"] <= rounding, key
    # The row is the worst input, not a typical one.
    inputs = [spectral_matrix(*shape, seed=11) for shape in table.SHAPES.values()]
    worst = max(polar_error(x, orthogonalize(x, 5, "jordan", "bf16")).relative_frobenius for x in inputs)
    assert rows["standard", "bf16", "jordan"]["error"] == worst
    printed = capsys.readouterr().out
    assert "| standard | bf16 | jordan | " in printed and "| gram | fp8 | jordan | refused |" in printed


def test_fp8_split_reproduces_low_precision_steps(tmp_path, capsys):
    split = _load("fp8_split")
    out = tmp_path / "split.json"
    # tests/test_newton_schulz.py's inputs for the same rule: condition number 100, seeds 31-33.
    split.main(["--out", str(out), "--seeds", "31", "32", "33", "--conds", "100"])
    result = json.loads(out.read_text())
    assert {"steps", "tolerance", "conds", "seeds", "shapes", "inputs_per_cond"} <= result["metadata"].keys()
    assert len(result["rows"]) == 4
    for r in result["rows"]:
        (per_cond,) = r["conds"]
        errors, k = per_cond["errors"], r["chosen"]
        bf16, fp8_at_k = errors[0], errors[k]
        assert bf16 <= _bounds(r["method"], "bf16", r["coefficients"])[0]
        assert fp8_at_k <= 1.01 * bf16
        assert errors[k + 1] is None or errors[k + 1] > 1.01 * bf16
        if r["method"] == "gram":
            assert errors[3:] == [None, None, None]  # fp8 from the first restart on is refused
        else:
            assert errors[5] <= POLAR_BOUNDS["fp8", r["coefficients"]][0]
        assert k == LOW_PRECISION_STEPS["fp8", r["coefficients"], r["method"]] == r["low_precision_steps"]
    assert result["matches"] is True
    assert "reproduces LOW_PRECISION_STEPS: yes" in capsys.readouterr().out


@pytest.mark.parametrize("errors,expected", [([0.2, 0.19, 0.201, 0.3], 2), ([0.2, 0.21, 0.1], 0),
                                             ([0.2, 0.2, None], 1), ([0.2, 0.2, 0.2], 2)])
def test_split_stops_at_the_first_schedule_over_the_tolerance(errors, expected):
    assert _load("fp8_split").split(errors, 0.01) == expected
