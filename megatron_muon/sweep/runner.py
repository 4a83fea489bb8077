"""Drive trials to completion through a backend, with every state change in the store first.

The order of events for one attempt: the store marks the trial running (attempt count up, a fresh attempt
directory), then the backend starts the command, then the store records the job id; when the backend says the job
ended, its result file decides done/diverged or a failed attempt. A runner killed between any two of these steps
is picked up by the next one: trials marked running are harvested from their result file when it exists, adopted
when the backend can still see the job (SLURM: by the recorded job id, or by the array's unique job name when the
runner died before recording the id), and put back to pending otherwise (a local child dies with its runner).
Finished trials are never launched again.

The telescope driver runs Algorithm 1 stage by stage: a stage's centre and its trials are fixed in the store in
one transaction when the stage starts, so a resumed sweep runs exactly the grid it started with, and the next
stage starts only when every trial of the current one has finished. With `seeds` > 1 every grid point of the final
stage (of every stage with `seed_every_stage`) and of the brute-force grid runs once per seed (the fixed `seed`,
seed + 1, ...); a point's loss is then the mean over its seeds, and a diverged seed makes it inf. A refined brute
force runs its grid at the first seed and only its best K points with every seed; its optimum is the best mean
among those K.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_muon.study.metrics import ema
from megatron_muon.sweep.backends import ENDED, RUNNING, Launch, backend_of
from megatron_muon.sweep.store import ResultStore, Trial, TrialSpec
from megatron_muon.sweep.telescope import LogRange, Stage, TelescopePlan, argmin_point, plan_telescope

DEFAULT_TEMPLATE = (
    "{python} -m megatron_muon.sweep.trial --width {width} --lr {lr} --wd {wd} --optimizer {optimizer} "
    "--global-batch {global_batch} --steps {steps} --seed {seed} --out {out}"
)
DEFAULT_FIXED = dict(optimizer="muon", global_batch=16, steps=100, seed=1234)
# Trial flags the default template passes only when a --hp or --fixed names them, so a sweep that names none keeps
# the command (and so the store fingerprint) it always had.
OPTIONAL_TRIAL_FIELDS = ("mup_preset", "embedding_lr_mult", "output_mult")
# Filled in by the runner for every attempt, never by the user.
RUNNER_FIELDS = ("python", "out", "run_dir")
RESULT_FILE, LOG_FILE = "result.json", "log.txt"


class SweepIncomplete(RuntimeError):
    pass


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def check_template(template: str, params: Sequence[str], swept: Sequence[str] = ()) -> None:
    """Every field of the template must have a value, and every swept hyperparameter must reach the command."""
    fields = template_fields(template)
    missing = fields - set(params) - set(RUNNER_FIELDS)
    if missing:
        raise ValueError(f"trial command uses {sorted(missing)} but nothing gives them a value "
                         f"(known: {sorted(set(params) | set(RUNNER_FIELDS))}; add --fixed NAME=VALUE)")
    unused = set(swept) - fields
    if unused:
        raise ValueError(f"hyperparameters {sorted(unused)} are swept but the trial command never uses them")
    if "out" not in fields:
        raise ValueError("the trial command must write its result to {out}")


def render(template: str, params: dict, run_dir: Path) -> tuple[str, ...]:
    """Split first, then fill each word, so values with spaces (paths) stay one argument."""
    values = {k: repr(v) if isinstance(v, float) else str(v) for k, v in params.items()}
    values.update(python=sys.executable, out=str(run_dir / RESULT_FILE), run_dir=str(run_dir))
    return tuple(word.format(**values) for word in shlex.split(template))


def read_result(path: Path) -> dict:
    """The trial's JSON, reduced to what the store keeps; ValueError says what is wrong with it."""
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no result file {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"result file {path} is not JSON ({e})") from None
    try:
        curve = [(float(t), math.nan if v is None else float(v)) for t, v in payload.get("curve", [])]
        final = payload.get("final_loss", curve[-1][1] if curve else None)
        final = math.nan if final is None else float(final)
        tokens = int(payload.get("tokens", curve[-1][0] if curve else 0))
        wall_s = float(payload.get("wall_s", math.nan))
    except (TypeError, ValueError, IndexError) as e:
        raise ValueError(f"result file {path} has malformed fields ({e})") from None
    smoothed = float(ema([v for _, v in curve])[-1]) if curve else final
    return dict(final_loss=final, smoothed_loss=smoothed, tokens=tokens, wall_s=wall_s,
                tokens_per_second=tokens / wall_s if wall_s > 0 else math.nan, curve=curve)


