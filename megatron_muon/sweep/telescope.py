"""The telescoping hyperparameter search of arXiv 2505.02222 (Algorithm 1, Sec. 3.3; economics of App. H, Fig. 13).

A full grid of m0 points per hyperparameter (m0^k runs) is swept at the base width N0. Then, per doubling of the
width up to the calibration width Nc, the points per hyperparameter shrink by 4^(-1/k) and the mesh spacing
halves, centred on the previous stage's optimum. Doubling the width quadruples the cost of a run while the run
count falls by 4, so every stage costs about the same and the whole search costs O(C log N) for a final run of
cost C.

Grids live in log space: a hyperparameter with range [low, high] and m0 points has base spacing
ln(high / low) / (m0 - 1), and stage s has spacing base / 2^s. Point counts are m0 * 4^(-s/k) rounded (8, 4, 2, 1
for the paper's k = 2, m0 = 8; the paper ran 8, 5, 3 and 3 "approximately following" it), never below 1. The
planner is pure: a later stage's grid is offsets from a centre that only the previous stage's results decide.

Costs are in units of the final run: a run at width n costs (n / N)^cost_exponent of one at the final width N
(2 = the paper's "doubling width is about 4x cost", which holds when every run sees the same tokens and the
width-squared matrices dominate the FLOPs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LogRange:
    """One hyperparameter swept on a log scale over [low, high] at the base width."""

    name: str
    low: float
    high: float

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"hyperparameter name {self.name!r} must be a non-empty identifier")
        if not (self.low > 0 and self.high > 0 and math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"{self.name}: range [{self.low}, {self.high}] must be positive and finite (log scale)")
        if self.high < self.low:
            raise ValueError(f"{self.name}: inverted range, low {self.low} > high {self.high}")
        if self.high == self.low:
            raise ValueError(f"{self.name}: empty range, low == high == {self.low}")

    @property
    def log_span(self) -> float:
        return math.log(self.high) - math.log(self.low)

    @property
    def log_centre(self) -> float:
        return 0.5 * (math.log(self.low) + math.log(self.high))


@dataclass(frozen=True)
class Stage:
    """One level of the telescope: a grid of `points`^k runs at `width`, log spacing `spacing` per hyperparameter."""

    index: int
    width: int
    points: int
    spacing: tuple[float, ...]
    cost_per_run: float  # relative to one run at the final width

    @property
    def runs(self) -> int:
        return self.points ** len(self.spacing)

    @property
    def cost(self) -> float:
        return self.runs * self.cost_per_run

    def offsets(self) -> list[tuple[int, ...]]:
        """Grid positions as integers, symmetric around the centre in half-steps: 2 * (i - (points - 1) / 2)."""
        half_steps = [2 * i - (self.points - 1) for i in range(self.points)]
        return list(itertools.product(half_steps, repeat=len(self.spacing)))

    def log_point(self, log_centre: Sequence[float], offset: Sequence[int]) -> tuple[float, ...]:
        return tuple(c + 0.5 * o * s for c, o, s in zip(log_centre, offset, self.spacing))

    def grid(self, log_centre: Sequence[float]) -> list[tuple[float, ...]]:
        """Hyperparameter values (not logs) of every run of this stage around `log_centre`."""
        if len(log_centre) != len(self.spacing):
            raise ValueError(f"centre has {len(log_centre)} coordinates, the stage sweeps {len(self.spacing)}")
        return [tuple(math.exp(v) for v in self.log_point(log_centre, o)) for o in self.offsets()]


@dataclass(frozen=True)
class TelescopePlan:
    ranges: tuple[LogRange, ...]
    stages: tuple[Stage, ...]
    final_width: int
    cost_exponent: float

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.ranges)

    @property
    def base_log_centre(self) -> tuple[float, ...]:
        """Stage 0 is centred on the middle of every range, which puts its corners exactly on low and high."""
        return tuple(r.log_centre for r in self.ranges)

    @property
    def sweep_cost(self) -> float:
        """All stages, in units of one final run."""
        return sum(s.cost for s in self.stages)

    @property
    def total_cost(self) -> float:
        """Sweep plus the final run."""
        return self.sweep_cost + 1.0

    @property
    def final_run_share(self) -> float:
        return 1.0 / self.total_cost

    @property
    def brute_force_cost(self) -> float:
        """The base grid run at the final width; its best run is the final model, so nothing is added."""
        return float(self.stages[0].runs)

    @property
    def saving_vs_brute_force(self) -> float:
        """Fraction of the brute-force compute that telescoping (sweep + final run) saves; negative if it costs more."""
        return 1.0 - self.total_cost / self.brute_force_cost

    def final_cell(self) -> tuple[float, ...]:
        """Log spacing of the last stage per hyperparameter: the resolution the telescope claims."""
        return self.stages[-1].spacing

    def stage_table(self) -> list[dict]:
        rows = []
        for s in self.stages:
            rows.append(dict(
                stage=s.index, width=s.width, points=s.points, runs=s.runs,
                **{f"{r.name}_step": math.exp(sp) for r, sp in zip(self.ranges, s.spacing)},
                cost_per_run=s.cost_per_run, stage_cost=s.cost, share_of_total=s.cost / self.total_cost,
            ))
        return rows


def is_power_of_two(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def points_at_stage(base_points: int, stage: int, k: int) -> int:
    """m0 * 4^(-stage/k), rounded half up from the closed form so rounding errors do not compound across stages
    (Python's round() would send 2.5 to 2 but 3.5 to 4)."""
    return max(1, math.floor(base_points * 4.0 ** (-stage / k) + 0.5))


def plan_telescope(
    base_width: int,
    calibration_width: int,
    ranges: Sequence[LogRange],
    base_points: int,
    final_width: int | None = None,
    cost_exponent: float = 2.0,
) -> TelescopePlan:
    """Algorithm 1's stages from N0 = base_width to Nc = calibration_width (a power-of-two multiple of N0)."""
    ranges = tuple(ranges)
    k = len(ranges)
    if k == 0:
        raise ValueError("k = 0: give at least one hyperparameter range to sweep")
    if len({r.name for r in ranges}) != k:
        raise ValueError(f"duplicate hyperparameter names in {[r.name for r in ranges]}")
    if base_points < 2:
        raise ValueError(f"base grid needs at least 2 points per hyperparameter (got {base_points}): "
                         "one point has no spacing to refine")
    if base_width < 1 or calibration_width < base_width:
        raise ValueError(f"widths must satisfy 1 <= base {base_width} <= calibration {calibration_width}")
    ratio, remainder = divmod(calibration_width, base_width)
    if remainder or not is_power_of_two(ratio):
        raise ValueError(f"calibration width {calibration_width} is not base width {base_width} doubled a whole "
                         f"number of times (the telescope doubles the width per stage)")
    final_width = calibration_width if final_width is None else final_width
    if final_width < calibration_width:
        raise ValueError(f"final width {final_width} is below the calibration width {calibration_width}")
    if cost_exponent <= 0:
        raise ValueError(f"cost exponent must be positive, got {cost_exponent}")
    base_spacing = [r.log_span / (base_points - 1) for r in ranges]
    stages = []
    for index in range(int(math.log2(ratio)) + 1):
        width = base_width * 2 ** index
        stages.append(Stage(
            index=index,
            width=width,
            points=points_at_stage(base_points, index, k),
            spacing=tuple(s / 2 ** index for s in base_spacing),
            cost_per_run=(width / final_width) ** cost_exponent,
        ))
    return TelescopePlan(ranges=ranges, stages=tuple(stages), final_width=final_width, cost_exponent=cost_exponent)


def argmin_point(results: Iterable[tuple[tuple[float, ...], float]]) -> tuple[float, ...]:
    """The point of lowest loss; NaN or infinite losses (diverged runs) never win. Ties keep the first point."""
    best_point, best_loss = None, math.inf
    for point, loss in results:
        if loss is not None and math.isfinite(loss) and loss < best_loss:
            best_point, best_loss = point, loss
    if best_point is None:
        raise ValueError("no run of the stage finished with a finite loss: nothing to centre the next stage on")
    return best_point


def economics(
    base_grid_runs: int,
    levels: int,
    calibration_over_final: float,
    k: int = 2,
    cost_exponent: float = 2.0,
) -> dict:
    """Fig. 13's two numbers for a G-run base grid, `levels` stages, and Nc / N.

    G must be a k-th power (m0^k). Returns the sweep cost, the final run's share of the total and the saving
    against a brute-force G-run grid at the final width, all with the planner's rounded point counts.
    """
    base_points = round(base_grid_runs ** (1.0 / k))
    if base_points ** k != base_grid_runs:
        raise ValueError(f"{base_grid_runs} base grid runs is not a {k}-th power")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if not 0 < calibration_over_final <= 1:
        raise ValueError(f"Nc / N must be in (0, 1], got {calibration_over_final}")
    ranges = [LogRange(f"h{i}", 1.0, 2.0) for i in range(k)]
    base_width = 1
    calibration_width = 2 ** (levels - 1)
    plan = plan_telescope(
        base_width, calibration_width, ranges, base_points,
        # Widths are only used as ratios: express N through Nc / N without requiring an integer width.
        final_width=calibration_width, cost_exponent=cost_exponent,
    )
    scale = calibration_over_final ** cost_exponent
    sweep = plan.sweep_cost * scale
    total = sweep + 1.0
    return dict(
        base_grid_runs=base_grid_runs, levels=levels, calibration_over_final=calibration_over_final,
        sweep_cost=sweep, final_run_share=1.0 / total, saving_vs_brute_force=1.0 - total / base_grid_runs,
    )
