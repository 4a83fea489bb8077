"""Statistics over seeds (megatron_muon/study/metrics.py, "Seeds") on constructed data with known answers:
bootstrap intervals that cover at their stated rate and match the normal closed form, Spearman's rho and its
interval on known trends, the joint resampling of seeds, and the choice of a learning rate by its mean."""

import math

import numpy as np
import pytest

from megatron_muon.study.metrics import (
    average_ranks,
    bootstrap_draws,
    bootstrap_mean_interval,
    compare_optimizers,
    grid_edge,
    percentile_interval,
    seed_spread,
    select_by_mean,
    spearman,
)


def test_percentile_interval_is_the_central_quantiles():
    # 0..100: the 2.5% and 97.5% quantiles are 2.5 and 97.5 exactly; 80% leaves 10% in each tail.
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert percentile_interval(np.arange(101.0), confidence=0.8) == pytest.approx((10.0, 90.0))
    low, high = percentile_interval([[1.0, math.nan, 3.0], [1.0, 2.0, 3.0]])  # per row, along the last axis
    assert math.isnan(low[0]) and math.isnan(high[0]) and (low[1], high[1]) == pytest.approx((1.05, 2.95))
    for bad in (0.0, 1.0, 95):
        with pytest.raises(ValueError, match="confidence must be in"):
            percentile_interval([1.0, 2.0], confidence=bad)


def test_bootstrap_draws_are_reproducible_resamples_with_replacement():
    draws = bootstrap_draws(5, resamples=1000, rng_seed=7)
    assert draws.shape == (1000, 5) and draws.min() == 0 and draws.max() == 4
    assert np.array_equal(draws, bootstrap_draws(5, resamples=1000, rng_seed=7))
    assert not np.array_equal(draws, bootstrap_draws(5, resamples=1000, rng_seed=8))
    # With replacement: some replicate repeats a seed (all 1000 being permutations has probability ~0).
    assert any(len(set(row)) < 5 for row in draws)
    with pytest.raises(ValueError, match="at least one seed"):
        bootstrap_draws(0)


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_bootstrap_interval_of_the_mean_covers_the_true_mean_at_its_stated_rate(confidence):
    # 1000 samples of 50 draws from N(3, 2^2): the share of intervals holding 3 is binomial around the true
    # coverage, which for the percentile bootstrap at n = 50 is the stated level up to ~0.01 (its intervals are
    # normal ones with the plug-in std; the t correction gives 0.942 for 95%). 3 binomial standard errors.
    rng = np.random.default_rng(123)
    draws = 1000
    hits = 0
    for i in range(draws):
        low, high = bootstrap_mean_interval(rng.normal(3.0, 2.0, 50), confidence, resamples=1000, rng_seed=i)
        hits += low <= 3.0 <= high
    standard_error = math.sqrt(confidence * (1 - confidence) / draws)
    assert abs(hits / draws - confidence) < 3 * standard_error


def test_bootstrap_interval_of_a_large_sample_is_the_normal_closed_form():
    # For a large sample the bootstrap distribution of the mean is normal with sd = std(ddof=0) / sqrt(n), so the
    # 95% interval is mean +- 1.96 sd. 2000 resamples estimate the 2.5% quantile to ~3% of the half-width.
    sample = np.random.default_rng(5).exponential(2.0, 2000)
    low, high = bootstrap_mean_interval(sample, 0.95, resamples=2000)
    half_width = 1.959964 * sample.std() / math.sqrt(len(sample))
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    assert (low + high) / 2 == pytest.approx(sample.mean(), abs=0.1 * half_width)


def test_seed_spread():
    spread = seed_spread([1.0, 2.0, 3.0, 4.0])
    assert (spread.mean, spread.std, spread.seeds) == pytest.approx((2.5, math.sqrt(5 / 3), 4))
    assert 1.0 <= spread.ci_low < 2.5 < spread.ci_high <= 4.0 and spread.contains(2.5) and not spread.contains(4.5)
    one = seed_spread([3.0])  # one seed: no noise to measure
    assert one.mean == 3.0 and math.isnan(one.std) and math.isnan(one.ci_low) and one.contains(3.0) is None
    diverged = seed_spread([3.0, math.inf])
    assert diverged.mean == math.inf and math.isnan(diverged.ci_high)
    with pytest.raises(ValueError, match="non-empty"):
        seed_spread([])


def test_spearman_is_the_rank_correlation():
    # 1 - 6 sum(d^2) / (n (n^2 - 1)) without ties: one swapped neighbour pair in 4 gives 1 - 12/60 = 0.8.
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # any increasing function
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert list(average_ranks([3.0, 1.0, 3.0, 2.0])) == [3.5, 1.0, 3.5, 2.0]
    # Ties take average ranks: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4) is Pearson 0.9487 = sqrt(0.9).
    assert spearman([1, 2, 3, 4], [1, 5, 5, 9]) == pytest.approx(math.sqrt(0.9))
    assert spearman([1, 2, 3], [2.0, 2.0, 2.0]) == 0.0
    assert math.isnan(spearman([1], [1]))


