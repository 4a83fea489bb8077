"""What a telescoping sweep found, from its store alone: surfaces, distributions, drift, fit, brute-force check.

Files written to the report directory:
    stage<s>_surface.png   loss over the first two hyperparameters at stage s (others at the stage optimum),
                           log axes, optimum marked with red lines as in the paper's Fig. 6; diverged cells grey
    surfaces.png           every stage's cells on one pair of axes: the telescope zooming in
    loss_distribution.png  per stage: all losses (capped) and their minimum, plus L(d) = A/d^alpha + E fitted to the
                           per-stage minima against width (Fig. 14)
    drift.png              the chosen value of each hyperparameter against width, with the stage's grid step
    report.md, summary.json

A grid point run with several seeds counts as its mean over seeds (a diverged seed makes it inf); its spread over
seeds (mean, std, bootstrap interval of the mean) is reported with each stage's optimum. The brute-force
comparison judges the telescope's miss with that noise: the loss difference between the telescope's choice and the
brute-force optimum, paired seed by seed, with its bootstrap interval, is reported as within the seed noise when
the interval holds 0. A refined brute force (`sweep brute --refine-top K`) ran every point at one seed and its best
K with every seed; its optimum is the best mean among those K.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from megatron_muon.study.metrics import DEFAULT_CONFIDENCE, power_law_fit, seed_spread  # noqa: E402
from megatron_muon.sweep.runner import GridPoint, TelescopeConfig, brute_force_optimum, grid_points  # noqa: E402
from megatron_muon.sweep.store import ResultStore, Trial  # noqa: E402
from megatron_muon.sweep.telescope import TelescopePlan, economics  # noqa: E402


def format_plan(plan: TelescopePlan) -> str:
    names = plan.names
    lines = [f"telescope: {len(plan.stages)} stages, k = {len(names)} ({', '.join(names)}), final width "
             f"{plan.final_width}, run cost ~ width^{plan.cost_exponent:g}",
             f"{'stage':>5} {'width':>6} {'points':>6} {'runs':>6} "
             + " ".join(f"{n + ' step':>10}" for n in names)
             + f" {'cost/run':>9} {'stage cost':>10} {'% total':>8}"]
    for row in plan.stage_table():
        lines.append(f"{row['stage']:>5} {row['width']:>6} {row['points']:>6} {row['runs']:>6} "
                     + " ".join(f"{'x' + format(row[n + '_step'], '.4g'):>10}" for n in names)
                     + f" {row['cost_per_run']:>9.4g} {row['stage_cost']:>10.4g} {100 * row['share_of_total']:>7.1f}%")
    lines += [
        f"sweep cost {plan.sweep_cost:.4g} final runs; final run = {100 * plan.final_run_share:.1f}% of sweep + final",
        f"brute force (base grid of {plan.stages[0].runs} runs at the final width) costs {plan.brute_force_cost:.4g}; "
        f"telescoping saves {100 * plan.saving_vs_brute_force:.1f}%",
        "base grid: " + ", ".join(f"{r.name} in [{r.low:g}, {r.high:g}]" for r in plan.ranges),
    ]
    return "\n".join(lines)


def economics_figure(grid_runs, levels, out: Path) -> list[dict]:
    """Fig. 13 (App. H): both panels against Nc/N, one line per (G, levels); returns the table."""
    ratios = [2.0 ** -j for j in range(0, 7)]
    rows = [economics(g, n, r) for g in grid_runs for n in levels for r in ratios]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for g in grid_runs:
        for n in levels:
            sel = [r for r in rows if r["base_grid_runs"] == g and r["levels"] == n]
            x = [r["calibration_over_final"] for r in sel]
            label = f"G={g}, levels={n}"
            left.plot(x, [100 * r["saving_vs_brute_force"] for r in sel], marker="o", ms=3, label=label)
            right.plot(x, [100 * r["final_run_share"] for r in sel], marker="o", ms=3, label=label)
    for ax, ylabel in ((left, "% compute saved vs brute-force grid at N"), (right, "% of total compute on final run")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("Nc / N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return rows


def _stage_offsets(point: GridPoint, names) -> tuple[int, ...]:
    """The grid position encoded in the key (name+offset per hyperparameter), e.g. telescope/s1/lr-1/wd+3."""
    return tuple(int(part[len(name):]) for part, name in zip(point.key.split("/")[2:], names))


def _surface(ax, points, names, spacing, objective, norm, best_params):
    """Cells of one stage on log axes; returns the mappable. Hyperparameters past the second are held at the best."""
    if len(names) > 2:
        points = [p for p in points if all(math.isclose(p.params[n], best_params[n], rel_tol=1e-9) for n in names[2:])]
    mappable = None
    for p in points:
        x, y = math.log(p.params[names[0]]), (math.log(p.params[names[1]]) if len(names) > 1 else 0.0)
        hx, hy = spacing[0] / 2, (spacing[1] / 2 if len(names) > 1 else 0.5)
        loss = p.loss(objective)
        value = np.array([[loss if math.isfinite(loss) else np.nan]])
        mappable = ax.pcolormesh(np.exp([x - hx, x + hx]), np.exp([y - hy, y + hy]) if len(names) > 1 else [0, 1],
                                 np.ma.masked_invalid(value), cmap="viridis", norm=norm, edgecolors="white",
                                 linewidth=0.3)
    return mappable


def _stage_plot(path, title, points, names, spacing, objective, norm, best):
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.set_facecolor("0.75")  # diverged cells are masked: grey shows through
    mappable = _surface(ax, points, names, spacing, objective, norm, best.params)
    _finish_axes(ax, names, best)
    fig.colorbar(mappable, ax=ax, label=f"{objective} loss")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _finish_axes(ax, names, best):
    ax.set_xscale("log")
    ax.set_xlabel(names[0])
    ax.axvline(best.params[names[0]], color="red", lw=1)
    if len(names) > 1:
        ax.set_yscale("log")
        ax.set_ylabel(names[1])
        ax.axhline(best.params[names[1]], color="red", lw=1)
    else:
        ax.set_yticks([])


def write_report(store: ResultStore, out_dir: Path, loss_cap: float | None = None,
                 brute_force_stores: tuple[ResultStore, ...] = ()) -> dict:
    """`brute_force_stores`: other stores of the same config whose brute-force grids ran beside the telescope
    (a store admits one runner at a time, so a concurrent brute force needs its own)."""
    if store.config.get("kind") != "telescope":
        raise ValueError(f"{store.path} holds a {store.config.get('kind')!r} run, not a telescoping sweep")
    config = TelescopeConfig.from_fingerprint_dict(store.config)
    plan = config.plan()
    names = plan.names
    objective = config.objective
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    by_stage: dict[int, list[Trial]] = defaultdict(list)
    for t in store.trials(kind="telescope"):
        by_stage[t.stage].append(t)
    points_by_stage = {stage: grid_points(trials) for stage, trials in by_stage.items()}
    finite = [loss for points in points_by_stage.values() for p in points
              if p.finished and math.isfinite(loss := p.loss(objective))]
    if not finite:
        raise ValueError(f"{store.path} has no finished trial yet")
    vmax = min(max(finite), loss_cap) if loss_cap else max(finite)
    norm = matplotlib.colors.Normalize(vmin=min(finite), vmax=vmax)

    stages, best_by_stage = [], {}
    for stage in plan.stages:
        trials = by_stage.get(stage.index, [])
        seeds = len(config.seed_values(stage))
        finished = [p for p in points_by_stage.get(stage.index, []) if p.finished and math.isfinite(p.loss(objective))]
        row = dict(stage=stage.index, width=stage.width, runs=stage.runs * seeds, seeds=seeds,
                   finished=sum(t.finished for t in trials), diverged=sum(t.status == "diverged" for t in trials))
        if finished:
            best = min(finished, key=lambda p: p.loss(objective))
            best_by_stage[stage.index] = best
            edge = stage.points - 1  # offsets are in half-steps: the outermost points sit at +-(points - 1)
            row.update(
                best_loss=best.loss(objective),
                best_spread=asdict(seed_spread(best.values(objective))),
                chosen={n: best.params[n] for n in names},
                on_grid_edge=stage.points > 1 and any(abs(o) == edge for o in _stage_offsets(best, names)),
                losses=sorted(p.loss(objective) for p in finished),
            )
            prev = best_by_stage.get(stage.index - 1)
            if prev is not None:
                row["drift_factor"] = {n: best.params[n] / prev.params[n] for n in names}
            _stage_plot(out_dir / f"stage{stage.index}_surface.png",
                        f"stage {stage.index}: width {stage.width}, {len(finished)}/{stage.runs} points, "
                        f"best {best.loss(objective):.4f}" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""),
                        finished, names, stage.spacing, objective, norm, best)
        stages.append(row)

    if best_by_stage:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.set_facecolor("0.75")
        mappable = None
        for stage in plan.stages:
            if stage.index in best_by_stage:
                finished = [p for p in points_by_stage[stage.index] if p.finished]
                mappable = _surface(ax, finished, names, stage.spacing, objective, norm, best_by_stage[stage.index].params)
        _finish_axes(ax, names, best_by_stage[max(best_by_stage)])
        fig.colorbar(mappable, ax=ax, label=f"{objective} loss")
        ax.set_title("all stages (later stages drawn on top)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "surfaces.png", dpi=130)
        plt.close(fig)

    fit = _distribution_plot(out_dir / "loss_distribution.png", stages, loss_cap)
    _drift_plot(out_dir / "drift.png", plan, best_by_stage, names)
    for other in brute_force_stores:
        if other.config != store.config:
            raise ValueError(f"{other.path} was made for a different sweep config than {store.path}")
    brute_trials = [t for s in (store, *brute_force_stores) for t in s.trials(kind="brute_force")]
    brute = _brute_force_comparison(store, brute_trials, plan, best_by_stage, objective)

    last = best_by_stage.get(plan.stages[-1].index)
    summary = dict(
        store=str(store.path), objective=objective, complete=last is not None and stages[-1]["finished"] == stages[-1]["runs"],
        chosen={n: last.params[n] for n in names} if last else None,
        chosen_spread=stages[-1].get("best_spread"), seeds=config.seeds, seed_every_stage=config.seed_every_stage,
        planned_sweep_cost=plan.sweep_cost, planned_final_run_share=plan.final_run_share,
        stages=[{k: v for k, v in s.items() if k != "losses"} for s in stages],
        power_law=fit, brute_force=brute,
    )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out_dir / "report.md").write_text(_markdown(summary, plan, names))
    return summary


def _distribution_plot(path: Path, stages: list[dict], loss_cap: float | None) -> dict | None:
    with_losses = [s for s in stages if s.get("losses")]
    if not with_losses:
        return None
    fit = None
    if len(with_losses) >= 3:
        widths = [s["width"] for s in with_losses]
        f = power_law_fit(widths, [s["best_loss"] for s in with_losses])
        fit = dict(A=f.A, alpha=f.alpha, E=f.E, r_squared=f.r_squared, alpha_at_bound=f.alpha_at_bound,
                   widths=len(widths))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rng = np.random.default_rng(0)
    for i, s in enumerate(with_losses):
        losses = np.array(s["losses"])
        if loss_cap:
            losses = np.minimum(losses, loss_cap)
        left.scatter(i + rng.uniform(-0.15, 0.15, len(losses)), losses, s=10, alpha=0.6)
        left.scatter([i], [s["best_loss"]], marker="_", s=300, color="red")
    left.set_xticks(range(len(with_losses)), [f"s{s['stage']}\nw{s['width']}" for s in with_losses])
    left.set_ylabel("loss" + (f" (capped at {loss_cap})" if loss_cap else ""))
    left.set_title("loss per stage (red: minimum)", fontsize=9)
    widths = np.array([s["width"] for s in with_losses], dtype=float)
    right.plot(widths, [s["best_loss"] for s in with_losses], "o", label="stage minimum")
    if fit:
        d = np.geomspace(widths.min(), widths.max(), 50)
        right.plot(d, fit["A"] / d ** fit["alpha"] + fit["E"],
                   label=f"{fit['A']:.3g}/d^{fit['alpha']:.3f} + {fit['E']:.3f}, R²={fit['r_squared']:.3f}")
    right.set_xscale("log", base=2)
    right.set_xlabel("width d")
    right.set_ylabel("minimum loss")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return fit


def _drift_plot(path: Path, plan: TelescopePlan, best_by_stage: dict, names) -> None:
    if not best_by_stage:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[0], names)):
        stages = [s for s in plan.stages if s.index in best_by_stage]
        values = np.array([best_by_stage[s.index].params[name] for s in stages])
        step = np.array([math.exp(s.spacing[j]) for s in stages])
        ax.errorbar([s.width for s in stages], values, yerr=[values - values / np.sqrt(step), values * np.sqrt(step) - values],
                    marker="o", capsize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_ylabel(f"chosen {name} (bar: +- half a grid step)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _brute_force_comparison(store, brute_trials, plan, best_by_stage, objective) -> list[dict]:
    """Per brute-force grid in the store: its optimum against the telescope's final choice, in grid cells and in
    loss with the seed noise, and the telescope's cost as a share of the brute force's (model cost units ~ width^p,
    and measured wall time)."""
    groups: dict[tuple[int, str], list[Trial]] = defaultdict(list)
    for t in brute_trials:
        groups[t.width, t.key.split("/")[2]].append(t)
    if not groups or not best_by_stage:
        return []
    names = plan.names
    final_stage = plan.stages[-1]
    chosen = best_by_stage.get(final_stage.index)
    telescope_trials = [t for t in store.trials(kind="telescope") if t.finished]
    telescope_cost = sum((t.width / plan.final_width) ** plan.cost_exponent for t in telescope_trials)
    telescope_wall = sum(t.wall_s or 0.0 for t in telescope_trials)
    out = []
    for (width, points_tag), trials in sorted(groups.items()):
        grid = grid_points(trials)
        brute_best = brute_force_optimum(grid, objective)
        if brute_best is None:
            continue
        finished = [p for p in grid if p.finished and math.isfinite(p.loss(objective))]
        points = int(points_tag[1:])
        brute_cell = [r.log_span / (points - 1) for r in plan.ranges]
        seeds = len(brute_best.trials)
        row = dict(width=width, points=points, seeds=seeds, runs=len(trials),
                   seeded_points=sum(len(p.trials) == seeds for p in grid),
                   finished=sum(t.finished and math.isfinite(t.objective(objective)) for t in trials),
                   optimum={n: brute_best.params[n] for n in names}, optimum_loss=brute_best.loss(objective),
                   optimum_spread=asdict(seed_spread(brute_best.values(objective))))
        if chosen is not None:
            distance = [abs(math.log(chosen.params[n] / brute_best.params[n])) for n in names]
            within_cell = all(d <= s * (1 + 1e-9) for d, s in zip(distance, brute_cell))
            difference = paired_difference(chosen, brute_best, objective)
            within_noise = difference.contains(0.0)
            row.update(
                telescope_choice={n: chosen.params[n] for n in names},
                telescope_final_stage_loss=chosen.loss(objective),
                distance_in_final_cells={n: d / s for n, d, s in zip(names, distance, final_stage.spacing)},
                distance_in_brute_cells={n: d / s for n, d, s in zip(names, distance, brute_cell)},
                within_one_brute_cell=within_cell,
                loss_difference=asdict(difference),
                difference_within_seed_noise=within_noise,
                within_one_brute_cell_or_seed_noise=within_cell or bool(within_noise),
                telescope_cost_share=telescope_cost / (len(trials) * (width / plan.final_width) ** plan.cost_exponent),
                telescope_wall_share=telescope_wall / max(1e-9, sum(t.wall_s or 0.0 for t in trials)),
            )
            # The brute grid's loss at the telescope's point, when the point lies on that grid.
            same = [p for p in finished
                    if all(math.isclose(p.params[n], chosen.params[n], rel_tol=1e-6) for n in names)]
            if same:
                row["brute_loss_at_telescope_choice"] = same[0].loss(objective)
        out.append(row)
    return out


def paired_difference(a: GridPoint, b: GridPoint, objective: str):
    """a's loss - b's per seed (the telescope's choice and the brute-force optimum, say), with the spread of its
    mean. Pairs need one set of seed labels: seed i trains both points from the same init and data order at one
    width, so pairing cancels what they share. Without common seeds (or with one) the difference has no interval."""
    seeds = [t.params.get("seed") for t in a.trials]
    by_seed = {t.params.get("seed"): t.objective(objective) for t in b.trials}
    if len(seeds) > 1 and sorted(seeds) == sorted(by_seed):
        return seed_spread([t.objective(objective) - by_seed[t.params.get("seed")] for t in a.trials])
    return seed_spread([a.loss(objective) - b.loss(objective)])


def _fmt(d: dict | None) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in d.items()) if d else ""


def _with_spread(spread: dict | None, loss: float = math.nan) -> str:
    """"3.1748" for one seed; "3.1748 +- 0.0040 [3.1710, 3.1790] (3 seeds)" with the spread over several."""
    if not spread:
        return f"{loss:.4f}"
    text = f"{spread['mean']:.4f}"
    if spread["seeds"] > 1 and math.isfinite(spread["std"]):
        text += f" +- {spread['std']:.4f} [{spread['ci_low']:.4f}, {spread['ci_high']:.4f}] ({spread['seeds']} seeds)"
    return text


def _markdown(summary: dict, plan: TelescopePlan, names) -> str:
    seeds = ""
    if summary["seeds"] > 1:
        where = "every stage" if summary["seed_every_stage"] else "the final stage"
        seeds = (f" Seeds: {summary['seeds']} per grid point of {where} and of the brute-force grid; a point's loss is "
                 f"its mean over seeds, +- the std over seeds, [{100 * DEFAULT_CONFIDENCE:g}% bootstrap interval of "
                 "the mean].")
    lines = ["# Telescoping sweep report", "", "```", format_plan(plan), "```", "",
             f"Objective: {summary['objective']} loss. Complete: {summary['complete']}. "
             f"Chosen: {_fmt(summary['chosen'])}.{seeds}", "",
             "| stage | width | finished / runs | diverged | best loss | chosen | drift vs previous | on grid edge |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['stage']} | {s['width']} | {s['finished']} / {s['runs']} | {s['diverged']} | "
                     f"{_with_spread(s.get('best_spread'), s.get('best_loss', math.nan))} | {_fmt(s.get('chosen'))} | "
                     f"{_fmt(s.get('drift_factor'))} | {s.get('on_grid_edge', '')} |")
    fit = summary["power_law"]
    if fit:
        lines += ["", f"Power law of the stage minima: L(d) = {fit['A']:.4g} / d^{fit['alpha']:.4f} + {fit['E']:.4f} "
                      f"(R² = {fit['r_squared']:.4f})"
                      + (": alpha is at the edge of its search range, the minima do not fall like a power law."
                         if fit["alpha_at_bound"] else ".")
                      + (" Three widths determine the three parameters exactly, so the fit is no test of the law;"
                         " that takes a fourth width." if fit["widths"] == 3 else "")]
    for b in summary["brute_force"]:
        per_point = f" x {b['seeds']} seeds" if b["seeds"] > 1 else ""
        if b["seeds"] > 1 and b["seeded_points"] < b["points"] ** len(names):
            per_point = f" at one seed, the best {b['seeded_points']}{per_point}"
        lines += ["", f"Brute force at width {b['width']} ({b['points']}^{len(names)} points{per_point} = {b['runs']} "
                      f"runs, {b['finished']} finished): optimum "
                      f"{_fmt(b['optimum'])}, loss {_with_spread(b['optimum_spread'])}."]
        if "telescope_choice" in b:
            lines.append(f"Telescope's choice {_fmt(b['telescope_choice'])} is {_fmt(b['distance_in_final_cells'])} "
                         f"final-stage cells and {_fmt(b['distance_in_brute_cells'])} brute-force cells away "
                         f"(within one brute-force cell: {b['within_one_brute_cell']}); telescope compute = "
                         f"{100 * b['telescope_cost_share']:.1f}% of the brute force's in width^p units, "
                         f"{100 * b['telescope_wall_share']:.1f}% in measured wall time.")
            difference = b["loss_difference"]
            if b["difference_within_seed_noise"] is None:
                lines.append(f"Loss of the telescope's choice minus the brute-force optimum's: "
                             f"{difference['mean']:+.4f} (one seed: no noise to judge it by; --seeds 2 or more would).")
            else:
                verdict = ("within the seed noise: the interval holds 0, so the seeds cannot tell the two points apart"
                           if b["difference_within_seed_noise"] else "larger than the seed noise")
                lines.append(f"Loss of the telescope's choice minus the brute-force optimum's, paired by seed: "
                             f"{difference['mean']:+.4f} [{difference['ci_low']:+.4f}, {difference['ci_high']:+.4f}] "
                             f"over {difference['seeds']} seeds, {verdict} (within one cell or the seed noise: "
                             f"{b['within_one_brute_cell_or_seed_noise']}).")
            if "brute_loss_at_telescope_choice" in b:
                lines.append(f"Brute-force loss at the telescope's point: {b['brute_loss_at_telescope_choice']:.4f}.")
    lines += ["", "Figures: " + ", ".join(f"![{p}]({p})" for p in
                                         ("surfaces.png", "loss_distribution.png", "drift.png"))]
    return "\n".join(lines) + "\n"
