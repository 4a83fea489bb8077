"""The sweep's embedded trial (megatron_muon.sweep.trial) on both data sources, and the default sweep template
running it end to end. Trials run as subprocesses, as the sweep runs them (each owns its gloo process group); the
muP knobs' effect on the optimizer and the logits is read in one gloo rank."""

import argparse
import json
import math
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

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


# muP at width 64 relative to 16 (head dim 8, so the base keeps whole GQA pairs): r = 4, so the essential preset
# gives the logits x 1/sqrt(4) = 0.5 and the embedding's Adam LR x 0.5.
KNOB_MODEL = ["--width", "64", "--head-dim", "8", "--mup-base-width", "16", "--lr", "0.02", "--steps", "3",
              "--out", "unused.json"]


def _knob_effects(extra_by_name: dict) -> dict:
    """Per trial command line (KNOB_MODEL + extra): Megatron's logit multiplier, (max_lr, min_lr) of the optimizer
    group that holds the word embedding, the fresh model's logits on one batch, and the losses of 3 steps."""
    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import Trainer, position_ids_and_mask, token_batches

    rows = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, extra in extra_by_name.items():
        args = trial.parse_args(KNOB_MODEL + extra)
        with model_parallel(seed=args.seed):
            trainer = Trainer(trial.training_setup(args, trial.shape_for_width(64, 128, args)))
            model = trainer.models[0]
            embedding = model.embedding.word_embeddings.weight
            (group,) = [g for inner in trainer.optimizer.chained_optimizers for g in inner.optimizer.param_groups
                        if any(p is embedding for p in g["params"])]
            with torch.no_grad():
                logits = model(rows[:, :-1], *position_ids_and_mask(rows[:, :-1]))
            losses = [trainer.step(token_batches(rows, 4)) for _ in range(3)]
            out[name] = dict(output_mult=model.config.mup_output_mult, embedding_lr=(group["max_lr"], group["min_lr"]),
                             logits=logits, losses=losses)
    return out


def test_mup_knobs_multiply_the_embedding_lr_and_the_logits_and_are_a_no_op_at_1():
    from megatron_muon.testing.ranks import run_ranks

    (seen,) = run_ranks(_knob_effects, 1, ({
        "preset": [],
        "knobs": ["--embedding-lr-mult", "3", "--output-mult", "2"],
        "ones": ["--embedding-lr-mult", "1", "--output-mult", "1"],
    },))
    preset, knobs, ones = seen["preset"], seen["knobs"], seen["ones"]
    assert preset["output_mult"] == 0.5 and preset["embedding_lr"] == pytest.approx((0.01, 0.001))
    # 0.5 x 2 is exactly 1, which Megatron would read as unset and replace by 1/r: the plugin keeps it.
    assert knobs["output_mult"] == 1.0
    assert knobs["embedding_lr"] == pytest.approx((0.03, 0.003))
    # Same init (the knobs change no weight), logits doubled.
    torch.testing.assert_close(knobs["logits"], 2 * preset["logits"])
    assert knobs["losses"] != preset["losses"]
    # At 1 nothing changes, to the bit.
    assert ones["output_mult"] == preset["output_mult"] and ones["embedding_lr"] == preset["embedding_lr"]
    assert torch.equal(ones["logits"], preset["logits"]) and ones["losses"] == preset["losses"]


@pytest.mark.parametrize("extra, message", [
    (["--mup-base-width", "0", "--output-mult", "2"], "--output-mult multiplies a muP multiplier; it needs muP"),
    (["--mup-base-width", "0", "--embedding-lr-mult", "0.5"], "--embedding-lr-mult multiplies a muP multiplier"),
    (["--output-mult", "0"], "argument --output-mult: '0' is not a finite number > 0"),
    (["--embedding-lr-mult", "inf"], "argument --embedding-lr-mult: 'inf' is not a finite number > 0"),
])
def test_mup_knobs_are_refused_without_mup_and_when_not_positive(extra, message, capsys):
    with pytest.raises(SystemExit):
        trial.parse_args(KNOB_MODEL + extra)
    assert message in capsys.readouterr().err


def test_default_template_passes_the_mup_knobs_and_preset_only_when_named(tmp_path):
    from megatron_muon.sweep.__main__ import add_config_args, config_from
    from megatron_muon.sweep.runner import DEFAULT_TEMPLATE, render

    def config(*argv):
        parser = argparse.ArgumentParser()
        add_config_args(parser)
        return config_from(parser.parse_args(list(argv)))

    # Naming none keeps the template, and so the fingerprint, of stores made before the knobs existed.
    assert config().template == DEFAULT_TEMPLATE + " --mup-base-width {mup_base_width}"
    knobs = config("--hp", "lr=1e-2:1e-1", "--hp", "output_mult=0.25:4", "--hp", "embedding_lr_mult=0.25:4",
                   "--fixed", "wd=0.001", "--fixed", "mup_preset=spectral", "--points", "3")
    assert knobs.template.endswith(" --mup-preset {mup_preset} --embedding-lr-mult {embedding_lr_mult} "
                                   "--output-mult {output_mult}")
    command = render(knobs.template, dict(knobs.fixed, width=64, lr=0.02, embedding_lr_mult=0.5, output_mult=2.0),
                     tmp_path)
    args = trial.parse_args(command[command.index("megatron_muon.sweep.trial") + 1:])
    assert (args.mup_preset, args.embedding_lr_mult, args.output_mult, args.wd, args.mup_base_width) == \
        ("spectral", 0.5, 2.0, 0.001, 32)
