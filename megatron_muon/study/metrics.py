"""Statistics of the batch-size study of arXiv 2505.02222 (Sec. 2.3-2.5, App. D, F; Figs. 1-4, 8-12).

Inputs are loss curves: (tokens seen, loss on a fresh batch) pairs of one run of one optimizer at one global
batch size. Everything here is pure numpy.

Smoothing, stated because the paper does not (its Fig. 7 uses an EMA of 0.95): the curve is an exponential moving
average over logged points, debiased like TensorBoard's (divided by 1 - beta^(i+1)), so the first points are not
pulled towards 0. Points are assumed evenly spaced in steps.

Tokens to loss: T_L = tokens at which the smoothed curve first reaches L or below, linearly interpolated between
the last point above L and the first point at or below it, so the answer does not snap to the logging interval.
NaN when the run never reaches L. Steps to loss S_L = T_L / tokens per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_EMA = 0.95


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


def is_non_decreasing(values: Sequence[float], rtol: float = 0.0) -> bool:
    """Each finite value is at least (1 - rtol) x its finite predecessor (the paper's claim about R_L(B))."""
    finite = [v for v in values if math.isfinite(v)]
    return all(b >= a * (1 - rtol) for a, b in zip(finite, finite[1:]))


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


def ratio_table(
    curves: Sequence[LossCurve],
    thresholds: Sequence[float],
    beta: float = DEFAULT_EMA,
    device_rule: DeviceRule | None = None,
    tokens_per_second: dict[str, float] | None = None,
    reference: str = "adamw",
    candidate: str = "muon",
) -> list[dict]:
    """One row per (threshold, batch size run by both optimizers): T, S, R = T_ref / T_cand, T_ref - T_cand, and
    the compute-time plane's devices and hours (devices from `device_rule`; hours from each optimizer's
    per-device throughput, by default the median measured over its runs)."""
    by_key: dict[tuple[str, int], LossCurve] = {}
    for c in curves:
        key = (c.optimizer, c.batch_tokens)
        if key in by_key:
            raise ValueError(f"two runs of {c.optimizer} at {c.batch_tokens} tokens per step: choose one per batch")
        by_key[key] = c
    device_rule = device_rule or DeviceRule()
    if tokens_per_second is None:
        tokens_per_second = {
            name: float(np.nanmedian([c.tokens_per_second for c in curves if c.optimizer == name] or [math.nan]))
            for name in (reference, candidate)
        }
    batches = sorted({b for (name, b) in by_key if name == reference} & {b for (name, b) in by_key if name == candidate})
    if not batches:
        raise ValueError(f"no batch size was run with both {reference} and {candidate}")
    rows = []
    for threshold in thresholds:
        for batch in batches:
            t_ref = by_key[reference, batch].tokens_to_loss(threshold, beta)
            t_cand = by_key[candidate, batch].tokens_to_loss(threshold, beta)
            devices = device_rule(batch)
            rows.append(dict(
                threshold=float(threshold), batch_tokens=batch,
                **{f"tokens_{reference}": t_ref, f"tokens_{candidate}": t_cand},
                ratio=float(token_ratio(t_ref, t_cand)), token_difference=t_ref - t_cand,
                **{f"steps_{reference}": t_ref / batch, f"steps_{candidate}": t_cand / batch},
                devices=devices,
                **{f"hours_{name}": hours_to_loss(t, devices, tokens_per_second[name])
                   for name, t in ((reference, t_ref), (candidate, t_cand))},
            ))
    return rows
