"""The batch-size study command: runs through the sweep store with a fake trial whose answers are known, imports
from Megatron-style TensorBoard logs, and refuses bad input."""

import csv
import json
import math
import textwrap

import pytest

from megatron_muon.study.__main__ import main, parse_lr_grid, parse_per_optimizer
from megatron_muon.study.batch import STUDY_TEMPLATE

# loss(T) = 1 + 4 exp(-rate T) with rate = r0 / (1 + B / B_crit): AdamW is 1.2x slower than Muon at small batch and
# its critical batch is half Muon's, so R_L(B) = 1.2 (1 + B/32) / (1 + B/64) for every L. An off-optimum learning
# rate halves the rate, so the study must pick the good one at each batch size. Given --seed, the rate is off by
# -2%, 0 or +2% (seed mod 3), shifted by one seed for AdamW, so the two optimizers' seeds disagree on R.
FAKE_TRIAL = textwrap.dedent("""
    import argparse, json, math, os
    p = argparse.ArgumentParser()
    for name in ("--optimizer", "--out"): p.add_argument(name)
    for name in ("--global-batch", "--steps", "--seq-length", "--seed"): p.add_argument(name, type=int)
    p.add_argument("--lr", type=float)
    a = p.parse_args()
    good_lr = 0.02 if a.optimizer == "muon" else 0.005
    r0 = (1e-4 if a.optimizer == "muon" else 1e-4 / 1.2) * (1.0 if a.lr == good_lr else 0.5)
    if a.seed is not None:
        r0 *= 1 + 0.02 * ((a.seed + (a.optimizer == "adamw")) % 3 - 1)
    rate = r0 / (1 + a.global_batch / (64 if a.optimizer == "muon" else 32))
    step_tokens = a.global_batch * a.seq_length
    curve = [[s * step_tokens, 1 + 4 * math.exp(-rate * s * step_tokens)] for s in range(a.steps)]
    with open(a.out, "w") as f:
        json.dump(dict(final_loss=curve[-1][1], curve=curve, tokens=a.steps * step_tokens,
                       wall_s=a.steps * step_tokens / (1000.0 if a.optimizer == "muon" else 1100.0)), f)
""")


def expected_ratio(batch_sequences):
    return 1.2 * (1 + batch_sequences / 32) / (1 + batch_sequences / 64)


@pytest.fixture
def study_args(tmp_path):
    trial = tmp_path / "fake_trial.py"
    trial.write_text(FAKE_TRIAL)

    def args(*extra, seeded=False):
        return [
            "batch", "--store", str(tmp_path / "study.sqlite"), "--out", str(tmp_path / "out"),
            "--batch-sizes", "4", "16", "64", "--seq-length", "8", "--tokens", "65536",
            "--lr", "muon=0.01,0.02", "--lr", "adamw=0.005,0.02", "--ema", "0", "--num-thresholds", "5",
            "--device-unit", "64",
            "--template", f"{{python}} {trial} --optimizer {{optimizer}} --global-batch {{global_batch}} "
                          "--steps {steps} --lr {lr} --seq-length {seq_length} --out {out}"
                          + (" --seed {seed}" if seeded else ""),
            "--parallel", "4", "--poll-s", "0.05", "--quiet", *extra,
        ]

    return args


