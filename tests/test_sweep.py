"""The sweep runner end to end with a fake trial command: stages, resume after SIGKILL, retries, bad input,
and the SLURM backend against a fake sbatch / squeue / sacct on PATH."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from megatron_muon.sweep.__main__ import main
from megatron_muon.sweep.store import ResultStore, StoreLocked, StoreMismatch, TrialSpec

REPO = Path(__file__).resolve().parents[1]

# A stand-in for a training run: a loss bowl in (log lr, log wd) whose lr optimum moves as 1/width, a fake
# curve, and a ledger line when it starts and when it finishes. While the file FAKE_HOLD_FILE names exists, a
# trial starting after its creation waits (ledger line "held") so a test can kill the runner mid-trial. Given
# --seed, the loss moves by up to +-0.01, a fixed function of the seed and the point (seed noise).
# Stdlib only, so it starts in milliseconds.
FAKE_TRIAL = textwrap.dedent("""
    import argparse, json, math, os, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int); p.add_argument("--lr", type=float); p.add_argument("--wd", type=float)
    p.add_argument("--sleep", type=float, default=0.0); p.add_argument("--ledger"); p.add_argument("--out")
    p.add_argument("--seed", type=int)
    a = p.parse_args()
    key = f"{a.width}/{a.lr:.6g}/{a.wd:.6g}"
    def note(event):
        with open(a.ledger, "a") as f:
            f.write(f"{event} {key}\\n")
    note("start")
    hold = os.environ.get("FAKE_HOLD_FILE")
    if hold and os.path.exists(hold):
        note("held")
        while os.path.exists(hold):
            time.sleep(0.05)
    time.sleep(a.sleep)
    if os.environ.get("FAKE_FAIL_WIDTH") == str(a.width):
        sys.exit("failing on purpose")
    once = os.environ.get("FAKE_FAIL_ONCE_DIR")
    if once and not os.path.exists(os.path.join(once, key.replace("/", "_"))):
        open(os.path.join(once, key.replace("/", "_")), "w").close()
        sys.exit("failing once")
    best_lr = 0.01 * 32 / a.width
    loss = 1.0 + 4.0 / a.width ** 0.5 + 0.1 * math.log(a.lr / best_lr) ** 2 + 0.05 * math.log(a.wd / 0.1) ** 2
    if a.seed is not None:
        loss += 0.01 * math.sin(1.7 * a.seed + 100 * a.lr + 10 * a.wd)
    curve = [[100 * i, loss + 2.0 * math.exp(-i / 5)] for i in range(40)]
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(final_loss=loss, curve=curve, tokens=4000, wall_s=a.sleep + 0.01), f)
    os.replace(tmp, a.out)
    note("finish")
