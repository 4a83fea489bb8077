"""examples/quickstart_lr_grid.py: the quickstart's learning-rate grid, run end to end at a tiny setting, and its
log parsing and table on known input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_launch import _env, _run
from tests.test_train import corpus  # noqa: F401 (the fixture: 16 small Python documents)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "quickstart_lr_grid.py"

sys.path.insert(0, str(REPO / "examples"))
import quickstart_lr_grid as grid  # noqa: E402

LOG = """\
 iteration        1/       2 | consumed samples:            2 | learning rate: 1.0E-02 | lm loss: 8.317E+00 |
 iteration        2/       2 | consumed samples:            4 | learning rate: 1.0E-03 | lm loss: 8.101E+00 |
 validation loss at iteration 2 | lm loss value: 8.050000E+00 | lm loss PPL: 3.1E+03 |
 validation loss at iteration 2 on validation set | lm loss value: 8.040000E+00 | lm loss PPL: 3.1E+03 |
"""


def test_parse_log_takes_the_last_validation_loss_and_keeps_them_all():
    parsed = grid.parse_log(LOG)
    assert parsed["validation_loss"] == pytest.approx(8.04)
    assert [v["after_training"] for v in parsed["validation_losses"]] == [False, True]
    assert parsed["final_train_loss"] == pytest.approx(8.101) and parsed["last_iteration"] == 2
    assert grid.parse_log("no evaluation here")["validation_loss"] is None


def test_table_marks_the_best_lr_per_optimizer_and_failures():
    runs = [
        {"optimizer": "muon", "lr": 1e-2, "validation_loss": 4.83},
        {"optimizer": "muon", "lr": 3e-3, "validation_loss": 5.28},
        {"optimizer": "adam", "lr": 1e-2, "validation_loss": None, "error": "exit 1"},
        {"optimizer": "adam", "lr": 3e-3, "validation_loss": 5.65},
    ]
    table = grid.format_table(runs, ["muon", "adam"], [3e-3, 1e-2], "title")
    lines = table.splitlines()
    assert lines[0] == "title" and lines[1].split() == ["lr", "muon", "adam"]
    assert lines[2].split() == ["0.003", "5.28", "5.65*"]
    assert lines[3].split() == ["0.01", "4.83*", "failed", "(exit", "1)"]
    assert lines[-1] == "best: muon lr 0.01 (4.83), adam lr 0.003 (5.65)"


def test_two_learning_rates_train_through_the_quickstart_command(corpus, tmp_path):
    out, json_path = tmp_path / "grid", tmp_path / "grid.json"
    cmd = [sys.executable, str(SCRIPT), "--optimizers", "muon", "--lrs", "1e-3", "1e-2", "--iters", "2",
           "--batch", "2", "--log-interval", "1", "--out", str(out), "--data-dir", str(tmp_path / "data"),
           "--json", str(json_path),
           "--", "--corpus", str(corpus), "--corpus-vocab-size", "400", "--seq-length", "32",
           "--max-position-embeddings", "32", "--eval-iters", "1"]
    result = _run(cmd, _env(), timeout=600)
    assert result.returncode == 0, result.stdout[-6000:]

    summary = json.loads(json_path.read_text())
    runs = summary["runs"]
    assert [(r["optimizer"], r["lr"]) for r in runs] == [("muon", 1e-3), ("muon", 1e-2)]
    for run in runs:
        assert run["returncode"] == 0 and run["last_iteration"] == 2
        assert math.isfinite(run["validation_loss"]) and run["validation_losses"][-1]["iteration"] == 2
        assert Path(run["log"]).is_file()
        # The quickstart's own command, with this run's learning rate, and the extra flags last.
        command = run["command"]
        assert command[:3] == ["python", "-m", "megatron_muon.train"]
        assert command[command.index("--lr") + 1] == str(run["lr"])
        assert command[command.index("--optimizer") + 1] == "muon"
        assert command[-2:] == ["--eval-iters", "1"]
    best = min(runs, key=lambda r: r["validation_loss"])
    assert summary["best"] == {"muon": {"lr": best["lr"], "validation_loss": best["validation_loss"]}}
    assert summary["setup"]["iters"] == 2 and summary["setup"]["lrs"] == [1e-3, 1e-2]

    # The printed table: one row per learning rate, the best one starred, then the JSON path.
    assert "cpu-tiny, 2 iterations of 2 sequences: validation lm loss" in result.stdout
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in ("0.001", "0.01")}
    assert rows.keys() == {"0.001", "0.01"}
    assert rows[f"{best['lr']:g}"] == f"{best['validation_loss']:.2f}*"
    assert f"json: {json_path}" in result.stdout


def test_bad_iterations_are_refused():
    result = subprocess.run([sys.executable, str(SCRIPT), "--iters", "0"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "--iters must be >= 1" in result.stderr
