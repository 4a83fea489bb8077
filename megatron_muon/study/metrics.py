"""Statistics of the batch-size study of arXiv 2505.02222 (Sec. 2.3-2.5, App. D, F; Figs. 1-4, 8-12).

Inputs are loss curves: (tokens seen, loss on a fresh batch) pairs of one run of one optimizer at one global
batch size. Everything here is pure numpy.

Smoothing, stated because the paper does not (its Fig. 7 uses an EMA of 0.95): the curve is an exponential moving
average over logged points, debiased like TensorBoard's (divided by 1 - beta^(i+1)), so the first points are not
pulled towards 0. Points are assumed evenly spaced in steps.

Tokens to loss: T_L = tokens at which the smoothed curve first reaches L or below, linearly interpolated between
the last point above L and the first point at or below it, so the answer does not snap to the logging interval.
NaN when the run never reaches L. Steps to loss S_L = T_L / tokens per step.

Seeds: a study may run every (optimizer, batch size) with several seeds (model init and data order). T_L(B) is then
the mean over seeds of each seed's T_L (NaN if any seed never reaches L: the mean of a run that never arrives is
not finite), R_L(B) the ratio of the two optimizers' means and T_A - T_M their difference. Their intervals are
percentile bootstraps over seeds: seed labels are drawn with replacement, the statistic is recomputed from the
drawn seeds, and the interval is the central quantiles of those replicates. One draw of seed labels is used for
every cell of a study (seed i is one model init and one data order, shared by the runs at every batch size and
both optimizers), so the statistics across batch sizes (R > 1 everywhere, the Spearman trend) see the seeds'
correlations. The RNG is seeded: the same runs give the same intervals. With few seeds (2-4) the percentile
bootstrap can only span the seeds it has, so its intervals are too narrow: read them as a floor on the
uncertainty.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_EMA = 0.95
DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
BOOTSTRAP_RNG_SEED = 0


def ema(values: Sequence[float], beta: float = DEFAULT_EMA) -> np.ndarray:
    """Debiased exponential moving average; beta = 0 returns the values unchanged."""
    if not 0 <= beta < 1:
        raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
    values = np.asarray(values, dtype=float)
    out = np.empty_like(values)
    running = 0.0
    for i, v in enumerate(values):
        running = beta * running + (1 - beta) * v
        out[i] = running / (1 - beta ** (i + 1))
    return out


def tokens_to_loss(tokens: Sequence[float], losses: Sequence[float], threshold: float) -> float:
    """First token count at which `losses` (already smoothed) reach `threshold`; NaN if they never do."""
    tokens = np.asarray(tokens, dtype=float)
    losses = np.asarray(losses, dtype=float)
    if tokens.shape != losses.shape or tokens.ndim != 1:
        raise ValueError(f"tokens {tokens.shape} and losses {losses.shape} must be 1-D of one length")
    if len(tokens) and np.any(np.diff(tokens) <= 0):
        raise ValueError("tokens must be strictly increasing")
    reached = np.flatnonzero(losses <= threshold)
    if reached.size == 0:
        return math.nan
    i = int(reached[0])
    if i == 0:
        return float(tokens[0])
    above, below = losses[i - 1], losses[i]
    if not math.isfinite(above):
        return float(tokens[i])
    fraction = (above - threshold) / (above - below)
    return float(tokens[i - 1] + fraction * (tokens[i] - tokens[i - 1]))


@dataclass(frozen=True)
class LossCurve:
    """One run: optimizer, tokens per step (global batch x sequence length) and its (tokens, loss) points."""

    optimizer: str
    batch_tokens: int
    tokens: tuple[float, ...]
    losses: tuple[float, ...]
    tokens_per_second: float = math.nan  # measured training throughput of the run, one device
    seed: int = 0  # the run's seed label: runs of one label at different batch sizes share model init and data order

    def smoothed(self, beta: float = DEFAULT_EMA) -> np.ndarray:
        return ema(self.losses, beta)

    def tokens_to_loss(self, threshold: float, beta: float = DEFAULT_EMA) -> float:
        return tokens_to_loss(self.tokens, self.smoothed(beta), threshold)


def token_ratio(tokens_adamw: np.ndarray | float, tokens_muon: np.ndarray | float) -> np.ndarray:
    """R_L(B) = T_AdamW / T_Muon (Eq. 2): AdamW's data overhead. NaN where either never reached L."""
    return np.asarray(tokens_adamw, dtype=float) / np.asarray(tokens_muon, dtype=float)


