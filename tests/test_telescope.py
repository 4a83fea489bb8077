"""The telescoping planner (Algorithm 1 of arXiv 2505.02222): grids, centring, cost accounting, bad input."""

import math

import pytest

from megatron_muon.sweep.telescope import LogRange, argmin_point, economics, plan_telescope, points_at_stage

LR = LogRange("lr", 1e-3, 1e-1)
WD = LogRange("wd", 1e-3, 1.0)


def paper_plan(**kw):
    return plan_telescope(base_width=2, calibration_width=16, ranges=[LR, WD], base_points=8, **kw)


def test_paper_case_is_8x8_4x4_2x2_1x1_with_halving_spacing():
    plan = paper_plan()
    assert [s.width for s in plan.stages] == [2, 4, 8, 16]
    assert [s.points for s in plan.stages] == [8, 4, 2, 1]
    assert [s.runs for s in plan.stages] == [64, 16, 4, 1]
    base = (math.log(100) / 7, math.log(1000) / 7)
    for s in plan.stages:
        assert s.spacing == pytest.approx(tuple(b / 2 ** s.index for b in base))


def test_base_grid_spans_the_ranges_exactly_with_log_spacing():
    plan = paper_plan()
    grid = plan.stages[0].grid(plan.base_log_centre)
    lrs = sorted({p[0] for p in grid})
    wds = sorted({p[1] for p in grid})
    assert len(grid) == 64 and len(lrs) == 8 and len(wds) == 8
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-1)
    assert wds[0] == pytest.approx(1e-3) and wds[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([100 ** (1 / 7)] * 7)


def test_later_stages_centre_on_the_previous_optimum_at_half_the_spacing():
    plan = paper_plan()
    optimum = (math.log(0.01), math.log(0.05))
    grid = plan.stages[1].grid(optimum)
    lrs = sorted({p[0] for p in grid})
    step = math.exp(plan.stages[1].spacing[0])
    # 4 points, symmetric around the optimum: +-0.5 and +-1.5 steps.
    assert lrs == pytest.approx([0.01 * step ** o for o in (-1.5, -0.5, 0.5, 1.5)])
    assert plan.stages[1].spacing[0] == pytest.approx(plan.stages[0].spacing[0] / 2)
    single = plan.stages[3].grid(optimum)
    assert single == [pytest.approx((0.01, 0.05))]


def test_k3_points_follow_4_to_the_minus_one_third():
    ranges = [LR, WD, LogRange("warmup", 10, 1000)]
    plan = plan_telescope(32, 512, ranges, base_points=8)
    # 8 * 4^(-s/3) = 8, 5.04, 3.17, 2.0, 1.26
    assert [s.points for s in plan.stages] == [8, 5, 3, 2, 1]
    assert [s.runs for s in plan.stages] == [512, 125, 27, 8, 1]
    assert len(plan.stages[1].grid((0.0, 0.0, 0.0))) == 125
    assert points_at_stage(8, 3, 3) == 2
    assert [points_at_stage(6, s, 2) for s in range(4)] == [6, 3, 2, 1]  # 1.5 rounds up
    assert [points_at_stage(10, s, 2) for s in range(3)] == [10, 5, 3]  # 2.5 rounds up


def test_cost_accounting_matches_the_paper_constant_stage_cost():
    plan = paper_plan()
    # Stage s: 64 / 4^s runs at (2^(s+1) / 16)^2 = 4^s / 64 of a final run: each stage costs exactly 1.
    assert [s.cost for s in plan.stages] == pytest.approx([1, 1, 1, 1])
    assert plan.sweep_cost == pytest.approx(4)
    assert plan.final_run_share == pytest.approx(0.2)
    assert plan.brute_force_cost == 64
    assert plan.saving_vs_brute_force == pytest.approx(1 - 5 / 64)
    wider = paper_plan(final_width=64)
    assert wider.sweep_cost == pytest.approx(4 / 16)
    assert wider.final_run_share == pytest.approx(1 / 1.25)


def test_economics_spans_the_papers_20_to_99_percent_final_share():
    at_calibration = economics(64, 4, 1.0)
    assert at_calibration["final_run_share"] == pytest.approx(0.2)
    # G = 4, two levels, Nc = N/16: a 2x2 grid at N/32 and one run at N/16 cost 2/256 of the final run.
    far = economics(4, 2, 1 / 16)
    assert far["sweep_cost"] == pytest.approx(2 / 256)
    assert far["final_run_share"] > 0.99
    assert economics(256, 2, 1 / 16)["sweep_cost"] == pytest.approx(128 / 256)
    # More levels at the same Nc/N start the full grid at a smaller width: more saved (the paper's "large N").
    assert economics(64, 4, 0.5)["final_run_share"] == pytest.approx(0.5)
    assert economics(64, 2, 0.5)["final_run_share"] == pytest.approx(1 / 9)
    with pytest.raises(ValueError, match="not a 2-th power"):
        economics(60, 4, 1.0)


def test_argmin_ignores_diverged_runs_and_refuses_an_all_diverged_stage():
    assert argmin_point([((1.0,), math.nan), ((2.0,), 3.0), ((3.0,), math.inf), ((4.0,), 2.5)]) == (4.0,)
    with pytest.raises(ValueError, match="no run"):
        argmin_point([((1.0,), math.nan)])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LogRange("lr", 1e-3, 1e-3), "empty range"),
        (lambda: LogRange("lr", 1e-1, 1e-3), "inverted range"),
        (lambda: LogRange("lr", 0.0, 1e-3), "positive"),
        (lambda: LogRange("", 1e-3, 1e-1), "identifier"),
        (lambda: plan_telescope(2, 16, [], 8), "k = 0"),
        (lambda: plan_telescope(2, 12, [LR], 8), "not base width 2 doubled"),
        (lambda: plan_telescope(3, 16, [LR], 8), "not base width 3 doubled"),
        (lambda: plan_telescope(16, 2, [LR], 8), "widths must satisfy"),
        (lambda: plan_telescope(2, 16, [LR], 1), "at least 2 points"),
        (lambda: plan_telescope(2, 16, [LR, LR], 8), "duplicate"),
        (lambda: plan_telescope(2, 16, [LR], 8, final_width=8), "below the calibration width"),
    ],
)
def test_bad_input_is_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_single_stage_when_base_equals_calibration_width():
    plan = plan_telescope(64, 64, [LR], 5)
    assert [s.runs for s in plan.stages] == [5]
    assert plan.stages[0].cost == pytest.approx(5)