def log_tail(path: str | None, lines: int = 15) -> str:
    if not path or not Path(path).exists():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def safe_dir_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", key.replace("/", "__"))


@dataclass
class RunnerOptions:
    max_attempts: int = 2  # per trial and per invocation; rerunning the command grants fresh attempts
    poll_s: float = 1.0
    quiet: bool = False


class TrialRunner:
    def __init__(self, store: ResultStore, backend, template: str, runs_dir: Path, options: RunnerOptions,
                 display=None):
        self.store = store
        self.backend = backend
        self.template = template
        self.runs_dir = Path(runs_dir).resolve()
        self.options = options
        self.display = display
        self._active: dict[int, str] = {}  # trial id -> job id
        self._failures: dict[int, int] = {}

    # -- recovery -------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Settle every trial a previous runner left marked running (see the module docstring)."""
        left_running = self.store.trials(status="running")
        unrecorded = [t.run_dir for t in left_running if t.job_id is None and t.run_dir]
        found = self.backend.find_submitted(unrecorded) if unrecorded else {}
        if found:
            self.store.set_jobs([(t.id, found[t.run_dir]) for t in left_running if t.run_dir in found])
            left_running = self.store.trials(status="running")
        foreign = sorted({backend_of(t.job_id) for t in left_running
                          if t.job_id and backend_of(t.job_id) != self.backend.name})
        if foreign and any(b != "local" for b in foreign):
            raise SweepIncomplete(f"trials are still marked running under backend(s) {foreign}; restart with that "
                                  f"--backend so they are adopted rather than run twice")
        adoptable = [t.job_id for t in left_running
                     if self.backend.adopts_jobs and backend_of(t.job_id) == self.backend.name]
        states = self.backend.poll(adoptable) if adoptable else {}
        for trial in left_running:
            has_result = bool(trial.run_dir) and (Path(trial.run_dir) / RESULT_FILE).exists()
            if states.get(trial.job_id) == RUNNING:
                self._active[trial.id] = trial.job_id
            elif has_result:
                self._harvest(trial)
            elif trial.job_id in states:
                self._attempt_failed(trial, "job ended without a result")
            else:
                self.store.requeue(trial.id, "interrupted: its runner stopped before it finished")

    # -- one attempt ------------------------------------------------------------------------------------------

    def _launch(self, trials: Sequence[Trial]) -> None:
        launches = []
        for trial in trials:
            run_dir = self.runs_dir / safe_dir_name(trial.key) / f"attempt-{trial.attempts + 1}"
            log_path = run_dir / LOG_FILE
            self.store.mark_running(trial.id, str(run_dir), str(log_path))
            launches.append(Launch(trial.id, render(self.template, trial.params, run_dir), Path.cwd(), run_dir,
                                   run_dir / RESULT_FILE, log_path))
        try:
            job_ids = self.backend.submit(launches)
        except Exception as e:
            for launch in launches:
                self.store.requeue(launch.trial_id, f"submission failed: {e}")
            raise
        self.store.set_jobs([(launch.trial_id, job_id) for launch, job_id in zip(launches, job_ids)])
        for launch, job_id in zip(launches, job_ids):
            self._active[launch.trial_id] = job_id

    def _harvest(self, trial: Trial) -> None:
        try:
            result = read_result(Path(trial.run_dir) / RESULT_FILE)
        except ValueError as e:
            detail = self.backend.describe_end(trial.job_id) if trial.job_id else ""
            self._attempt_failed(trial, "\n".join(filter(None, [str(e), detail, log_tail(trial.log_path)])))
            return
        self.store.mark_finished(trial.id, **result)

    def _attempt_failed(self, trial: Trial, error: str) -> None:
        self._failures[trial.id] = self._failures.get(trial.id, 0) + 1
        self.store.mark_attempt_failed(trial.id, error, give_up=self._failures[trial.id] >= self.options.max_attempts)

    def _collect(self) -> None:
        if not self._active:
            return
        states = self.backend.poll(list(self._active.values()))
        for trial_id, job_id in list(self._active.items()):
            if states.get(job_id) == ENDED:
                del self._active[trial_id]
                self._harvest(self.store.trial(trial_id))

    # -- driving a set of trials ------------------------------------------------------------------------------

    def drive(self, keys: Sequence[str], title: str) -> list[Trial]:
        """Run the trials with these keys until each is done, diverged or out of attempts."""
        keys = list(keys)
        self.store.retry_failed([t.id for t in self.store.trials(keys=keys) if t.status == "failed"])
        while True:
            self._collect()
            trials = self.store.trials(keys=keys)
            pending = [t for t in trials if t.status == "pending" and t.id not in self._active]
            room = len(pending) if self.backend.capacity is None else self.backend.capacity - len(self._active)
            if pending and room > 0:
                self._launch(pending[:room])
                trials = self.store.trials(keys=keys)
            if self.display:
                self.display.update(title, trials)
            if not self._active and not any(t.status == "pending" for t in trials):
                break
            time.sleep(self.options.poll_s)
        failed = [t for t in trials if t.status == "failed"]
        if failed:
            lines = [f"  {t.key}: {' ... '.join(dict.fromkeys([t.error.splitlines()[0], t.error.splitlines()[-1]]))}"
                     f" (log {t.log_path})" if t.error else f"  {t.key}: (log {t.log_path})" for t in failed]
            raise SweepIncomplete(f"{title}: {len(failed)} of {len(trials)} trials failed "
                                  f"{self.options.max_attempts} times; rerun the same command to retry them:\n"
                                  + "\n".join(lines))
        return trials

    def shutdown(self) -> None:
        self.backend.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# The telescoping sweep
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TelescopeConfig:
    base_width: int
    calibration_width: int
    ranges: tuple[LogRange, ...]
    points: int
    final_width: int | None = None
    template: str = DEFAULT_TEMPLATE
    fixed: dict = field(default_factory=lambda: dict(DEFAULT_FIXED))
    objective: str = "final"  # final = held-out loss at the end; smoothed = EMA of the training curve
    cost_exponent: float = 2.0
    seeds: int = 1  # per grid point of the final stage and of the brute-force grid
    seed_every_stage: bool = False  # and of every earlier stage

    def __post_init__(self):
        if self.objective not in ("final", "smoothed"):
            raise ValueError(f"objective must be 'final' or 'smoothed', got {self.objective!r}")
        overlap = set(self.fixed) & ({r.name for r in self.ranges} | {"width"})
        if overlap:
            raise ValueError(f"{sorted(overlap)} are both fixed and swept")
        check_template(self.template, [*self.fixed, "width", *(r.name for r in self.ranges)],
                       swept=[r.name for r in self.ranges])
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if self.seed_every_stage and self.seeds == 1:
            raise ValueError("--seed-every-stage needs --seeds 2 or more")
        seed_reaches_trial = "seed" in template_fields(self.template) and isinstance(self.fixed.get("seed"), int)
        if self.seeds > 1 and not seed_reaches_trial:
            raise ValueError("--seeds > 1 needs a {seed} field in the trial template and an integer --fixed seed "
                             "(the first seed), or every seed is the same run")
        self.plan()  # widths, points, k: refused here, before any store is created

    def plan(self) -> TelescopePlan:
        return plan_telescope(self.base_width, self.calibration_width, self.ranges, self.points,
                              final_width=self.final_width, cost_exponent=self.cost_exponent)

    def seed_values(self, stage: Stage | None = None) -> list[int | None]:
        """The seeds each grid point of `stage` (None: the brute-force grid) runs with; [None] means the one run
        of the fixed parameters."""
        last = self.plan().stages[-1].index
        if self.seeds == 1 or (stage is not None and stage.index != last and not self.seed_every_stage):
            return [None]
        return [self.fixed["seed"] + i for i in range(self.seeds)]

    def fingerprint_dict(self) -> dict:
        d = asdict(self)
        d["ranges"] = [[r.name, r.low, r.high] for r in self.ranges]
        # Absent at their defaults, so a one-seed sweep has the fingerprint stores were made with before seeds.
        if d["seeds"] == 1:
            del d["seeds"], d["seed_every_stage"]
        return dict(kind="telescope", **d)

    @classmethod
    def from_fingerprint_dict(cls, d: dict) -> "TelescopeConfig":
        d = {k: v for k, v in d.items() if k != "kind"}
        d["ranges"] = tuple(LogRange(*r) for r in d["ranges"])
        return cls(**d)


