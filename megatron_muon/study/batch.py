"""The batch-size study of arXiv 2505.02222 (Sec. 2.3-2.5): runs or imported curves -> R_L(B), tokens and steps to
loss, token-optimal batch size, compute-time plane; written as CSV, PNG and a JSON summary.

Runs go through the sweep's store and backends (one trial per optimizer x global batch x learning rate x seed, all
with the same token budget); per optimizer and batch size the learning rate with the lowest final held-out loss,
averaged over seeds, is the one analysed, i.e. each batch size is tuned on its own grid, and a choice at either
end of the grid is flagged. With several seeds every statistic comes with a bootstrap interval over seeds
(metrics.py, "Seeds"). Curves can instead come from Megatron TensorBoard logs or from any store whose trials carry
`optimizer` and `global_batch` parameters.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from megatron_muon.study.metrics import (  # noqa: E402
    BOOTSTRAP_RNG_SEED,
    DEFAULT_CONFIDENCE,
    DEFAULT_EMA,
    DEFAULT_RESAMPLES,
    DeviceRule,
    LossCurve,
    auto_thresholds,
    grid_edge,
    log_log_slopes,
    pareto_front,
    ratio_table,
    seed_spread,
    select_by_mean,
    token_optimal_batch,
)
from megatron_muon.sweep.runner import DEFAULT_TEMPLATE, TrialRunner, check_template, template_fields  # noqa: E402
from megatron_muon.sweep.store import ResultStore, Trial, TrialSpec  # noqa: E402

STUDY_TEMPLATE = DEFAULT_TEMPLATE + " --seq-length {seq_length}"
OPTIMIZERS = ("adamw", "muon")  # reference first: R = T_adamw / T_muon


@dataclass(frozen=True)
class BatchStudyConfig:
    batch_sizes: tuple[int, ...]  # sequences per step
    learning_rates: dict  # optimizer -> list of learning rates tried at every batch size
    tokens: int  # token budget of every run
    seq_length: int = 32
    width: int = 64
    wd: float = 0.1
    seed: int = 1234  # the first seed; seed i of `seeds` is seed + i
    template: str = STUDY_TEMPLATE
    fixed: dict = field(default_factory=dict)
    seeds: int = 1

    def __post_init__(self):
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive, got {self.batch_sizes}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(f"duplicate batch sizes in {self.batch_sizes}")
        if set(self.learning_rates) != set(OPTIMIZERS):
            raise ValueError(f"give learning rates for exactly {OPTIMIZERS}, got {sorted(self.learning_rates)}")
        if any(not lrs or any(lr <= 0 for lr in lrs) for lrs in self.learning_rates.values()):
            raise ValueError(f"learning rates must be non-empty lists of positive numbers: {self.learning_rates}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if self.seeds > 1 and "seed" not in template_fields(self.template):
            raise ValueError("--seeds > 1 needs a {seed} field in the trial template, or every seed is the same run")
        too_small = [b for b in self.batch_sizes if self.tokens < b * self.seq_length]
        if too_small:
            raise ValueError(f"a budget of {self.tokens} tokens is less than one step at batch sizes {too_small}")
        check_template(self.template, [*self.trial_params(OPTIMIZERS[0], self.batch_sizes[0], 1.0, self.seed)])

    def steps(self, batch: int) -> int:
        return max(1, round(self.tokens / (batch * self.seq_length)))

    def seed_values(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def trial_params(self, optimizer: str, batch: int, lr: float, seed: int) -> dict:
        return dict(self.fixed, optimizer=optimizer, global_batch=batch, steps=self.steps(batch), lr=lr, wd=self.wd,
                    width=self.width, seq_length=self.seq_length, seed=seed)

    def specs(self) -> list[TrialSpec]:
        # One seed keeps the keys of stores made before seeds existed, so those studies still resume.
        def key(opt, batch, lr, seed):
            return f"batch/{opt}/b{batch}/lr{lr:.6g}" + (f"/seed{seed}" if self.seeds > 1 else "")

        return [TrialSpec(key(opt, batch, lr, seed), "batch", None, self.width, self.trial_params(opt, batch, lr, seed))
                for opt in OPTIMIZERS for batch in self.batch_sizes for lr in self.learning_rates[opt]
                for seed in self.seed_values()]

    def fingerprint_dict(self) -> dict:
        d = asdict(self)
        # Absent at its default, so the fingerprint of a one-seed study is the one stores were made with before.
        if d["seeds"] == 1:
            del d["seeds"]
        return dict(kind="batch", **d)


def run_study(config: BatchStudyConfig, runner: TrialRunner) -> list[Trial]:
    runner.recover()
    specs = config.specs()
    runner.store.add_trials(specs)
    return runner.drive([s.key for s in specs], f"batch study: {len(specs)} runs")


def curve_of(trial: Trial) -> LossCurve:
    tokens = [t for t, _ in trial.curve]
    losses = [math.nan if v is None else v for _, v in trial.curve]
    batch_tokens = trial.params["global_batch"] * trial.params.get("seq_length", 1)
    return LossCurve(trial.params["optimizer"], batch_tokens, tuple(tokens), tuple(losses),
                     tokens_per_second=trial.tokens_per_second or math.nan, seed=trial.params.get("seed", 0))


def best_curves_from_store(store: ResultStore) -> tuple[list[LossCurve], list[dict]]:
    """Per (optimizer, tokens per step) the learning rate with the lowest final loss averaged over its seeds (a
    diverged seed rules a rate out), the curves of all its seeds, and a record of each choice: the rate, the loss's
    spread over seeds, the grid it was chosen from and whether it sits on an end of that grid."""
    cells: dict[tuple[str, int], dict[float, list[Trial]]] = {}
    for t in store.trials():
        if not (t.finished and "optimizer" in t.params and "global_batch" in t.params):
            continue
        key = (t.params["optimizer"], t.params["global_batch"] * t.params.get("seq_length", 1))
        cells.setdefault(key, {}).setdefault(t.params.get("lr"), []).append(t)
    curves, chosen = [], []
    for (optimizer, batch_tokens), by_lr in sorted(cells.items()):
        usable = {lr: trials for lr, trials in by_lr.items() if all(t.status == "done" and t.curve for t in trials)}
        if not usable:
            continue  # every rate has a diverged seed: nothing at this batch size to compare
        lr = select_by_mean({lr: [t.final_loss for t in trials] for lr, trials in usable.items()})
        trials = sorted(usable[lr], key=lambda t: t.params.get("seed", 0))
        curves += [curve_of(t) for t in trials]
        spread = seed_spread([t.final_loss for t in trials])
        grid = sorted(r for r in by_lr if r is not None)
        chosen.append(dict(optimizer=optimizer, batch_tokens=batch_tokens, lr=lr, final_loss=spread.mean,
                           final_loss_std=spread.std, seeds=[t.params.get("seed", 0) for t in trials], lr_grid=grid,
                           lr_on_grid_edge=None if lr is None else grid_edge(grid, lr), keys=[t.key for t in trials]))
    return curves, chosen


def curves_from_tensorboard(spec: str, tag: str = "lm loss") -> LossCurve:
    """OPTIMIZER:TOKENS_PER_STEP:LOGDIR of a Megatron run. Megatron logs `lm loss` against the iteration (from 1);
    point i is the loss of the batch after i - 1 updates, so its tokens are (i - 1) x tokens per step. Throughput
    comes from `iteration-time` when the run logged timers (--log-timers-to-tensorboard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        optimizer, batch_tokens, logdir = spec.split(":", 2)
        batch_tokens = int(batch_tokens)
    except ValueError:
        raise ValueError(f"--tensorboard {spec!r}: expected OPTIMIZER:TOKENS_PER_STEP:LOGDIR") from None
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"--tensorboard {spec!r}: optimizer must be one of {OPTIMIZERS}")
    if not Path(logdir).exists():
        raise ValueError(f"--tensorboard {spec!r}: no such directory")
    events = EventAccumulator(logdir, size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags().get("scalars", [])
    if tag not in tags:
        raise ValueError(f"{logdir} has no scalar {tag!r} (it has {sorted(tags)})")
    points = sorted({e.step: e.value for e in events.Scalars(tag)}.items())
    tokens_per_second = math.nan
    if "iteration-time" in tags:
        tokens_per_second = batch_tokens / float(np.median([e.value for e in events.Scalars("iteration-time")]))
    return LossCurve(optimizer, batch_tokens, tuple(float((s - 1) * batch_tokens) for s, _ in points),
                     tuple(float(v) for _, v in points), tokens_per_second=tokens_per_second)


# ---------------------------------------------------------------------------------------------------------------
# Analysis and outputs
# ---------------------------------------------------------------------------------------------------------------


def analyse(curves: list[LossCurve], out_dir: Path, thresholds=None, num_thresholds: int = 8,
            beta: float = DEFAULT_EMA, device_rule: DeviceRule | None = None,
            tokens_per_second: dict | None = None, token_optimal_rtol: float = 0.0, chosen: list | None = None,
            confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES,
            rng_seed: int = BOOTSTRAP_RNG_SEED) -> dict:
    if not curves:
        raise ValueError("no finished runs to analyse")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thresholds = np.asarray(thresholds if thresholds is not None else auto_thresholds(curves, num_thresholds, beta))
    device_rule = device_rule or DeviceRule()
    table = ratio_table(curves, thresholds, beta, device_rule, tokens_per_second, confidence=confidence,
                        resamples=resamples, rng_seed=rng_seed)
    rows, batches = table.rows, table.batches
    if not any(math.isfinite(r["ratio"]) for r in rows):
        raise ValueError(f"no threshold in {[round(float(t), 4) for t in thresholds]} is reached by both optimizers "
                         "(with every seed) at any batch size: choose thresholds the runs reach (see curves), or "
                         "longer runs")

    with open(out_dir / "batch_study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    per_threshold, token_optimal = [], []
    for threshold, comparison in zip(thresholds, table.comparisons):
        sel = [r for r in rows if r["threshold"] == float(threshold)]
        entry = dict(threshold=float(threshold))
        for column in ("ratio", "token_difference", *(f"tokens_{opt}" for opt in OPTIMIZERS)):
            for suffix in ("", "_ci_low", "_ci_high"):
                entry[column + suffix] = [r[column + suffix] for r in sel]
        entry.update(
            batches_compared=[b for b, c in zip(batches, comparison.compared) if c],
            ratio_above_1_confidence=comparison.above_1_confidence,
            ratio_above_1_confident=comparison.ratio_above_1_confident,
            ratio_spearman=comparison.spearman,
            ratio_spearman_ci_low=comparison.spearman_ci[0], ratio_spearman_ci_high=comparison.spearman_ci[1],
            ratio_increasing_confident=comparison.ratio_increasing_confident,
        )
        for opt in OPTIMIZERS:
            tokens = [r[f"tokens_{opt}"] for r in sel]
            b_tok = token_optimal_batch(batches, tokens, rtol=token_optimal_rtol)
            entry[f"token_optimal_batch_{opt}"] = b_tok
            entry[f"steps_slopes_{opt}"] = list(log_log_slopes(batches, [r[f"steps_{opt}"] for r in sel]))
            token_optimal.append(dict(threshold=float(threshold), optimizer=opt, token_optimal_batch_tokens=b_tok))
        per_threshold.append(entry)
    with open(out_dir / "token_optimal.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(token_optimal[0]))
        writer.writeheader()
        writer.writerows(token_optimal)

    _plots(curves, rows, thresholds, batches, per_threshold, beta, confidence, out_dir)
    summary = dict(
        batch_tokens=batches, thresholds=[float(t) for t in thresholds], ema=beta,
        devices={b: device_rule(b) for b in batches}, seeds=table.seeds, confidence=confidence,
        bootstrap=dict(method="percentile; seed labels resampled together for every cell", resamples=resamples,
                       rng_seed=rng_seed),
        chosen_runs=chosen or [],
        share_of_thresholds_with_ratio_above_1_confident=_share(per_threshold, "ratio_above_1_confident"),
        share_of_thresholds_with_ratio_increasing_confident=_share(per_threshold, "ratio_increasing_confident"),
        per_threshold=per_threshold,
    )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary


def _share(entries: list[dict], flag: str) -> float:
    """Share of the thresholds where `flag` holds, among those where it could be assessed (not None)."""
    assessed = [e[flag] for e in entries if e[flag] is not None]
    return sum(assessed) / len(assessed) if assessed else math.nan


def _json_default(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def _band(ax, batches, sel, column, colour) -> None:
    """The bootstrap interval of `column` as a shaded band (absent with one seed, whose intervals are NaN)."""
    ax.fill_between(batches, [r[f"{column}_ci_low"] for r in sel], [r[f"{column}_ci_high"] for r in sel],
                    color=colour, alpha=0.2, lw=0)


def _plots(curves, rows, thresholds, batches, per_threshold, beta, confidence, out_dir: Path) -> None:
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(thresholds)))
    styles = {"adamw": dict(ls="--", marker="s"), "muon": dict(ls="-", marker="o")}
    bands = f"bands: {100 * confidence:g}% bootstrap intervals over seeds"

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 7), sharex=True)
    for colour, threshold in zip(colours, thresholds):
        sel = [r for r in rows if r["threshold"] == float(threshold)]
        top.plot(batches, [r["ratio"] for r in sel], marker="o", color=colour, label=f"L={threshold:.3f}")
        _band(top, batches, sel, "ratio", colour)
        bottom.plot(batches, [r["token_difference"] for r in sel], marker="o", color=colour)
        _band(bottom, batches, sel, "token_difference", colour)
    top.axhline(1.0, color="black", lw=0.8)
    top.set_title(bands, fontsize=8)
    top.set_ylabel("R_L(B) = T_AdamW / T_Muon")
    top.legend(fontsize=7, ncol=2)
    bottom.set_ylabel("T_AdamW - T_Muon (tokens)")
    bottom.set_xlabel("tokens per step B")
    bottom.set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(out_dir / "token_ratio.png", dpi=130)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for colour, threshold, entry in zip(colours, thresholds, per_threshold):
        sel = [r for r in rows if r["threshold"] == float(threshold)]
        for opt in OPTIMIZERS:
            left.plot(batches, [r[f"steps_{opt}"] for r in sel], color=colour, **styles[opt], ms=4)
            tokens = [r[f"tokens_{opt}"] for r in sel]
            right.plot(batches, tokens, color=colour, **styles[opt], ms=4)
            _band(right, batches, sel, f"tokens_{opt}", colour)
            b_tok = entry[f"token_optimal_batch_{opt}"]
            if math.isfinite(b_tok):
                right.plot([b_tok], [tokens[batches.index(int(b_tok))]], marker="*", ms=12, color=colour, mec="red")
    b = np.array(batches, dtype=float)
    left.plot(b, b[0] / b * max(r["steps_adamw"] for r in rows if math.isfinite(r["steps_adamw"])), color="grey",
              lw=0.8, label="slope -1 (perfect scaling)")
    for ax, label in ((left, "steps to loss S_L(B)"), (right, "tokens to loss T_L(B) (star: token-optimal B)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per step B")
        ax.set_ylabel(label)
    left.plot([], [], color="black", **styles["muon"], label="Muon")
    left.plot([], [], color="black", **styles["adamw"], label="AdamW")
    left.legend(fontsize=7)
    right.set_title(bands, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "steps_and_tokens_to_loss.png", dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for colour, threshold in zip(colours, thresholds):
        sel = [r for r in rows if r["threshold"] == float(threshold)]
        for opt in OPTIMIZERS:
            points = [(r[f"hours_{opt}"], r["devices"]) for r in sel if math.isfinite(r[f"hours_{opt}"])]
            if points:
                ax.plot([3600 * h for h, _ in points], [d for _, d in points], color=colour, **styles[opt], ms=4)
                front = pareto_front(points)
                ax.scatter([3600 * h for (h, _), f in zip(points, front) if f],
                           [d for (_, d), f in zip(points, front) if f], s=60, facecolors="none", edgecolors="red")
    ax.set_xscale("log")
    ax.set_xlabel("time to reach L (seconds; devices x measured per-device throughput)")
    ax.set_ylabel("devices")
    ax.set_title("compute-time plane (solid Muon, dashed AdamW; red: Pareto points)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "compute_time.png", dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    batch_colours = dict(zip(batches, plt.cm.plasma(np.linspace(0, 0.85, len(batches)))))
    labelled = set()
    for c in curves:
        if c.batch_tokens in batch_colours:
            # One legend entry per (optimizer, batch): its seeds share colour and style.
            label = f"{c.optimizer} B={c.batch_tokens}"
            ax.plot(c.tokens, c.smoothed(beta), color=batch_colours[c.batch_tokens], ls=styles[c.optimizer]["ls"],
                    label=None if label in labelled else label)
            labelled.add(label)
    for threshold in thresholds:
        ax.axhline(threshold, color="grey", lw=0.4)
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel(f"training loss on fresh batches, EMA {beta}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=130)
    plt.close(fig)


def _interval(value: float, low: float, high: float, digits: int = 3) -> str:
    if not math.isfinite(value):
        return "-"
    text = f"{value:.{digits}f}"
    return text + (f" [{low:.{digits}f}, {high:.{digits}f}]" if math.isfinite(low) and math.isfinite(high) else "")


def _verdict(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "no")


def print_summary(summary: dict, file=sys.stdout) -> None:
    seeds, confidence = summary["seeds"], summary["confidence"]
    level = f"{100 * confidence:g}%"
    if len(seeds) > 1:
        print(f"{len(seeds)} seeds {seeds}: T_L(B) is the mean over seeds; [{level} percentile-bootstrap intervals "
              f"over seeds, {summary['bootstrap']['resamples']} resamples, RNG seed "
              f"{summary['bootstrap']['rng_seed']}]", file=file)
    else:
        print("one seed: point estimates only; run --seeds 2 or more for intervals and the confidence verdicts",
              file=file)
    print(f"{'L':>7}  R_L(B) at B = {', '.join(str(b) for b in summary['batch_tokens'])} tokens per step", file=file)
    print(f"{'':>7}  R > 1 at every B ({level}: share of bootstrap replicates); increasing in B (Spearman rho "
          f"[{level}]); B_tok AdamW/Muon", file=file)
    for e in summary["per_threshold"]:
        ratios = "  ".join(_interval(*v) for v in zip(e["ratio"], e["ratio_ci_low"], e["ratio_ci_high"]))
        above = _verdict(e["ratio_above_1_confident"])
        if e["ratio_above_1_confident"] is not None:
            above += f" ({e['ratio_above_1_confidence']:.3f})"
        rho = _interval(e["ratio_spearman"], e["ratio_spearman_ci_low"], e["ratio_spearman_ci_high"], digits=2)
        print(f"{e['threshold']:>7.4f}  {ratios}", file=file)
        print(f"{'':>7}  R > 1 everywhere: {above}; increasing: {_verdict(e['ratio_increasing_confident'])} "
              f"(rho {rho}); B_tok {e['token_optimal_batch_adamw']:.0f}/{e['token_optimal_batch_muon']:.0f}",
              file=file)
    if summary["chosen_runs"]:
        print("learning rate per batch size, by mean final loss over seeds:", file=file)
    for c in summary["chosen_runs"]:
        spread = f" +- {c['final_loss_std']:.4f}" if math.isfinite(c["final_loss_std"]) else ""
        edge = ""
        if c["lr_on_grid_edge"]:
            edge = f"  <- {c['lr_on_grid_edge']} rate of the grid: the optimum may lie beyond it, widen --lr"
        grid = ", ".join(f"{lr:.4g}" for lr in c["lr_grid"])
        lr = "?" if c["lr"] is None else f"{c['lr']:.4g}"  # a store whose trials have no lr parameter
        print(f"  {c['optimizer']:>5} B={c['batch_tokens']}: lr {lr} of [{grid}], final loss "
              f"{c['final_loss']:.4f}{spread}{edge}", file=file)
