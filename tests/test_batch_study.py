"""Batch-study statistics on synthetic curves whose answers are known in closed form."""

import math
from dataclasses import replace

import numpy as np
import pytest

from megatron_muon.study.metrics import (
    DeviceRule,
    LossCurve,
    auto_thresholds,
    ema,
    hours_to_loss,
    log_log_slopes,
    pareto_front,
    power_law_fit,
    ratio_table,
    spearman,
    token_optimal_batch,
    tokens_to_loss,
)


def exponential_curve(optimizer, batch, rate, steps=400, floor=1.0, start=5.0):
    """loss(T) = floor + (start - floor) exp(-rate T): reaches L at T = ln((start-floor)/(L-floor)) / rate."""
    tokens = np.arange(steps) * batch
    losses = floor + (start - floor) * np.exp(-rate * tokens)
    return LossCurve(optimizer, batch, tuple(tokens.astype(float)), tuple(losses), tokens_per_second=1000.0)


def exact_tokens(rate, threshold, floor=1.0, start=5.0):
    return math.log((start - floor) / (threshold - floor)) / rate


def test_ema_is_debiased_and_beta_zero_is_identity():
    assert ema([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])
    assert ema([1.0, 2.0], beta=0.0) == pytest.approx([1.0, 2.0])
    assert ema([0.0, 1.0], beta=0.5) == pytest.approx([0.0, 0.5 / 0.75])
    with pytest.raises(ValueError):
        ema([1.0], beta=1.0)


def test_tokens_to_loss_interpolates_between_logged_points():
    assert tokens_to_loss([0, 10, 20], [4.0, 3.0, 2.0], 2.5) == pytest.approx(15.0)
    assert tokens_to_loss([0, 10, 20], [4.0, 3.0, 2.0], 3.0) == pytest.approx(10.0)
    assert tokens_to_loss([5, 10], [1.0, 0.5], 2.0) == 5.0
    assert math.isnan(tokens_to_loss([0, 10], [4.0, 3.0], 2.0))
    # The first crossing counts even if the curve comes back up.
    assert tokens_to_loss([0, 10, 20, 30], [4.0, 2.0, 5.0, 1.0], 2.0) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="increasing"):
        tokens_to_loss([0, 0], [1.0, 1.0], 2.0)


def test_tokens_to_loss_recovers_the_exponential_answer():
    curve = exponential_curve("muon", 64, rate=1e-3)
    for threshold in (4.0, 2.0, 1.2):
        found = tokens_to_loss(curve.tokens, curve.losses, threshold)
        # Linear interpolation of a convex curve overshoots by at most one logging interval.
        assert exact_tokens(1e-3, threshold) <= found <= exact_tokens(1e-3, threshold) + 64