def test_study_runs_picks_the_best_lr_and_recovers_the_known_ratio(study_args, tmp_path, capsys):
    assert main(study_args()) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batch_tokens"] == [32, 128, 512]
    assert {(c["optimizer"], c["lr"]) for c in summary["chosen_runs"]} == {("muon", 0.02), ("adamw", 0.005)}
    # Both grids have two points, so every choice is on an edge: Muon's highest, AdamW's lowest.
    assert {(c["optimizer"], c["lr_on_grid_edge"]) for c in summary["chosen_runs"]} == {("muon", "highest"),
                                                                                         ("adamw", "lowest")}
    assert summary["seeds"] == [1234]
    for entry in summary["per_threshold"]:
        for ratio, batch in zip(entry["ratio"], (4, 16, 64)):
            assert ratio == pytest.approx(expected_ratio(batch), rel=0.02)
        # One seed: the trend is measured, but nothing is claimed at a confidence.
        assert entry["ratio_spearman"] == pytest.approx(1.0)
        assert entry["ratio_above_1_confident"] is None and entry["ratio_increasing_confident"] is None
        assert all(math.isnan(x) for x in entry["ratio_ci_low"] + entry["ratio_ci_high"])
        # Tokens to loss grow with B for both: the smallest batch is token-optimal.
        assert entry["token_optimal_batch_muon"] == 32 and entry["token_optimal_batch_adamw"] == 32
        assert all(-1 < s < 0 for s in entry["steps_slopes_muon"])
    assert math.isnan(summary["share_of_thresholds_with_ratio_above_1_confident"])
    assert summary["devices"] == {"32": 8, "128": 32, "512": 128}
    err = capsys.readouterr().err
    assert "one seed: point estimates only" in err
    assert "muon B=128: lr 0.02 of [0.01, 0.02]" in err and "<- highest rate of the grid" in err
    rows = list(csv.DictReader(open(out / "batch_study.csv")))
    assert len(rows) == 15
    row = rows[0]
    # hours = T / (devices x measured tokens/s): Muon's fake throughput is 1000 tokens/s per device.
    assert float(row["hours_muon"]) == pytest.approx(float(row["tokens_muon"]) / (8 * 1000.0) / 3600, rel=1e-6)
    for name in ("token_ratio.png", "steps_and_tokens_to_loss.png", "compute_time.png", "curves.png",
                 "token_optimal.csv"):
        assert (out / name).stat().st_size > 0
    # Rerunning is a resume: nothing is run again, the analysis is rewritten.
    (out / "token_ratio.png").unlink()
    assert main(study_args()) == 0
    assert (out / "token_ratio.png").exists()
    # Analysis-only from the store gives the same table.
    assert main(["batch", "--from-store", str(tmp_path / "study.sqlite"), "--out", str(tmp_path / "again"),
                 "--ema", "0", "--num-thresholds", "5", "--device-unit", "64"]) == 0
    assert list(csv.DictReader(open(tmp_path / "again" / "batch_study.csv"))) == rows


def test_seeds_give_intervals_that_bracket_the_ratio_and_confident_verdicts(study_args, tmp_path, capsys):
    assert main(study_args("--seeds", "3", seeded=True)) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [1234, 1235, 1236] and summary["confidence"] == 0.95
    chosen = summary["chosen_runs"]
    assert {(c["optimizer"], c["lr"]) for c in chosen} == {("muon", 0.02), ("adamw", 0.005)}
    assert all(c["seeds"] == [1234, 1235, 1236] and c["final_loss_std"] > 0 for c in chosen)
    for entry in summary["per_threshold"]:
        for ratio, low, high, batch in zip(entry["ratio"], entry["ratio_ci_low"], entry["ratio_ci_high"], (4, 16, 64)):
            # Seed noise of +-2% per optimizer: an interval of nonzero width around the point, near the known ratio.
            assert low < ratio < high and high - low < 0.1 * ratio
            assert ratio == pytest.approx(expected_ratio(batch), rel=0.05)
        # R grows from 1.27 to 1.8 over B, far beyond +-4% noise: R > 1 in every replicate, and every replicate's
        # ratios keep their order.
        assert entry["ratio_above_1_confidence"] == 1.0 and entry["ratio_above_1_confident"] is True
        assert entry["ratio_spearman_ci_low"] == entry["ratio_spearman_ci_high"] == 1.0
        assert entry["ratio_increasing_confident"] is True
    assert summary["share_of_thresholds_with_ratio_above_1_confident"] == 1.0
    assert summary["share_of_thresholds_with_ratio_increasing_confident"] == 1.0
    rows = list(csv.DictReader(open(out / "batch_study.csv")))
    assert len(rows) == 15 and all(r["seeds"] == "3" for r in rows)
    for column in ("tokens_adamw", "tokens_muon", "ratio", "token_difference"):
        assert all(float(r[f"{column}_ci_low"]) <= float(r[column]) <= float(r[f"{column}_ci_high"]) for r in rows)
    err = capsys.readouterr().err
    assert "3 seeds [1234, 1235, 1236]: T_L(B) is the mean over seeds" in err
    assert "R > 1 everywhere: yes (1.000); increasing: yes (rho 1.00 [1.00, 1.00])" in err
    # The bootstrap's RNG is seeded: the analysis of the same runs is the same, file for file.
    first = (out / "batch_study.csv").read_text()
    assert main(["batch", "--from-store", str(tmp_path / "study.sqlite"), "--out", str(tmp_path / "again"),
                 "--ema", "0", "--num-thresholds", "5", "--device-unit", "64"]) == 0
    assert (tmp_path / "again" / "batch_study.csv").read_text() == first


