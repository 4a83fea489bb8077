"""examples/mup_lr_transfer.py on a tiny grid, as docs/mup.md runs it: every (parametrization, width, LR) trains,
and at the base width muP is the SP model (every multiplier is 1 there), so their losses agree."""

import csv
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_example_trains_every_cell_and_muP_is_SP_at_the_base_width(tmp_path):
    out = tmp_path / "lr"
    command = [sys.executable, "examples/mup_lr_transfer.py", "--preset", "essential_exact", "--widths", "32", "64",
               "--lrs", "0.01", "0.1", "--steps", "3", "--out-dir", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader((out / "lr_transfer.csv").open()))
    loss = {(r["parametrization"], int(r["width"]), float(r["lr"])): float(r["held_out_loss"]) for r in rows}
    assert set(loss) == {(p, w, lr) for p in ("sp", "mup") for w in (32, 64) for lr in (0.01, 0.1)}
    assert all(math.isfinite(v) and v < math.log(256) + 0.5 for v in loss.values())
    for lr in (0.01, 0.1):
        assert loss["mup", 32, lr] == loss["sp", 32, lr]
    assert "MUP (preset essential_exact, base width 32)" in result.stdout