""")


@pytest.fixture
def sweep_env(tmp_path):
    trial = tmp_path / "fake_trial.py"
    trial.write_text(FAKE_TRIAL)
    ledger = tmp_path / "ledger.txt"
    ledger.touch()
    store = tmp_path / "sweep.sqlite"

    def args(*extra, sleep=0.0, backend="local", widths=(8, 32), points=4, seeded=False):
        return [
            "telescope", "--store", str(store), "--base-width", str(widths[0]),
            "--calibration-width", str(widths[1]), "--points", str(points),
            "--hp", "lr=1e-3:1e-1", "--hp", "wd=1e-2:1",
            "--template", f"{{python}} {trial} --width {{width}} --lr {{lr}} --wd {{wd}} --sleep {sleep} "
                          f"--ledger {ledger} --out {{out}}" + (" --seed {seed}" if seeded else ""),
            "--backend", backend, "--poll-s", "0.05", "--quiet", *extra,
        ]

    return dict(args=args, store=store, ledger=ledger, tmp=tmp_path)


def ledger_counts(ledger: Path, event: str) -> Counter:
    return Counter(line.split()[1] for line in ledger.read_text().splitlines() if line.split()[0] == event)


def trial_rows(store: Path) -> list[dict]:
    with sqlite3.connect(store) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM trials ORDER BY id")]


def test_telescope_runs_stages_in_order_centred_on_each_optimum(sweep_env):
    assert main(sweep_env["args"]("--parallel", "3")) == 0
    with ResultStore(sweep_env["store"]) as store:
        stages = [store.trials(kind="telescope", stage=s) for s in range(3)]
        assert [len(s) for s in stages] == [16, 4, 1]
        assert all(t.status == "done" and t.attempts == 1 for s in stages for t in s)
        # Each stage's grid is centred on the previous stage's best point (geometric mean of its points).
        for prev, cur in zip(stages, stages[1:]):
            best = min(prev, key=lambda t: t.final_loss)
            for name in ("lr", "wd"):
                values = sorted({t.params[name] for t in cur})
                centre = (values[0] * values[-1]) ** 0.5
                assert centre == pytest.approx(best.params[name], rel=1e-9)
        # Later stages started only after every trial of the previous one had finished.
        finished_order = [t.id for s in stages for t in s]
        assert finished_order == sorted(finished_order)
        assert stages[2][0].width == 32 and stages[1][0].width == 16
        # The bowl's optimum at width 32 is lr = 0.01, wd = 0.1: the final point is within its grid cell.
        final = stages[2][0]
        assert abs(final.params["lr"] / 0.01 - 1) < 0.5 and abs(final.params["wd"] / 0.1 - 1) < 0.5
        assert final.smoothed_loss is not None and final.curve[0] == [0.0, pytest.approx(final.final_loss + 2.0)]
        assert store.integrity_ok()


def test_sigkill_mid_stage_then_restart_loses_and_reruns_nothing(sweep_env):
    command = [sys.executable, "-m", "megatron_muon.sweep", *sweep_env["args"]("--parallel", "2", sleep=0.3)]
    hold = sweep_env["tmp"] / "hold"
    runner = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, FAKE_HOLD_FILE=str(hold)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store_path = sweep_env["store"]
    deadline = time.monotonic() + 60
    done_at_kill = []
    while time.monotonic() < deadline:
        if store_path.exists():
            try:
                rows = trial_rows(store_path)
            except sqlite3.OperationalError:  # schema not created yet
                rows = []
            if len([r for r in rows if r["status"] == "done"]) >= 3:
                hold.touch()  # trials starting from now on wait: one will be mid-run when the kill lands
            if "held" in sweep_env["ledger"].read_text().split():
                done_at_kill = [r for r in rows if r["status"] == "done"]
                os.kill(runner.pid, signal.SIGKILL)
                break
        assert runner.poll() is None, runner.stderr.read().decode()
        time.sleep(0.05)
    runner.wait()
    hold.unlink()
    assert done_at_kill, "the runner never got three trials done"
    rows = trial_rows(store_path)
    killed_mid_trial = [r for r in rows if r["status"] == "running"]
    assert killed_mid_trial, "the kill should land while trials run"
    assert len([r for r in rows if r["status"] == "done"]) < 16, "the kill should land mid-stage"

    restarted = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert restarted.returncode == 0, restarted.stderr
    after = {r["key"]: r for r in trial_rows(store_path)}
    assert len(after) == 21 and all(r["status"] == "done" for r in after.values())
    for before in done_at_kill:
        again = after[before["key"]]
        assert (again["attempts"], again["run_dir"], again["final_loss"]) == (
            before["attempts"], before["run_dir"], before["final_loss"])
    starts, finishes = ledger_counts(sweep_env["ledger"], "start"), ledger_counts(sweep_env["ledger"], "finish")
    # No trial finished twice; the ones finished before the kill never even started again.
    assert max(finishes.values()) == 1 and len(finishes) == 21
    done_keys = {f"{r['width']}/{json.loads(r['params'])['lr']:.6g}/{json.loads(r['params'])['wd']:.6g}"
                 for r in done_at_kill}
    assert all(starts[k] == 1 for k in done_keys)
    with ResultStore(store_path) as store:
        assert store.integrity_ok()


def test_failed_attempts_are_retried_and_persistent_failures_stop_before_the_next_stage(sweep_env, monkeypatch):
    once = sweep_env["tmp"] / "once"
    once.mkdir()
    monkeypatch.setenv("FAKE_FAIL_ONCE_DIR", str(once))
    monkeypatch.setenv("FAKE_FAIL_WIDTH", "16")
    assert main(sweep_env["args"]("--parallel", "4")) == 1
    with ResultStore(sweep_env["store"]) as store:
        stage0 = store.trials(stage=0)
        assert all(t.status == "done" and t.attempts == 2 for t in stage0)  # failed once, retried, succeeded
        stage1 = store.trials(stage=1)
        assert all(t.status == "failed" and "failing on purpose" in t.error for t in stage1)
        assert store.trials(stage=2) == []  # the next stage never started
    monkeypatch.delenv("FAKE_FAIL_WIDTH")
    assert main(sweep_env["args"]("--parallel", "4")) == 0
    with ResultStore(sweep_env["store"]) as store:
        assert [t.status for t in store.trials(stage=2)] == ["done"]
        assert all(t.attempts == 4 for t in store.trials(stage=1))  # 2 failed + 1 failing-once + 1 good


def test_store_from_a_different_config_is_refused_and_left_untouched(sweep_env, capsys):
    assert main(sweep_env["args"]()) == 0
    before = trial_rows(sweep_env["store"])
    assert main(sweep_env["args"](points=3)) == 2
    assert "different sweep config" in capsys.readouterr().err
    assert trial_rows(sweep_env["store"]) == before
    with pytest.raises(StoreMismatch, match="points"):
        ResultStore(sweep_env["store"], {"kind": "telescope", "points": 3})


def test_bad_command_lines_are_clear_errors(sweep_env, capsys):
    assert main(sweep_env["args"](widths=(8, 24))) == 2
    assert "not base width 8 doubled" in capsys.readouterr().err
    assert not sweep_env["store"].exists()
    with pytest.raises(SystemExit):
        main([*sweep_env["args"](), "--hp", "x=2:1"])
    assert "inverted range" in capsys.readouterr().err
    not_a_store = sweep_env["tmp"] / "notes.sqlite"
    not_a_store.write_text("my notes")
    assert main([*sweep_env["args"](), "--store", str(not_a_store)]) == 2
    assert not_a_store.read_text() == "my notes"


def test_one_runner_per_store(tmp_path):
    config = {"kind": "test"}
    with ResultStore(tmp_path / "s.sqlite", config) as first:
        first.acquire_lock()
        with ResultStore(tmp_path / "s.sqlite", config) as second:
            with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
                second.acquire_lock()
        first.add_trials([TrialSpec("a", "batch", None, None, {"x": 1})])
        first.add_trials([TrialSpec("a", "batch", None, None, {"x": 2})])  # known key: kept as it was
        assert [t.params for t in first.trials()] == [{"x": 1}]


# ---------------------------------------------------------------------------------------------------------------
# SLURM, faked: sbatch starts a detached worker that runs the array's tasks one after another (as a cluster would,
# it outlives the runner); squeue lists tasks not yet ended, by job id or by job name; sacct reports state and exit
# code. With FAKE_SBATCH_HANG set, sbatch submits and then hangs before answering (its pid in sbatch.pid).
# ---------------------------------------------------------------------------------------------------------------

FAKE_SBATCH = """
import os, re, subprocess, sys, pathlib
state = pathlib.Path(os.environ["FAKE_SLURM_DIR"])
script = sys.argv[-1]
assert sys.argv[1] == "--parsable", sys.argv
text = open(script).read()
count = int(re.search(r"#SBATCH --array=0-(\\d+)", text).group(1)) + 1
counter = state / "next_id"
job = int(counter.read_text()) if counter.exists() else 1000
counter.write_text(str(job + 1))
(state / f"{job}.name").write_text(re.search(r"#SBATCH --job-name=(\\S+)", text).group(1))
for i in range(count):
    (state / f"{job}_{i}").write_text("PENDING")