def test_seeds_end_to_end_with_the_real_trial(tmp_path, capsys):
    """The study's default trial (a tiny Megatron GPT on the synthetic Markov language, the cheapest data it has):
    2 batch sizes x 1 learning rate x 2 optimizers x 2 seeds, 16 and 8 steps."""
    template = STUDY_TEMPLATE + " --data markov --vocab 64 --log-every 0"
    out = tmp_path / "out"
    assert main(["batch", "--store", str(tmp_path / "study.sqlite"), "--out", str(out), "--batch-sizes", "4", "8",
                 "--seq-length", "16", "--tokens", "1024", "--width", "32", "--lr", "muon=0.02", "--lr", "adamw=0.01",
                 "--seeds", "2", "--num-thresholds", "3", "--device-unit", "64", "--template", template,
                 "--parallel", "2", "--poll-s", "0.2", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [1234, 1235] and summary["batch_tokens"] == [64, 128]
    # The seed reaches the trial: its two seeds are two different runs (model init and data order).
    assert len(summary["chosen_runs"]) == 4 and all(c["final_loss_std"] > 0 for c in summary["chosen_runs"])
    for entry in summary["per_threshold"]:
        for key in ("ratio", "token_difference", "tokens_muon", "tokens_adamw"):
            assert len(entry[f"{key}_ci_low"]) == len(entry[f"{key}_ci_high"]) == 2
        assert entry["ratio_above_1_confident"] in (True, False, None)
        assert -1 <= entry["ratio_spearman_ci_low"] <= entry["ratio_spearman_ci_high"] <= 1
    rows = list(csv.DictReader(open(out / "batch_study.csv")))
    assert {"ratio_ci_low", "ratio_ci_high", "token_difference_ci_low", "token_difference_ci_high",
            "tokens_muon_ci_low", "tokens_adamw_ci_high"} <= set(rows[0])
    reached = [r for r in rows if math.isfinite(float(r["ratio"]))]
    assert reached and all(float(r["ratio_ci_low"]) <= float(r["ratio"]) <= float(r["ratio_ci_high"]) for r in reached)
    err = capsys.readouterr().err
    assert "2 seeds [1234, 1235]: T_L(B) is the mean over seeds; [95% percentile-bootstrap intervals" in err
    assert "R > 1 everywhere: " in err and "increasing: " in err
    assert "muon B=64: lr 0.02 of [0.02], final loss" in err


def test_tensorboard_import(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    specs = []
    for optimizer, rate in (("muon", 1e-3), ("adamw", 0.5e-3)):
        for batch_tokens in (64, 256):
            logdir = tmp_path / f"{optimizer}-{batch_tokens}"
            writer = SummaryWriter(str(logdir))
            for iteration in range(1, 200):
                writer.add_scalar("lm loss", 1 + 4 * math.exp(-rate * (iteration - 1) * batch_tokens), iteration)
                writer.add_scalar("iteration-time", 0.5, iteration)
            writer.close()
            specs += ["--tensorboard", f"{optimizer}:{batch_tokens}:{logdir}"]
    out = tmp_path / "tb"
    assert main(["batch", *specs, "--out", str(out), "--ema", "0", "--thresholds", "3", "2"]) == 0
    rows = list(csv.DictReader(open(out / "batch_study.csv")))
    # Loss is a function of tokens alone, so T_L is the same at both batch sizes and R is the rate ratio, 2.
    assert [float(r["ratio"]) for r in rows] == pytest.approx([2, 2, 2, 2], rel=0.02)
    # One per-device throughput per optimizer: the median over its runs of tokens per step / iteration-time,
    # here median(64 / 0.5, 256 / 0.5) = 320 tokens/s.
    assert float(rows[0]["hours_muon"]) == pytest.approx(float(rows[0]["tokens_muon"]) / (8 * 320) / 3600)
    assert main(["batch", "--tensorboard", f"muon:64:{tmp_path / 'nope'}", "--out", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["batch", "--tensorboard", f"muon:64:{tmp_path / 'muon-64'}", "--tb-tag", "x", "--out", str(out)]) == 2
    assert "no scalar 'x'" in capsys.readouterr().err
    assert main(["batch", *specs, "--out", str(out), "--thresholds", "0.5"]) == 2
    assert "reached by both optimizers" in capsys.readouterr().err
    # A run given twice is two seeds of it; identical seeds leave no noise, so every interval is the point itself.
    assert main(["batch", *specs, *specs, "--out", str(out), "--ema", "0", "--thresholds", "3", "2"]) == 0
    rows = list(csv.DictReader(open(out / "batch_study.csv")))
    assert all(r["seeds"] == "2" and float(r["ratio_ci_low"]) == float(r["ratio"]) == float(r["ratio_ci_high"])
               for r in rows)
    assert main(["batch", *specs, specs[0], specs[1], "--out", str(out), "--thresholds", "3"]) == 2
    assert "do not share one set of seeds" in capsys.readouterr().err


def test_learning_rate_grids_are_lists_or_log_ranges():
    assert parse_lr_grid("0.03,0.01") == [0.01, 0.03]  # the comma list of before, sorted
    # 5 log-spaced points: a factor 10^(1/4) apart, both ends exact.
    grid = parse_lr_grid("1e-2:1e-1:5")
    assert grid[0] == 0.01 and grid[-1] == 0.1 and len(grid) == 5
    assert [b / a for a, b in zip(grid, grid[1:])] == pytest.approx([10 ** 0.25] * 4, rel=1e-12)
    assert parse_lr_grid("1e-3,1e-2:1e-1:2,0.1") == [0.001, 0.01, 0.1]  # mixed; the repeated 0.1 counted once
    assert parse_per_optimizer(["muon=1e-2:1e-1:3", "adamw=0.003"], "--lr", many=True) == {
        "muon": pytest.approx([0.01, 10 ** -1.5, 0.1], rel=1e-12), "adamw": [0.003]}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "sgd=0.1"], "OPTIMIZER=VALUE"),
        (["--tokens", "100"], "less than one step"),
        (["--batch-sizes", "4", "4"], "duplicate"),
        (["--throughput", "muon=5"], "needs both"),
        (["--lr", "muon=0.1:0.01:3"], "needs 0 < LOW < HIGH and POINTS >= 2"),
        (["--lr", "muon=0.01:0.1"], "expected LOW:HIGH:POINTS"),
        (["--seeds", "2"], "needs a {seed} field in the trial template"),  # the fixture's template has none
        (["--seeds", "0"], "--seeds must be at least 1"),
    ],
)
def test_bad_input(study_args, tmp_path, capsys, extra, message):
    assert main([*study_args(), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study.sqlite").exists()


def test_store_of_another_study_is_refused(study_args, tmp_path, capsys):
    assert main(study_args()) == 0
    assert main([*study_args(), "--tokens", "32768"]) == 2
    assert "different sweep config" in capsys.readouterr().err