def test_ratio_table_gives_rate_ratio_and_difference():
    batches = [32, 64, 128, 256]
    # Muon 1.25x as token-efficient at every batch, AdamW loses efficiency faster at large batch.
    adam_rates = {32: 1e-3, 64: 1e-3, 128: 0.8e-3, 256: 0.5e-3}
    curves = [exponential_curve("muon", b, 1.25e-3, steps=4000 // (b // 32)) for b in batches]
    curves += [exponential_curve("adamw", b, adam_rates[b], steps=8000 // (b // 32)) for b in batches]
    table = ratio_table(curves, [3.0, 2.0], beta=0.0, device_rule=DeviceRule(token_unit=64))
    rows = table.rows
    assert len(rows) == 8 and table.batches == batches and table.seeds == [0]
    for row in rows:
        expected = 1.25e-3 / adam_rates[row["batch_tokens"]]
        assert row["ratio"] == pytest.approx(expected, rel=0.05)
        assert row["token_difference"] == pytest.approx(
            exact_tokens(adam_rates[row["batch_tokens"]], row["threshold"]) - exact_tokens(1.25e-3, row["threshold"]),
            abs=2 * row["batch_tokens"],
        )
        assert row["steps_muon"] == pytest.approx(row["tokens_muon"] / row["batch_tokens"])
    for comparison in table.comparisons:
        # R = 1.25, 1.25, 1.5625, 2.5: interpolation moves the equal ratios at 32 and 64 by ~0.1% either way, which
        # leaves rho at 0.8 (swapped), 0.95 (tied) or 1. One seed: a point estimate, with no interval to judge it.
        assert comparison.spearman >= 0.8
        assert spearman(batches, comparison.ratio.value[::-1]) <= -0.8
        assert comparison.ratio_increasing_confident is None and comparison.ratio_above_1_confident is None
    assert [r["devices"] for r in rows[:4]] == [8, 16, 32, 64]
    assert rows[0]["hours_muon"] == pytest.approx(rows[0]["tokens_muon"] / (8 * 1000.0) / 3600)


def test_ratio_table_refuses_duplicates_and_disjoint_batches():
    a = exponential_curve("muon", 32, 1e-3)
    with pytest.raises(ValueError, match="two runs of muon at 32 tokens per step with seed 0"):
        ratio_table([a, a], [2.0])
    with pytest.raises(ValueError, match="both"):
        ratio_table([a, exponential_curve("adamw", 64, 1e-3)], [2.0])
    # Seeds 0, 1 for Muon but only 0 for AdamW: no common set of seeds to resample.
    with pytest.raises(ValueError, match="do not share one set of seeds"):
        ratio_table([a, replace(a, seed=1), exponential_curve("adamw", 32, 1e-3)], [2.0])


def test_ratio_is_nan_where_a_run_never_reaches_the_loss():
    rows = ratio_table([exponential_curve("muon", 32, 1e-3, steps=10), exponential_curve("adamw", 32, 1e-3)],
                       [1.5], beta=0.0).rows
    assert math.isnan(rows[0]["tokens_muon"]) and math.isnan(rows[0]["ratio"])


def test_seeded_ratio_table_takes_means_over_seeds_with_intervals():
    # Seed s runs Muon at rate 1.25e-3 (1 + 0.1 s) and AdamW at 1e-3: T = ln(4 / (L - 1)) / rate, so at L = 2 Muon's
    # mean T over seeds 0..3 is ln 4 / 1.25e-3 x mean(1 / (1 + 0.1 s)), and R is AdamW's T over that.
    seeds = range(4)
    curves = [replace(exponential_curve("muon", 32, 1.25e-3 * (1 + 0.1 * s), steps=4000), seed=s) for s in seeds]
    curves += [replace(exponential_curve("adamw", 32, 1e-3, steps=4000), seed=s) for s in seeds]
    (row,) = ratio_table(curves, [2.0], beta=0.0).rows
    muon = np.mean([exact_tokens(1.25e-3 * (1 + 0.1 * s), 2.0) for s in seeds])
    assert row["seeds"] == 4
    assert row["tokens_muon"] == pytest.approx(muon, abs=32)  # within one logging interval
    assert row["ratio"] == pytest.approx(exact_tokens(1e-3, 2.0) / muon, rel=1e-3)
    # AdamW's seeds agree exactly, so its interval is a point; Muon's spans its seeds' tokens to loss.
    assert row["tokens_adamw_ci_low"] == row["tokens_adamw"] == row["tokens_adamw_ci_high"]
    fastest, slowest = exact_tokens(1.25e-3 * 1.3, 2.0), exact_tokens(1.25e-3, 2.0)
    assert fastest - 32 < row["tokens_muon_ci_low"] < row["tokens_muon"] < row["tokens_muon_ci_high"] < slowest + 32
    assert row["ratio_ci_low"] < row["ratio"] < row["ratio_ci_high"]


def test_token_optimal_batch_is_the_largest_minimiser():
    batches = [1, 2, 4, 8, 16]
    assert token_optimal_batch(batches, [10, 10, 10, 12, 20]) == 4
    assert token_optimal_batch(batches, [10, 9, 10.05, 12, math.nan], rtol=0.02) == 2
    assert token_optimal_batch(batches, [10, 9.9, 10.05, 12, math.nan], rtol=0.02) == 4
    assert math.isnan(token_optimal_batch(batches, [math.nan] * 5))


def test_perfect_scaling_has_slope_minus_one():
    assert log_log_slopes([1, 2, 4], [100, 50, 25]) == pytest.approx([-1, -1])
    assert log_log_slopes([1, 2], [100, 100]) == pytest.approx([0])


def test_device_rule_is_the_papers_footnote_and_scales():
    rule = DeviceRule()
    mib = 2 ** 20
    assert [rule(b) for b in (128 * 1024, mib, 3 * mib, 4 * mib, 7 * mib, 16 * mib)] == [8, 16, 32, 64, 64, 128]
    small = DeviceRule(token_unit=1024)
    assert small(512) == 8 and small(2048) == 32
    assert hours_to_loss(3600 * 80, 8, 10) == pytest.approx(1.0)


def test_pareto_front():
    points = [(1.0, 64), (2.0, 32), (3.0, 32), (4.0, 8), (math.nan, 8)]
    assert pareto_front(points) == [True, True, False, True, False]


def test_auto_thresholds_lie_in_the_band_every_run_crosses():
    curves = [exponential_curve("muon", 32, 1e-3), exponential_curve("adamw", 32, 0.5e-3)]
    thresholds = auto_thresholds(curves, 5, beta=0.0)
    assert len(thresholds) == 5 and np.all(np.diff(thresholds) < 0)
    for c in curves:
        for t in thresholds:
            assert math.isfinite(c.tokens_to_loss(t, beta=0.0))


def test_power_law_fit_recovers_known_parameters():
    widths = np.array([256, 512, 1024, 2048, 4096])
    fit = power_law_fit(widths, 7.0 / widths ** 0.31 + 1.31)
    assert fit.alpha == pytest.approx(0.31, rel=1e-3)
    assert fit.E == pytest.approx(1.31, rel=1e-3)
    assert fit.A == pytest.approx(7.0, rel=1e-2)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-9)
    assert not fit.alpha_at_bound
    # Minima that rise with width have no decreasing power law: the fit says so instead of inventing one.
    assert power_law_fit([32, 64, 128], [1.52, 1.50, 1.51]).alpha_at_bound
    noisy = power_law_fit(widths, 7.0 / widths ** 0.31 + 1.31 + np.array([1e-3, -1e-3, 1e-3, -1e-3, 0]))
    assert 0.9 < noisy.r_squared < 1.0
    with pytest.raises(ValueError, match="3 distinct"):
        power_law_fit([1, 2, 2], [3.0, 2.0, 2.0])