worker = (
    "import os, subprocess, sys, pathlib\\n"
    f"state = pathlib.Path({str(state)!r})\\n"
    f"for i in range({count}):\\n"
    f"    (state / f'{job}_{{i}}').write_text('RUNNING')\\n"
    f"    rc = subprocess.call(['bash', {script!r}], env=dict(os.environ, SLURM_ARRAY_TASK_ID=str(i)))\\n"
    f"    (state / f'{job}_{{i}}').write_text(('COMPLETED' if rc == 0 else 'FAILED') + f'|{{rc}}:0')\\n"
)
subprocess.Popen([sys.executable, "-c", worker], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
with open(state / "submissions", "a") as f:
    f.write(f"{job} {count}\\n")
if os.environ.get("FAKE_SBATCH_HANG"):
    (state / "sbatch.pid").write_text(str(os.getpid()))
    import time; time.sleep(600)
print(job)
"""

FAKE_SQUEUE = """
import os, sys, pathlib
state = pathlib.Path(os.environ["FAKE_SLURM_DIR"])
args = sys.argv
name = lambda job: (state / f"{job}.name").read_text()
if "-j" in args:
    wanted = lambda job: job in args[args.index("-j") + 1].split(",")
else:
    wanted = lambda job: name(job) in args[args.index("--name") + 1].split(",")
for path in sorted(state.glob("[0-9]*_*")):
    job = path.name.split("_")[0]
    if wanted(job) and path.read_text() in ("PENDING", "RUNNING"):
        print(args[args.index("-o") + 1].replace("%j", name(job)).replace("%i", path.name))
"""

FAKE_SACCT = """
import os, sys, pathlib
state = pathlib.Path(os.environ["FAKE_SLURM_DIR"])
task = sys.argv[sys.argv.index("-j") + 1]
print(state.joinpath(task).read_text())
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm-state"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("sacct", FAKE_SACCT)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    return state


def submissions(state: Path) -> list[tuple[int, int]]:
    path = state / "submissions"
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()] if path.exists() else []