def stage_key(stage: Stage, names: Sequence[str], offset: Sequence[int]) -> str:
    return f"telescope/s{stage.index}/" + "/".join(f"{n}{o:+d}" for n, o in zip(names, offset))


SEED_SUFFIX = re.compile(r"/seed\d+$")


def seeded_specs(key: str, kind: str, stage: int | None, width: int, params: dict,
                 seeds: Sequence[int | None]) -> list[TrialSpec]:
    """One trial per seed of a grid point, keyed <key>/seed<seed>; a point of one unseeded run keeps <key>."""
    return [TrialSpec(key if seed is None else f"{key}/seed{seed}", kind, stage, width,
                      params if seed is None else dict(params, seed=seed)) for seed in seeds]


@dataclass(frozen=True)
class GridPoint:
    """The trials of one grid point, one per seed, in trial order."""

    key: str  # the trials' key without the seed
    trials: tuple[Trial, ...]

    @property
    def params(self) -> dict:
        return self.trials[0].params

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.trials)

    def values(self, objective: str) -> list[float]:
        return [t.objective(objective) for t in self.trials]

    def loss(self, objective: str) -> float:
        """Mean over seeds; a diverged seed (inf) makes it inf, so a point that diverges for some seed never wins."""
        return float(np.mean(self.values(objective)))


