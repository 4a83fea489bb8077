"""Where trials run: local subprocesses on this machine, or SLURM job arrays.

A backend only starts commands and says whether they are still running; whether a trial succeeded is decided
by the runner from the result file the command leaves behind, so both backends (and a runner that restarted
and adopted jobs it did not start) judge trials the same way. Job ids are "backend:id" strings in the store.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RUNNING, ENDED = "running", "ended"


@dataclass(frozen=True)
class Launch:
    trial_id: int
    argv: tuple[str, ...]
    cwd: Path  # where the sweep was started: relative paths in the template mean what they meant there
    run_dir: Path
    result_path: Path
    log_path: Path


def backend_of(job_id: str | None) -> str | None:
    return None if job_id is None else job_id.split(":", 1)[0]


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM when the runner dies, even by SIGKILL, so no
    orphaned trial keeps computing a result that a restarted runner would also compute."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class LocalBackend:
    """Up to `parallel` trial processes at a time on this machine, each with `threads` intra-op threads."""

    name = "local"
    # Local children die with the runner; a restarted runner cannot poll them, so it judges them by their files.
    adopts_jobs = False

    def __init__(self, parallel: int = 1, threads: int = 1):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.capacity = parallel
        self._env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self._children: dict[str, subprocess.Popen] = {}

    def submit(self, launches: Sequence[Launch]) -> list[str]:
        job_ids = []
        for launch in launches:
            launch.run_dir.mkdir(parents=True, exist_ok=True)
            with open(launch.log_path, "ab") as log:
                child = subprocess.Popen(
                    launch.argv, cwd=launch.cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=self._env, start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            job_id = f"{self.name}:{child.pid}"
            self._children[job_id] = child
            job_ids.append(job_id)
        return job_ids

    def poll(self, job_ids: Sequence[str]) -> dict[str, str]:
        states = {}
        for job_id in job_ids:
            child = self._children.get(job_id)
            if child is not None and child.poll() is None:
                states[job_id] = RUNNING
            else:
                states[job_id] = ENDED
                self._children.pop(job_id, None)
        return states

    def find_submitted(self, run_dirs: Sequence[str]) -> dict[str, str]:
        return {}

    def describe_end(self, job_id: str) -> str:
        return ""

    def shutdown(self) -> None:
        """Stop every trial this backend started (the runner is exiting); each by its own process id."""
        for child in self._children.values():
            if child.poll() is None:
                child.terminate()
        for child in self._children.values():
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self._children.clear()


class SlurmBackend:
    """Each submission is one sbatch job array, one task per trial; tasks run the rendered trial command.

    `sbatch_args` go onto the #SBATCH lines (e.g. --partition=..., --gres=gpu:8, --time=...); `setup` lines run
    before the command in every task (module loads, environment activation). `max_running` throttles the array
    (%N). Jobs outlive the runner: a restarted runner polls the job ids the store recorded and adopts them, and
    finds by their unique job name the arrays whose ids it never recorded (killed while sbatch was answering).
    """

    name = "slurm"
    adopts_jobs = True
    capacity = None

    def __init__(self, work_dir: Path, sbatch_args: Sequence[str] = (), setup: Sequence[str] = (),
                 max_running: int | None = None, sbatch: str = "sbatch", squeue: str = "squeue",
                 sacct: str = "sacct"):
        self.work_dir = Path(work_dir).resolve()
        self.sbatch_args = list(sbatch_args)
        self.setup = list(setup)
        self.max_running = max_running
        self._sbatch, self._squeue, self._sacct = sbatch, squeue, sacct

    def _next_array_dir(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        existing = [int(p.name.split("-")[1]) for p in self.work_dir.glob("array-*") if p.name.split("-")[1].isdigit()]
        path = self.work_dir / f"array-{max(existing, default=-1) + 1:04d}"
        path.mkdir()
        return path

    @staticmethod
    def _job_name(array_dir: Path) -> str:
        # Unique per sweep directory and array, so that squeue can find an array by name alone.
        return f"sweep-{array_dir.name}-{hashlib.sha1(str(array_dir).encode()).hexdigest()[:10]}"

    def submit(self, launches: Sequence[Launch]) -> list[str]:
        if not launches:
            return []
        array_dir = self._next_array_dir()
        commands = array_dir / "commands.sh"
        lines = []
        for launch in launches:
            launch.run_dir.mkdir(parents=True, exist_ok=True)
            lines.append(f"cd {shlex.quote(str(launch.cwd))} && exec {shlex.join(launch.argv)} "
                         f">> {shlex.quote(str(launch.log_path))} 2>&1")
        commands.write_text("\n".join(lines) + "\n")
        # Task i runs the attempt in line i; find_submitted reads this when the job id was never recorded.
        (array_dir / "run_dirs").write_text("".join(f"{launch.run_dir}\n" for launch in launches))
        throttle = f"%{self.max_running}" if self.max_running else ""
        script = array_dir / "array.sbatch"
        script.write_text("\n".join([
            "#!/bin/bash",
            f"#SBATCH --array=0-{len(launches) - 1}{throttle}",
            f"#SBATCH --output={array_dir}/task-%a.out",
            f"#SBATCH --job-name={self._job_name(array_dir)}",
            *(f"#SBATCH {arg}" for arg in self.sbatch_args),
            "set -eo pipefail",
            *self.setup,
            f'line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(commands))})',
            'eval "$line"',
            "",
        ]))
        out = subprocess.run([self._sbatch, "--parsable", str(script)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        # --parsable prints "jobid" or "jobid;cluster".
        array_id = out.stdout.strip().split(";")[0]
        if not array_id.isdigit():
            raise RuntimeError(f"sbatch printed {out.stdout.strip()!r}, expected a job id")
        return [f"{self.name}:{array_id}_{i}" for i in range(len(launches))]

    def poll(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Tasks squeue still lists are running (pending counts as running); the rest have ended. If squeue itself
        fails, everything is reported running: a scheduler hiccup must not look like a finished trial."""
        if not job_ids:
            return {}
        arrays = sorted({j.split(":", 1)[1].split("_")[0] for j in job_ids})
        out = subprocess.run([self._squeue, "-h", "-r", "-o", "%i", "-j", ",".join(arrays)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            # squeue exits non-zero for ids it has already forgotten; only an error on all of them is ambiguous.
            if "Invalid job id" not in out.stderr:
                return {j: RUNNING for j in job_ids}
        listed = {f"{self.name}:{line.strip()}" for line in out.stdout.splitlines() if line.strip()}
        return {j: RUNNING if j in listed else ENDED for j in job_ids}

    def find_submitted(self, run_dirs: Sequence[str]) -> dict[str, str]:
        """Job ids of the still queued or running tasks that run these attempt directories, for attempts whose
        runner was stopped after sbatch accepted the array but before the store recorded its id. Attempts not
        found have ended (their result file decides) or were never submitted."""
        wanted = set(map(str, run_dirs))
        arrays = {}  # job name -> attempt directory of each task index
        for listing in sorted(self.work_dir.glob("array-*/run_dirs")):
            tasks = listing.read_text().splitlines()
            if wanted.intersection(tasks):
                arrays[self._job_name(listing.parent)] = tasks
        if not arrays:
            return {}
        out = subprocess.run([self._squeue, "-h", "-r", "-o", "%j %i", "--name", ",".join(arrays)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            # Guessing "not submitted" here would run these trials twice on the cluster.
            raise RuntimeError(f"squeue failed ({out.returncode}) while looking for arrays {sorted(arrays)} whose "
                               f"job ids were never recorded: {out.stderr.strip()}; rerun once squeue answers")
        found = {}
        for line in out.stdout.splitlines():
            name, task = line.split()
            run_dir = arrays[name][int(task.split("_")[1])]
            if run_dir in wanted:
                found[run_dir] = f"{self.name}:{task}"
        return found

    def describe_end(self, job_id: str) -> str:
        """SLURM's account of an ended task (state and exit code), when sacct is available."""
        task = job_id.split(":", 1)[1]
        try:
            out = subprocess.run([self._sacct, "-n", "-P", "-X", "-j", task, "-o", "State,ExitCode"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return f"slurm: {out.stdout.strip()}" if out.returncode == 0 and out.stdout.strip() else ""

    def shutdown(self) -> None:
        """Jobs keep running on the cluster; the next runner adopts them."""