def test_slurm_arrays_resubmit_failures_and_carry_sbatch_args(sweep_env, fake_slurm, monkeypatch):
    once = sweep_env["tmp"] / "once"
    once.mkdir()
    monkeypatch.setenv("FAKE_FAIL_ONCE_DIR", str(once))
    args = sweep_env["args"]("--sbatch-arg=--partition=tiny", "--slurm-setup", "export SETUP_RAN=1",
                             backend="slurm", widths=(16, 32), points=2)
    assert main(args) == 0
    # Stage 0 is one array of 4 tasks; every trial fails once and is resubmitted (in as many arrays as polls
    # noticed failures), then stage 1's single trial the same way: 2 attempts x 5 trials.
    counts = [count for _, count in submissions(fake_slurm)]
    assert counts[0] == 4 and sum(counts) == 10 and counts[-2:] == [1, 1]
    with ResultStore(sweep_env["store"]) as store:
        trials = store.trials()
        assert [t.status for t in trials] == ["done"] * 5
        assert all(t.attempts == 2 and t.job_id.startswith("slurm:") for t in trials)
    script = next((sweep_env["store"].parent / "sweep-runs" / "slurm").glob("array-0000/array.sbatch")).read_text()
    assert "#SBATCH --partition=tiny" in script and "export SETUP_RAN=1" in script


def _job_ids(store: Path) -> list:
    with sqlite3.connect(store) as conn:
        return [row[0] for row in conn.execute("SELECT job_id FROM trials ORDER BY id")]