def _comparison(ratio_of_batch, noise, seeds=8, batches=(1, 2, 4, 8, 16, 32), seed=0):
    """Tokens to loss per (batch, seed): Muon ~ 1000 x (1 +- noise), AdamW = R(B) x Muon's mean x (1 +- noise),
    with independent noise per optimizer."""
    rng = np.random.default_rng(seed)
    muon = 1000.0 * (1 + noise * rng.standard_normal((len(batches), seeds)))
    adamw = 1000.0 * np.array([ratio_of_batch(b) for b in batches])[:, None] * (
        1 + noise * rng.standard_normal((len(batches), seeds)))
    return compare_optimizers(batches, adamw, muon)


def test_known_increasing_trend_has_a_spearman_interval_above_zero():
    comparison = _comparison(lambda b: 1.1 + 0.1 * math.log2(b), noise=0.03)
    assert comparison.spearman == pytest.approx(1.0)
    assert comparison.spearman_ci[0] > 0 and comparison.ratio_increasing_confident is True
    assert comparison.ratio_above_1_confident is True and comparison.above_1_confidence >= 0.95


def test_flat_trend_has_a_spearman_interval_containing_zero():
    comparison = _comparison(lambda b: 1.3, noise=0.03)
    low, high = comparison.spearman_ci
    assert low < 0 < high and comparison.ratio_increasing_confident is False
    # Flat at 1.3 with 3% noise per optimizer: above 1 at every batch size, confidently.
    assert comparison.ratio_above_1_confident is True


def test_ratio_near_one_is_not_confidently_above_one():
    comparison = _comparison(lambda b: 1.01, noise=0.05)
    assert comparison.above_1_confidence < 0.95 and comparison.ratio_above_1_confident is False
    for low, value, high in zip(comparison.ratio.ci_low, comparison.ratio.value, comparison.ratio.ci_high):
        assert low < value < high


def test_seeds_are_resampled_together_across_optimizers_and_batches():
    # Seed s makes both optimizers and every batch size slower by the same factor (a shared init and data order):
    # R is exactly 1.5 in every replicate when seeds are drawn jointly. Drawn separately per cell, R would
    # inherit the +-20% seed factors and its interval would be wide.
    factor = 1 + 0.2 * np.random.default_rng(3).standard_normal(6)
    muon = np.outer([1.0, 2.0, 3.0], 1000.0 * factor)
    comparison = compare_optimizers([1, 2, 4], 1.5 * muon, muon)
    assert comparison.ratio.ci_low == pytest.approx([1.5] * 3, rel=1e-12)
    assert comparison.ratio.ci_high == pytest.approx([1.5] * 3, rel=1e-12)
    # The tokens themselves do carry the seed noise.
    assert np.all(comparison.tokens_candidate.ci_high - comparison.tokens_candidate.ci_low > 0)


def test_a_seed_that_never_reaches_the_loss_leaves_that_batch_undefined():
    muon = np.array([[100.0, 110.0], [200.0, math.nan], [300.0, 330.0]])
    comparison = compare_optimizers([1, 2, 4], 2 * np.nan_to_num(muon, nan=210.0), muon)
    assert list(comparison.compared) == [True, False, True]
    assert math.isnan(comparison.ratio.value[1]) and math.isnan(comparison.ratio.ci_low[1])
    assert comparison.ratio.value[0] == pytest.approx(2.0)
    # R > 1 and the trend are judged on the batches where R is defined.
    assert comparison.ratio_above_1_confident is True


def test_one_seed_gives_points_without_intervals():
    comparison = compare_optimizers([1, 2], [[200.0], [300.0]], [[100.0], [100.0]])
    assert list(comparison.ratio.value) == [2.0, 3.0] and comparison.spearman == 1.0
    assert np.all(np.isnan(comparison.ratio.ci_low)) and math.isnan(comparison.above_1_confidence)
    assert comparison.ratio_above_1_confident is None and comparison.ratio_increasing_confident is None


def test_learning_rate_is_chosen_by_the_mean_over_seeds():
    # 0.01 wins seed 0 alone, 0.03 wins on the mean; a rate with a diverged seed never wins.
    losses = {0.01: [3.0, 3.6], 0.03: [3.1, 3.2], 0.1: [2.0, math.inf]}
    assert select_by_mean(losses) == 0.03
    assert select_by_mean({0.01: [3.0, 3.0], 0.03: [3.0, 3.0]}) == 0.01  # a tie keeps the first
    assert select_by_mean({0.1: [math.nan], 0.3: [math.inf, 1.0]}) is None
    with pytest.raises(ValueError, match="no values"):
        select_by_mean({0.1: []})


def test_grid_edge():
    grid = [0.01, 0.0316, 0.1]
    assert grid_edge(grid, 0.01) == "lowest" and grid_edge(grid, 0.1) == "highest"
    assert grid_edge(grid, 0.0316) is None
    assert grid_edge([0.02], 0.02) is None  # one point has no inside to compare with