def token_optimal_batch(batches: Sequence[float], tokens: Sequence[float], rtol: float = 0.0) -> float:
    """B_tok = max{B : T_L(B) <= (1 + rtol) min_B' T_L(B')} (Eq. 6; rtol = 0 is the paper's equality).

    Batches that never reached L are ignored; NaN if none did. A small rtol makes the largest data-optimal batch
    less brittle under run-to-run noise, which the paper names as Eq. 6's weakness.
    """
    batches = np.asarray(batches, dtype=float)
    tokens = np.asarray(tokens, dtype=float)
    finite = np.isfinite(tokens)
    if not finite.any():
        return math.nan
    best = tokens[finite].min()
    return float(batches[finite & (tokens <= best * (1 + rtol))].max())


def log_log_slopes(batches: Sequence[float], steps: Sequence[float]) -> np.ndarray:
    """d log S / d log B between neighbouring batch sizes: -1 is perfect scaling, 0 is no gain from batch."""
    b = np.log(np.asarray(batches, dtype=float))
    s = np.log(np.asarray(steps, dtype=float))
    return np.diff(s) / np.diff(b)


@dataclass(frozen=True)
class DeviceRule:
    """Devices used at a batch size: the paper's footnote 4 (8 below 1M tokens, 16 below 2M, 32 below 4M, 64 below
    8M, 128 above), with every threshold multiplied by `token_unit / 2^20` to shrink it to small studies."""

    token_unit: float = 2.0 ** 20
    thresholds_in_units: tuple[float, ...] = (1, 2, 4, 8)
    devices: tuple[int, ...] = (8, 16, 32, 64, 128)

    def __post_init__(self):
        if len(self.devices) != len(self.thresholds_in_units) + 1:
            raise ValueError("need one more device count than thresholds")
        if self.token_unit <= 0:
            raise ValueError(f"token unit must be positive, got {self.token_unit}")

    def __call__(self, batch_tokens: float) -> int:
        for threshold, devices in zip(self.thresholds_in_units, self.devices):
            if batch_tokens < threshold * self.token_unit:
                return devices
        return self.devices[-1]