@pytest.mark.parametrize("killed", ["after recording the job ids", "while sbatch was answering"])
def test_slurm_jobs_outlive_a_killed_runner_and_are_adopted_not_resubmitted(sweep_env, fake_slurm, killed):
    args = sweep_env["args"](backend="slurm", widths=(16, 32), points=2, sleep=0.8)
    command = [sys.executable, "-m", "megatron_muon.sweep", *args]
    hang = killed == "while sbatch was answering"
    env = dict(os.environ, FAKE_SBATCH_HANG="1") if hang else None
    runner = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready():
        if hang:
            return (fake_slurm / "sbatch.pid").exists()
        try:
            return sweep_env["store"].exists() and _job_ids(sweep_env["store"]).count(None) == 0
        except sqlite3.OperationalError:  # schema not created yet
            return False

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and runner.poll() is None and not ready():
        time.sleep(0.05)
    assert ready()
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    if hang:
        os.kill(int((fake_slurm / "sbatch.pid").read_text()), signal.SIGKILL)
        assert _job_ids(sweep_env["store"]) == [None] * 4  # the store never learned the array's id
    assert submissions(fake_slurm) == [(1000, 4)]
    restarted = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert restarted.returncode == 0, restarted.stderr
    # Stage 0's array ran once (adopted after the restart); only stage 1 was submitted afterwards.
    assert submissions(fake_slurm) == [(1000, 4), (1001, 1)]
    assert set(ledger_counts(sweep_env["ledger"], "start").values()) == {1}