def grid_points(trials: Sequence[Trial]) -> list[GridPoint]:
    """Trials grouped by grid point (their key without /seed<n>), in the order the points first appear."""
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        groups.setdefault(SEED_SUFFIX.sub("", t.key), []).append(t)
    return [GridPoint(key, tuple(ts)) for key, ts in groups.items()]


def stage_specs(config: TelescopeConfig, stage: Stage, log_centre: Sequence[float]) -> list[TrialSpec]:
    names = [r.name for r in config.ranges]
    specs = []
    for offset in stage.offsets():
        point = stage.log_point(log_centre, offset)
        params = dict(config.fixed, width=stage.width, **{n: math.exp(v) for n, v in zip(names, point)})
        specs += seeded_specs(stage_key(stage, names, offset), "telescope", stage.index, stage.width, params,
                              config.seed_values(stage))
    return specs


def best_point(trials: Sequence[Trial], names: Sequence[str], objective: str) -> GridPoint:
    """The grid point of lowest mean loss over its seeds (argmin_point's rules: diverged never wins, ties first)."""
    points = {tuple(math.log(p.params[n]) for n in names): p for p in grid_points(trials)}
    return points[argmin_point((log_point, p.loss(objective)) for log_point, p in points.items())]


def best_log_point(trials: Sequence[Trial], names: Sequence[str], objective: str) -> tuple[float, ...]:
    return tuple(math.log(v) for v in chosen_values(best_point(trials, names, objective), names))


