"""Every command the README and docs/ print in a ```bash block runs, exactly as printed, and succeeds.

Blocks fenced as ```bash hold commands a reader can paste; templates with placeholders (your script, your data, a
GPU cluster) are fenced as ```text and say so. A bash command that is too slow for the suite, or that installs
or runs the suite itself, must be listed in `NOT_RUN_HERE` with the reason and the test that runs its code path:
an unlisted command that is not run here fails the test, so a new command in the docs is placed deliberately.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_launch import _env

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)

NOT_RUN_HERE = {
    "make test": "the suite itself (CI runs it: .ci/run)",
    "make demo": "10 minutes of training; examples/quickstart.py's path is python -m megatron_muon.train, run below "
                 "and by tests/test_train.py, and its LR grid by tests/test_quickstart_lr_grid.py",
    "make test PYTEST_ARGS=\"-k newton -x\"": "runs part of the suite inside the suite",
    ".venv/bin/python -m pytest -m \"not multirank\"": "runs most of the suite inside the suite",
    "pip install -e .": "installs; .ci/run installs the same project with make's pip install -e '.[dev]'",
    "pip install -e '.[te]'": "Transformer Engine needs CUDA; never installed on CPU",
    "pip install -e '.[dev]'": "what make test runs on a fresh clone",
    "python examples/mup_lr_transfer.py --preset essential": "~20 minutes; tests/test_mup_lr_transfer.py runs it "
                                                             "on a tiny grid",
    **{f"python examples/mup_lr_transfer.py --preset {preset} --parametrizations mup --out-dir "
       f"results/mup_lr_transfer_{preset}": "~12 minutes on one core; tests/test_mup_lr_transfer.py runs it on a tiny grid"
       for preset in ("essential", "essential_exact", "spectral")},
    "python -m megatron_muon.sweep telescope --store s.sqlite --hp lr=1e-3:3e-1 --hp wd=1e-3:1 --fixed steps=150 "
    "--parallel 2": "hours of trials on CPU; tests/test_trial.py runs the default template through two stages",
    "python -m megatron_muon.sweep report --store s.sqlite --out report/": "needs the store of the telescope above; "
                                                                             "tests/test_sweep.py reports a store",
    "python -m megatron_muon.study batch --batch-sizes 4 8 16 32 64 --lr muon=0.01,0.03 --lr adamw=0.003,0.01 "
    "--out bs/": "20 training runs; tests/test_study.py runs the study end to end on a small grid",
    "python examples/reproduce_paper.py": "59 minutes on 2 cores; regenerates examples/reproduce_paper.md; its "
        "pieces are tested in tests/test_trial.py (muP knobs, template fields), tests/test_sweep.py (refined brute "
        "force) and tests/test_reproduce_paper.py (the gap study's analysis)",
    "python examples/reproduce_paper.py --quick": "15 minutes on 2 cores; the same commands as the full run on "
                                                  "smaller grids",
    "make gpu-check": "the GPU acceptance run; on CPU its subset, run by tests/test_gpu_check.py",
    "python benchmarks/gpu_check.py --parts newton_schulz training --optimizers muon adam": "two of the CPU parts "
        "of the subset that tests/test_gpu_check.py::test_cpu_subset_end_to_end runs",
    "python benchmarks/gpu_check.py --device cpu --train-iters 4 --optimizers muon adam --ns-repeats 1":
        "tests/test_gpu_check.py::test_cpu_subset_end_to_end runs these flags (with a JSON path of its own)",
}


def _commands(text: str) -> list[str]:
    """Shell commands of the ```bash blocks: continuation lines joined, comments and blank lines dropped."""
    found = []
    for block in FENCE.findall(text):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            command = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if command:
                found.append(" ".join(command.split()))
    return found


COMMANDS = sorted({c for doc in DOCS for c in _commands(doc.read_text())})
RUN = [c for c in COMMANDS if c not in NOT_RUN_HERE]


def test_every_documented_command_is_run_or_placed():
    assert COMMANDS, "no ```bash block found: the parser is broken"
    stale = set(NOT_RUN_HERE) - set(COMMANDS)
    assert not stale, f"NOT_RUN_HERE lists commands the docs no longer print: {sorted(stale)}"
    assert "python -m megatron_muon.train --model-config cpu-tiny --optimizer muon --lr 1e-2 --train-iters 20 " \
           "--micro-batch-size 16 --global-batch-size 16 --use-distributed-optimizer --tensorboard-dir runs/tb" in RUN


def test_the_parser_joins_continuations_and_drops_comments():
    text = "x\n```bash\n# a comment\npython a.py --x 1 \\\n    --y 2   # trailing\n\nmake demo\n```\n```text\nno\n```\n"
    assert _commands(text) == ["python a.py --x 1 --y 2", "make demo"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch directory where the repository's relative paths resolve; outputs (runs/, stores) stay in it."""
    root = tmp_path_factory.mktemp("docs")
    for name in ("examples", "benchmarks", "launch", "patches", "docs", ".venv"):
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    (root / "tests").symlink_to(REPO / "tests")
    return root


@pytest.mark.parametrize("command", RUN)
def test_documented_command_runs_as_printed(command, workdir, tmp_path_factory):
    env = _env(MEGATRON_MUON_DATA_DIR=str(tmp_path_factory.getbasetemp() / "data"), PYTHONPATH=str(REPO))
    # `python` in the docs is the environment's interpreter (the README installs the plugin into it).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command}\n{output[-6000:]}"
    assert "Traceback" not in output, output[-6000:]
    if shlex.split(command)[:3] in (["python", "-m", "megatron_muon.train"], ["python", "-m", "megatron_muon.launch"]):
        assert re.search(r"iteration\s+\d+/\s*\d+ \|.*lm loss", output), output[-6000:]
