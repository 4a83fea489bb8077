"""The sweep's embedded trial (megatron_muon.sweep.trial) on both data sources, and the default sweep template
running it end to end. Trials run as subprocesses, as the sweep runs them (each owns its gloo process group)."""

import json
import math
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from megatron_muon.sweep import trial

REPO = Path(__file__).resolve().parents[1]
SMALL_STDLIB = ["--corpus-bytes", "150000"]  # a seeded sample of the stdlib: builds in about a second


def run_trial(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "megatron_muon.sweep.trial", "--width", "32", "--lr", "0.02", "--steps", "16",
           "--global-batch", "8", "--log-every", "0", "--data-dir", str(tmp_path / "data"), "--out", str(out), *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_corpus_trial_learns_the_embedded_python_corpus(tmp_path):
    result = run_trial(tmp_path, *SMALL_STDLIB)
    assert result["config"]["data"] == "corpus" and result["best_possible_loss"] is None
    assert result["steps"] == 16 and result["tokens"] == 16 * 8 * 32
    assert [tokens for tokens, _ in result["curve"]] == [step * 8 * 32 for step in range(16)]
    # An untrained model with small logits predicts nearly uniformly over the 512 sentencepiece tokens.
    assert abs(result["curve"][0][1] - math.log(512)) < 0.2
    assert result["final_loss"] < math.log(512) - 1.0


def test_markov_trial_reports_its_entropy_floor(tmp_path):
    result = run_trial(tmp_path, "--data", "markov")
    assert result["best_possible_loss"] == pytest.approx(math.log(4))
    assert abs(result["curve"][0][1] - math.log(256)) < 0.2
    assert result["final_loss"] < math.log(256)


def test_a_run_longer_than_the_corpus_is_refused_before_training(tmp_path):
    args = trial.parse_args(["--width", "32", "--lr", "0.02", "--steps", "100000", "--global-batch", "64",
                             "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r.json"), *SMALL_STDLIB])
    with pytest.raises(SystemExit, match=r"100000 steps of 64 sequences need 6400000 fresh sequences of 33 tokens"):
        trial.CorpusData(args)


def test_corpus_batches_are_disjoint_rows_of_the_train_split(tmp_path):
    args = trial.parse_args(["--width", "32", "--lr", "0.02", "--steps", "50", "--global-batch", "8",
                             "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r.json"), *SMALL_STDLIB])
    data = trial.CorpusData(args)
    from megatron_muon.data.corpus import build_dataset

    built = build_dataset(data_dir=tmp_path / "data", vocab_size=512, max_corpus_bytes=150000, progress=False)
    train_rows = trial.token_windows(built.train_prefix, 33)
    available = Counter(tuple(row.tolist()) for row in train_rows)
    drawn = Counter(tuple(row.tolist()) for step in range(50) for row in data.batch(step, 8))
    # The stdlib repeats some 33-token windows verbatim, so compare multisets: no train sequence is drawn more
    # often than it occurs, i.e. no step sees a sequence an earlier step saw.
    assert sum(drawn.values()) == 400 and all(count <= available[row] for row, count in drawn.items())
    assert data.held_out.shape == (trial.HELD_OUT_SEQUENCES, 33)


def test_default_sweep_template_runs_the_embedded_trial(tmp_path):
    """The sweep's default command line (muP relative to the base width, embedded corpus) through two stages."""
    store = tmp_path / "sweep.sqlite"
    cmd = [sys.executable, "-m", "megatron_muon.sweep", "telescope", "--store", str(store), "--base-width", "32",
           "--calibration-width", "64", "--points", "2", "--hp", "lr=1e-2:3e-2", "--hp", "wd=1e-2:1e-1",
           "--fixed", "steps=4", "--fixed", "global_batch=4", "--parallel", "2", "--quiet"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, MEGATRON_MUON_DATA_DIR=str(tmp_path / "data")))
    assert result.returncode == 0, result.stderr[-3000:]
    with sqlite3.connect(store) as conn:
        rows = conn.execute("SELECT width, status, final_loss FROM trials ORDER BY id").fetchall()
    assert [(width, status) for width, status, _ in rows] == [(32, "done")] * 4 + [(64, "done")]
    assert all(math.isfinite(loss) and loss < math.log(512) for _, _, loss in rows)