def hours_to_loss(tokens: float, devices: int, tokens_per_second_per_device: float) -> float:
    """Wall time on `devices` data-parallel devices with perfect scaling of throughput."""
    return tokens / (devices * tokens_per_second_per_device) / 3600.0


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (hours, devices) points: True where no other point is at least as good in both and better in one."""
    flags = []
    for i, (h, d) in enumerate(points):
        dominated = any(
            (h2 <= h and d2 <= d) and (h2 < h or d2 < d)
            for j, (h2, d2) in enumerate(points) if j != i
        )
        flags.append(math.isfinite(h) and not dominated)
    return flags


def auto_thresholds(curves: Sequence[LossCurve], count: int, beta: float = DEFAULT_EMA) -> np.ndarray:
    """`count` losses that every run crosses: from the lowest smoothed starting loss down to the highest minimum.

    If the runs share no such band (some never get below where others start), the band between the median
    start and the median minimum is used instead, and some (optimizer, batch) pairs will never reach some L.
    """
    if count < 1:
        raise ValueError(f"threshold count must be >= 1, got {count}")
    if not curves:
        raise ValueError("no curves to choose thresholds from")
    starts = np.array([c.smoothed(beta)[0] for c in curves])
    minima = np.array([np.nanmin(c.smoothed(beta)) for c in curves])
    high, low = starts.min(), minima.max()
    if not low < high:
        high, low = np.median(starts), np.median(minima)
    # Stay strictly inside the band: at its very edge one run reaches L only at its first or last point.
    margin = 0.02 * (high - low)
    return np.linspace(high - margin, low + margin, count)


@dataclass(frozen=True)
class PowerLawFit:
    """L(d) = A / d^alpha + E (the paper's Fig. 14 fit of per-stage minima against width)."""

    A: float
    alpha: float
    E: float
    r_squared: float
    alpha_at_bound: bool  # the best alpha is the edge of the search: the data do not decrease like a power law

    def __call__(self, d):
        return self.A / np.asarray(d, dtype=float) ** self.alpha + self.E


def _linear_fit_given_alpha(d: np.ndarray, losses: np.ndarray, alpha: float):
    x = d ** -alpha
    design = np.stack([x, np.ones_like(x)], axis=1)
    (a, e), *_ = np.linalg.lstsq(design, losses, rcond=None)
    residual = losses - (a * x + e)
    return float(a), float(e), float(residual @ residual)


def power_law_fit(widths: Sequence[float], losses: Sequence[float], max_alpha: float = 4.0) -> PowerLawFit:
    """Least squares over (A, alpha, E): for each alpha (A, E) is a linear fit, so only alpha is searched
    (a grid, then golden-section refinement of the best bracket)."""
    d = np.asarray(widths, dtype=float)
    y = np.asarray(losses, dtype=float)
    if d.shape != y.shape or d.ndim != 1:
        raise ValueError("widths and losses must be 1-D of one length")
    if len(np.unique(d)) < 3:
        raise ValueError(f"a 3-parameter power law needs at least 3 distinct widths, got {len(np.unique(d))}")
    if np.any(d <= 0) or not np.all(np.isfinite(y)):
        raise ValueError("widths must be positive and losses finite")
    grid = np.linspace(1e-3, max_alpha, 400)
    sse = [_linear_fit_given_alpha(d, y, a)[2] for a in grid]
    i = int(np.argmin(sse))
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _linear_fit_given_alpha(d, y, m1)[2] < _linear_fit_given_alpha(d, y, m2)[2]:
            hi = m2
        else:
            lo = m1
    alpha = 0.5 * (lo + hi)
    a, e, residual = _linear_fit_given_alpha(d, y, alpha)
    total = float(((y - y.mean()) ** 2).sum())
    return PowerLawFit(A=a, alpha=alpha, E=e, r_squared=1.0 - residual / total if total > 0 else 1.0,
                       alpha_at_bound=not grid[1] < alpha < grid[-2])


# ---------------------------------------------------------------------------------------------------------------
# Statistics over seeds (module docstring: "Seeds")
# ---------------------------------------------------------------------------------------------------------------


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_draws(num_seeds: int, resamples: int = DEFAULT_RESAMPLES,
                    rng_seed: int = BOOTSTRAP_RNG_SEED) -> np.ndarray:
    """(resamples, num_seeds) seed indices drawn with replacement: row r holds the seeds of bootstrap replicate r."""
    if num_seeds < 1:
        raise ValueError(f"need at least one seed to resample, got {num_seeds}")
    if resamples < 1:
        raise ValueError(f"need at least one bootstrap resample, got {resamples}")
    return np.random.default_rng(rng_seed).integers(0, num_seeds, size=(resamples, num_seeds))


def percentile_interval(replicates, confidence: float = DEFAULT_CONFIDENCE):
    """The central `confidence` interval of bootstrap replicates along their last axis: their (1 - c) / 2 and
    (1 + c) / 2 quantiles (linearly interpolated). Floats for a 1-D input, arrays otherwise; NaN where a replicate
    is NaN."""
    _check_confidence(confidence)
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(np.asarray(replicates, dtype=float), [tail, 100.0 - tail], axis=-1)
    if np.ndim(low) == 0:
        return float(low), float(high)
    return low, high


def bootstrap_mean_interval(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE,
                            resamples: int = DEFAULT_RESAMPLES,
                            rng_seed: int = BOOTSTRAP_RNG_SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (one per seed)."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D (one per seed), got shape {values.shape}")
    return percentile_interval(values[bootstrap_draws(len(values), resamples, rng_seed)].mean(axis=1), confidence)


@dataclass(frozen=True)
class SeedSpread:
    """A quantity measured once per seed: its mean, sample standard deviation (ddof 1) and the percentile-bootstrap
    interval of the mean. std and the interval are NaN with one seed (no noise to measure from) and when a seed's
    value is not finite (a diverged run, whose inf makes the mean inf)."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    seeds: int

    def contains(self, value: float) -> bool | None:
        """Whether the interval holds `value`; None when there is no interval."""
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return None
        return self.ci_low <= value <= self.ci_high


def seed_spread(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES,
                rng_seed: int = BOOTSTRAP_RNG_SEED) -> SeedSpread:
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence of values, one per seed; got shape {values.shape}")
    mean = float(values.mean())
    if values.size < 2 or not np.all(np.isfinite(values)):
        return SeedSpread(mean, math.nan, math.nan, math.nan, int(values.size))
    low, high = bootstrap_mean_interval(values, confidence, resamples, rng_seed)
    return SeedSpread(mean, float(values.std(ddof=1)), low, high, int(values.size))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of `values`; tied values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    ranks = np.empty(len(values))
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or ordered[end] != ordered[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks. NaN for fewer than two points; 0
    when x or y is constant, which has no monotone trend to measure."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x {x.shape} and y {y.shape} must be 1-D of one length")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return 0.0 if norm == 0 else float(rx @ ry) / norm


def select_by_mean(candidates: Mapping[Hashable, Sequence[float]]) -> Hashable | None:
    """The candidate (e.g. a learning rate) whose values (e.g. final losses, one per seed) have the lowest mean. A
    non-finite value (a diverged seed) makes a candidate's mean inf, so it never wins; None if every candidate has
    one. Ties keep the first candidate."""
    best, best_mean = None, math.inf
    for key, values in candidates.items():
        values = np.asarray(values, dtype=float)
        if values.size == 0:
            raise ValueError(f"candidate {key!r} has no values")
        mean = float(values.mean()) if np.all(np.isfinite(values)) else math.inf
        if mean < best_mean:
            best, best_mean = key, mean
    return best


def grid_edge(grid: Sequence[float], chosen: float) -> str | None:
    """"lowest" or "highest" when `chosen` is that end of a grid of at least two distinct values (the optimum may
    lie beyond it); None inside the grid and for a one-point grid, which has no inside."""
    values = sorted(set(float(g) for g in grid))
    if len(values) < 2:
        return None
    if math.isclose(chosen, values[0], rel_tol=1e-9):
        return "lowest"
    if math.isclose(chosen, values[-1], rel_tol=1e-9):
        return "highest"
    return None


@dataclass(frozen=True)
class Estimate:
    """Values over batch sizes with their bootstrap intervals (NaN with one seed and where the value is NaN)."""

    value: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


@dataclass(frozen=True)
class SeedComparison:
    """Reference vs candidate optimizer at one loss threshold, over batch sizes, from tokens to loss per seed.

    Per batch: each optimizer's mean T_L, R = T_ref / T_cand (ratio of the means) and T_ref - T_cand, each with its
    interval. Across the batches where R is defined (`compared`): `above_1_confidence` is the share of bootstrap
    replicates with R > 1 at every one of them, so it is at least `confidence` exactly when the one-sided
    percentile-bootstrap lower bound of min_B R_L(B) is above 1; `spearman` is the rank correlation of R with B
    and `spearman_ci` its interval. With one seed every interval and the confidence are NaN.
    """

    batches: np.ndarray
    seeds: int
    confidence: float
    tokens_reference: Estimate
    tokens_candidate: Estimate
    ratio: Estimate
    difference: Estimate
    compared: np.ndarray  # bool per batch: R defined (every seed of both optimizers reached L)
    above_1_confidence: float
    spearman: float
    spearman_ci: tuple[float, float]

    @property
    def ratio_above_1_confident(self) -> bool | None:
        """R_L(B) > 1 at every compared B at the stated confidence; None without an interval (one seed)."""
        return None if math.isnan(self.above_1_confidence) else self.above_1_confidence >= self.confidence

    @property
    def ratio_increasing_confident(self) -> bool | None:
        """R_L(B) increases with B: the Spearman interval lies above 0; None without an interval."""
        return None if math.isnan(self.spearman_ci[0]) else self.spearman_ci[0] > 0


def compare_optimizers(batches: Sequence[float], tokens_reference, tokens_candidate,
                       confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES,
                       rng_seed: int = BOOTSTRAP_RNG_SEED) -> SeedComparison:
    """`tokens_*[b, s]`: T_L of seed s at batch b (NaN: never reached). Seed s is the same seed label for both
    optimizers and every batch, so one draw of seeds per replicate resamples them all."""
    _check_confidence(confidence)
    batches = np.asarray(batches, dtype=float)
    ref, cand = np.asarray(tokens_reference, dtype=float), np.asarray(tokens_candidate, dtype=float)
    if ref.shape != cand.shape or ref.ndim != 2 or ref.shape[0] != len(batches) or ref.shape[1] < 1:
        raise ValueError(f"tokens must be (batches, seeds) arrays for {len(batches)} batches, got {ref.shape} and "
                         f"{cand.shape}")
    seeds = ref.shape[1]
    mean_ref, mean_cand = ref.mean(axis=1), cand.mean(axis=1)
    point = {"ref": mean_ref, "cand": mean_cand, "ratio": token_ratio(mean_ref, mean_cand),
             "diff": mean_ref - mean_cand}
    compared = np.isfinite(point["ratio"])
    rho = spearman(batches[compared], point["ratio"][compared])
    nan = np.full(len(batches), math.nan)
    intervals = {name: (nan, nan) for name in point}
    above_1, rho_ci = math.nan, (math.nan, math.nan)
    if seeds >= 2:
        draws = bootstrap_draws(seeds, resamples, rng_seed)
        rep_ref, rep_cand = ref[:, draws].mean(axis=2), cand[:, draws].mean(axis=2)  # (batches, resamples)
        replicates = {"ref": rep_ref, "cand": rep_cand, "ratio": token_ratio(rep_ref, rep_cand),
                      "diff": rep_ref - rep_cand}
        for name, reps in replicates.items():
            low, high = percentile_interval(reps, confidence)
            # A replicate may skip the seed that never reached L; the statistic itself is still undefined.
            defined = np.isfinite(point[name])
            intervals[name] = (np.where(defined, low, math.nan), np.where(defined, high, math.nan))
        if compared.any():
            ratios = replicates["ratio"][compared]
            above_1 = float(np.mean(np.all(ratios > 1, axis=0)))
            rho_ci = percentile_interval([spearman(batches[compared], ratios[:, r]) for r in range(resamples)],
                                         confidence)

    def estimate(name):
        return Estimate(point[name], *intervals[name])

    return SeedComparison(
        batches=batches, seeds=seeds, confidence=confidence, tokens_reference=estimate("ref"),
        tokens_candidate=estimate("cand"), ratio=estimate("ratio"), difference=estimate("diff"), compared=compared,
        above_1_confidence=above_1, spearman=rho, spearman_ci=rho_ci,
    )


@dataclass(frozen=True)
class RatioTable:
    rows: list[dict]  # one per (threshold, batch run by both optimizers): the study's CSV
    comparisons: list[SeedComparison]  # one per threshold
    batches: list[int]
    seeds: list[int]


def ratio_table(
    curves: Sequence[LossCurve],
    thresholds: Sequence[float],
    beta: float = DEFAULT_EMA,
    device_rule: DeviceRule | None = None,
    tokens_per_second: dict[str, float] | None = None,
    reference: str = "adamw",
    candidate: str = "muon",
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    rng_seed: int = BOOTSTRAP_RNG_SEED,
) -> RatioTable:
    """Rows of T (mean over seeds), S, R = T_ref / T_cand, T_ref - T_cand, with `*_ci_low` / `*_ci_high` columns,
    and the compute-time plane's devices and hours (devices from `device_rule`; hours from each optimizer's
    per-device throughput, by default the median measured over its runs). Every (optimizer, batch) must have run
    the same seeds: one draw of seed labels resamples them all."""
    by_key: dict[tuple[str, int, int], LossCurve] = {}
    for c in curves:
        key = (c.optimizer, c.batch_tokens, c.seed)
        if key in by_key:
            raise ValueError(f"two runs of {c.optimizer} at {c.batch_tokens} tokens per step with seed {c.seed}: "
                             "choose one per batch and seed")
        by_key[key] = c
    device_rule = device_rule or DeviceRule()
    if tokens_per_second is None:
        tokens_per_second = {
            name: float(np.nanmedian([c.tokens_per_second for c in curves if c.optimizer == name] or [math.nan]))
            for name in (reference, candidate)
        }
    seeds_of: dict[tuple[str, int], set[int]] = {}
    for name, batch, seed in by_key:
        seeds_of.setdefault((name, batch), set()).add(seed)
    batches = sorted({b for (name, b) in seeds_of if name == reference}
                     & {b for (name, b) in seeds_of if name == candidate})
    if not batches:
        raise ValueError(f"no batch size was run with both {reference} and {candidate}")
    seed_sets = {cell: seeds for cell, seeds in seeds_of.items() if cell[1] in batches}
    seeds = sorted(next(iter(seed_sets.values())))
    if any(sorted(s) != seeds for s in seed_sets.values()):
        raise ValueError("the (optimizer, batch) runs do not share one set of seeds, which the bootstrap resamples "
                         "together: " + ", ".join(f"{o}@{b}: {sorted(s)}" for (o, b), s in sorted(seed_sets.items())))
    rows, comparisons = [], []
    for threshold in thresholds:
        tokens = {name: [[by_key[name, b, s].tokens_to_loss(threshold, beta) for s in seeds] for b in batches]
                  for name in (reference, candidate)}
        comparison = compare_optimizers(batches, tokens[reference], tokens[candidate], confidence, resamples, rng_seed)
        comparisons.append(comparison)
        for i, batch in enumerate(batches):
            row = dict(threshold=float(threshold), batch_tokens=batch, seeds=len(seeds))
            for column, estimate in ((f"tokens_{reference}", comparison.tokens_reference),
                                     (f"tokens_{candidate}", comparison.tokens_candidate),
                                     ("ratio", comparison.ratio), ("token_difference", comparison.difference)):
                row.update({column: float(estimate.value[i]), f"{column}_ci_low": float(estimate.ci_low[i]),
                            f"{column}_ci_high": float(estimate.ci_high[i])})
            devices = device_rule(batch)
            row.update({f"steps_{name}": row[f"tokens_{name}"] / batch for name in (reference, candidate)})
            row["devices"] = devices
            row.update({f"hours_{name}": hours_to_loss(row[f"tokens_{name}"], devices, tokens_per_second[name])
                        for name in (reference, candidate)})
            rows.append(row)
    return RatioTable(rows=rows, comparisons=comparisons, batches=batches, seeds=seeds)