def chosen_values(point: GridPoint, names: Sequence[str]) -> tuple[float, ...]:
    return tuple(point.params[n] for n in names)


def run_telescope(config: TelescopeConfig, runner: TrialRunner) -> GridPoint:
    """All stages in order; returns the chosen grid point (the last stage's optimum) with its seeds' trials."""
    plan = config.plan()
    names = plan.names
    store = runner.store
    runner.recover()
    previous: list[Trial] = []
    for stage in plan.stages:
        centre = store.stage_centre(stage.index)
        if centre is None:
            centre = plan.base_log_centre if stage.index == 0 else best_log_point(previous, names, config.objective)
            store.fix_stage(stage.index, stage.width, centre, stage_specs(config, stage, centre))
        keys = [s.key for s in stage_specs(config, stage, centre)]
        previous = runner.drive(keys, f"stage {stage.index}: width {stage.width}, {len(keys)} runs")
    return best_point(previous, names, config.objective)


def brute_force_specs(config: TelescopeConfig, width: int, points: int,
                      seeds: Sequence[int | None] | None = None) -> list[TrialSpec]:
    """The full grid over the base ranges at one width: what telescoping is meant to approximate. Every point runs
    with `seeds` (default: the config's)."""
    brute = plan_telescope(width, width, config.ranges, points, cost_exponent=config.cost_exponent).stages[0]
    names = [r.name for r in config.ranges]
    specs = []
    for offset in brute.offsets():
        point = brute.log_point(config.plan().base_log_centre, offset)
        params = dict(config.fixed, width=width, **{n: math.exp(v) for n, v in zip(names, point)})
        key = f"brute_force/w{width}/p{points}/" + "/".join(f"{n}{o:+d}" for n, o in zip(names, offset))
        specs += seeded_specs(key, "brute_force", None, width, params,
                              config.seed_values() if seeds is None else seeds)
    return specs


def brute_force_optimum(points: Sequence[GridPoint], objective: str) -> GridPoint | None:
    """The brute-force grid's optimum: the lowest mean over seeds among the finished points run with the most
    seeds, so on a refined grid (one seed everywhere, every seed at its best few points) a point's lucky first seed
    never beats the others' means. None when no such point has a finite loss."""
    finished = [p for p in points if p.finished]
    if not finished:
        return None
    most = max(len(p.trials) for p in finished)
    seeded = [p for p in finished if len(p.trials) == most and math.isfinite(p.loss(objective))]
    return min(seeded, key=lambda p: p.loss(objective), default=None)


def run_brute_force(config: TelescopeConfig, runner: TrialRunner, width: int, points: int,
                    refine_top: int | None = None) -> GridPoint:
    """The grid with every seed, or with `refine_top` = K: the grid at the first seed, then its best K points with
    every seed (a fraction of the runs when the grid is large, and still an optimum judged by its seeds)."""
    seeds = config.seed_values()
    if refine_top is not None and (refine_top < 1 or len(seeds) < 2):
        raise ValueError(f"--refine-top {refine_top}: needs K >= 1 and --seeds 2 or more")
    runner.recover()
    specs = brute_force_specs(config, width, points, seeds[:1] if refine_top else seeds)
    runner.store.add_trials(specs)
    trials = runner.drive([s.key for s in specs], f"brute force: width {width}, {len(specs)} runs")
    if refine_top:
        ranked = sorted((p for p in grid_points(trials) if math.isfinite(p.loss(config.objective))),
                        key=lambda p: p.loss(config.objective))
        refined = [spec for p in ranked[:refine_top]
                   for spec in seeded_specs(p.key, "brute_force", None, width, p.params, seeds[1:])]
        runner.store.add_trials(refined)
        title = f"brute force: width {width}, the best {refine_top} points x {len(seeds) - 1} more seeds"
        trials += runner.drive([s.key for s in refined], title)
    optimum = brute_force_optimum(grid_points(trials), config.objective)
    if optimum is None:
        raise ValueError(f"no point of the brute-force grid at width {width} finished with a finite loss")
    return optimum