def test_report_and_brute_force_comparison(sweep_env):
    assert main(sweep_env["args"]("--parallel", "4", widths=(8, 32))) == 0
    brute = sweep_env["args"](widths=(8, 32))
    brute[0] = "brute"
    assert main([*brute, "--brute-points", "7", "--parallel", "4"]) == 0
    out = Path(os.environ.get("SWEEP_REPORT_DIR", sweep_env["tmp"] / "report"))
    assert main(["report", "--store", str(sweep_env["store"]), "--out", str(out), "--loss-cap", "3"]) == 0
    for name in ("stage0_surface.png", "stage1_surface.png", "stage2_surface.png", "surfaces.png",
                 "loss_distribution.png", "drift.png", "report.md", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and [s["finished"] for s in summary["stages"]] == [16, 4, 1]
    # The fake loss's width term is exactly 4 / sqrt(width) + const at each stage's optimum only up to grid error;
    # the fit still has to find a decreasing power law.
    fit = summary["power_law"]
    assert fit["alpha"] > 0 and fit["A"] > 0
    (comparison,) = summary["brute_force"]
    assert comparison["runs"] == 49 and comparison["width"] == 32
    # Bowl optimum at width 32: lr = 0.01, wd = 0.1; the 7-point brute grid over [1e-3, 1e-1] hits lr = 0.01.
    assert comparison["optimum"]["lr"] == pytest.approx(0.01)
    assert comparison["within_one_brute_cell"]
    # Planned cost: stage s has 16/4^s runs at (8 * 2^s / 32)^2 -> 1 + 1 + 1 final-run units vs 49 brute runs.
    assert comparison["telescope_cost_share"] == pytest.approx(3 / 49)
    report = (out / "report.md").read_text()
    assert "Brute force at width 32" in report
    assert fit["widths"] == 3 and "so the fit is no test of the law" in report  # 3 minima, 3 parameters


def test_seeds_run_the_final_stage_and_the_brute_force_grid_once_per_seed(sweep_env, capsys):
    assert main(sweep_env["args"]("--parallel", "4", "--seeds", "3", seeded=True)) == 0
    chosen_loss = json.loads(capsys.readouterr().out)["chosen_loss"]
    with ResultStore(sweep_env["store"]) as store:
        # Stages 0 and 1 are unseeded (16 and 4 runs at the fixed seed); the final point runs with 1234..1236.
        assert [len(store.trials(kind="telescope", stage=s)) for s in range(3)] == [16, 4, 3]
        assert all("seed" not in t.key and t.params["seed"] == 1234 for t in store.trials(stage=0))
        final = store.trials(stage=2)
        assert sorted(t.params["seed"] for t in final) == [1234, 1235, 1236]
        assert len({t.key.rsplit("/", 1)[0] for t in final}) == 1 and len({t.final_loss for t in final}) == 3
        losses = [t.final_loss for t in final]
    # The chosen point's spread over its seeds: mean, std and a bootstrap interval inside the seeds' range (up to
    # the rounding of a mean of three equal values).
    assert chosen_loss["seeds"] == 3 and chosen_loss["mean"] == pytest.approx(sum(losses) / 3)
    assert chosen_loss["std"] > 0 and chosen_loss["ci_low"] < chosen_loss["ci_high"]
    assert min(losses) - 1e-12 <= chosen_loss["ci_low"] and chosen_loss["ci_high"] <= max(losses) + 1e-12
    brute = sweep_env["args"]("--seeds", "3", seeded=True)
    brute[0] = "brute"
    assert main([*brute, "--brute-points", "4", "--parallel", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["optimum_loss"]["seeds"] == 3
    out = sweep_env["tmp"] / "report"
    assert main(["report", "--store", str(sweep_env["store"]), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == 3 and summary["chosen_spread"]["mean"] == pytest.approx(chosen_loss["mean"])
    assert [(s["runs"], s["seeds"]) for s in summary["stages"]] == [(16, 1), (4, 1), (3, 3)]
    (comparison,) = summary["brute_force"]
    assert comparison["runs"] == 48 and comparison["seeds"] == 3
    difference = comparison["loss_difference"]
    assert difference["mean"] == pytest.approx(comparison["telescope_final_stage_loss"] - comparison["optimum_loss"])
    assert comparison["difference_within_seed_noise"] == (difference["ci_low"] <= 0 <= difference["ci_high"])
    report = (out / "report.md").read_text()
    assert "Seeds: 3 per grid point of the final stage" in report and "paired by seed" in report
    # A sweep with seeds needs the seed to reach the trial.
    assert main(sweep_env["args"]("--seeds", "2")) == 2
    assert "needs a {seed} field" in capsys.readouterr().err


def test_refined_brute_force_seeds_only_its_best_points_and_resumes(sweep_env, capsys):
    """--refine-top 2: the 4 x 4 grid at the first seed, then its 2 best points with the other 2 seeds; the optimum
    is the better mean of those 2, and the report pairs it with the telescope's seeded choice."""
    assert main(sweep_env["args"]("--parallel", "4", "--seeds", "3", seeded=True)) == 0
    brute = sweep_env["args"]("--seeds", "3", seeded=True)
    brute[0] = "brute"
    refine = [*brute, "--brute-points", "4", "--parallel", "4", "--refine-top", "2"]
    capsys.readouterr()
    assert main(refine) == 0
    optimum = json.loads(capsys.readouterr().out)
    with ResultStore(sweep_env["store"]) as store:
        trials = store.trials(kind="brute_force")
    first = [t for t in trials if t.params["seed"] == 1234]
    assert len(first) == 16 and len(trials) == 16 + 2 * 2
    best_two = sorted(first, key=lambda t: t.final_loss)[:2]
    point = {t.key: t.key.rsplit("/", 1)[0] for t in trials}
    seeded = {point[t.key] for t in best_two}
    assert {point[t.key] for t in trials if t.params["seed"] != 1234} == seeded
    means = {p: sum(t.final_loss for t in trials if point[t.key] == p) / 3 for p in seeded}
    assert optimum["optimum_loss"]["seeds"] == 3
    assert optimum["optimum_loss"]["mean"] == pytest.approx(min(means.values()))
    assert optimum["refine_top"] == 2
    # Rerun: nothing left to run.
    started = sum(ledger_counts(sweep_env["ledger"], "start").values())
    assert main(refine) == 0 and sum(ledger_counts(sweep_env["ledger"], "start").values()) == started
    out = sweep_env["tmp"] / "report"
    assert main(["report", "--store", str(sweep_env["store"]), "--out", str(out)]) == 0
    (comparison,) = json.loads((out / "summary.json").read_text())["brute_force"]
    assert (comparison["runs"], comparison["seeds"], comparison["seeded_points"]) == (20, 3, 2)
    assert comparison["optimum_loss"] == pytest.approx(min(means.values()))
    assert comparison["loss_difference"]["seeds"] == 3 and comparison["difference_within_seed_noise"] is not None
    assert "4^2 points at one seed, the best 2 x 3 seeds = 20 runs" in (out / "report.md").read_text()
    # Refining needs seeds to refine with.
    one_seed = sweep_env["args"](seeded=True)
    one_seed[0] = "brute"
    assert main([*one_seed, "--store", str(sweep_env["tmp"] / "other.sqlite"), "--refine-top", "2"]) == 2
    assert "--refine-top 2: needs K >= 1 and --seeds 2 or more" in capsys.readouterr().err


def _seeded_store(path, telescope_corner, brute_corner):
    """A one-stage telescope (width 32, 3 x 3 points, 3 seeds) and a 3 x 3 brute force on the same grid, with
    constructed losses: 4.0 everywhere but the telescope's lr-2/wd-2 corner and the brute force's lr+2/wd+2 corner,
    which take the given losses for seeds 1234, 1235, 1236."""
    from megatron_muon.sweep.runner import TelescopeConfig, brute_force_specs, stage_specs
    from megatron_muon.sweep.telescope import LogRange

    config = TelescopeConfig(32, 32, (LogRange("lr", 1e-3, 1e-1), LogRange("wd", 1e-2, 1.0)), points=3,
                             template="{python} t.py --lr {lr} --wd {wd} --seed {seed} --out {out}",
                             fixed=dict(seed=1234), seeds=3)
    store = ResultStore(path, config.fingerprint_dict())
    stage = config.plan().stages[0]
    store.fix_stage(0, 32, config.plan().base_log_centre, stage_specs(config, stage, config.plan().base_log_centre))
    store.add_trials(brute_force_specs(config, 32, 3))
    for t in store.trials():
        corner, losses = (("lr-2/wd-2", telescope_corner) if t.kind == "telescope" else ("lr+2/wd+2", brute_corner))
        loss = losses[t.params["seed"] - 1234] if corner in t.key else 4.0
        store.mark_running(t.id, str(path.parent / str(t.id)), str(path.parent / f"{t.id}.log"))
        store.mark_finished(t.id, final_loss=loss, smoothed_loss=loss, tokens=100, wall_s=1.0, tokens_per_second=100.0,
                            curve=[(0.0, loss)])
    return store


@pytest.mark.parametrize("brute_corner, within_noise", [
    # Differences telescope - brute by seed: -0.02, +0.04, +0.01; the interval holds 0.
    ((3.02, 3.06, 3.04), True),
    # +0.10, +0.15, +0.12: all one sign, the interval stays above 0.
    ((2.90, 2.95, 2.93), False),
])
def test_a_miss_of_more_than_one_cell_is_judged_against_the_seed_noise(tmp_path, brute_corner, within_noise):
    from megatron_muon.sweep.report import write_report

    with _seeded_store(tmp_path / "s.sqlite", (3.00, 3.10, 3.05), brute_corner) as store:
        summary = write_report(store, tmp_path / "report")
    (stage,) = summary["stages"]
    assert stage["best_spread"]["mean"] == pytest.approx(3.05) and stage["best_spread"]["std"] == pytest.approx(0.05)
    (b,) = summary["brute_force"]
    # Opposite corners of a 3-point grid: two brute-force cells apart in both hyperparameters.
    assert b["distance_in_brute_cells"] == pytest.approx({"lr": 2.0, "wd": 2.0}) and not b["within_one_brute_cell"]
    assert b["loss_difference"]["mean"] == pytest.approx(3.05 - sum(brute_corner) / 3)
    assert b["difference_within_seed_noise"] is within_noise
    assert b["within_one_brute_cell_or_seed_noise"] is within_noise
    report = (tmp_path / "report" / "report.md").read_text()
    assert ("within the seed noise" if within_noise else "larger than the seed noise") in report
    assert "3.0500 +- 0.0500" in report


def test_plan_and_economics_commands(tmp_path, capsys):
    assert main(["plan", "--base-width", "2", "--calibration-width", "16", "--points", "8"]) == 0
    text = capsys.readouterr().out
    assert "final run = 20.0%" in text and "saves 92.2%" in text
    png = tmp_path / "fig13.png"
    assert main(["economics", "--grid-runs", "64", "4", "--levels", "2", "4", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    assert "   64      4  1.0000    4.000     20.0     92.2" in capsys.readouterr().out
