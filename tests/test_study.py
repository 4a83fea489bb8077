"""The batch-size study command: runs through the sweep store with a fake trial whose answers are known, imports
from Megatron-style TensorBoard logs, and refuses bad input."""

import csv
import json
import math
import textwrap

import pytest

from megatron_muon.study.__main__ import main

# loss(T) = 1 + 4 exp(-rate T) with rate = r0 / (1 + B / B_crit): AdamW is 1.2x slower than Muon at small batch and
# its critical batch is half Muon's, so R_L(B) = 1.2 (1 + B/32) / (1 + B/64) for every L. An off-optimum learning
# rate halves the rate, so the study must pick the good one at each batch size.
FAKE_TRIAL = textwrap.dedent("""
    import argparse, json, math, os
    p = argparse.ArgumentParser()
    for name in ("--optimizer", "--out"): p.add_argument(name)
    for name in ("--global-batch", "--steps", "--seq-length"): p.add_argument(name, type=int)
    p.add_argument("--lr", type=float)
    a = p.parse_args()
    good_lr = 0.02 if a.optimizer == "muon" else 0.005
    r0 = (1e-4 if a.optimizer == "muon" else 1e-4 / 1.2) * (1.0 if a.lr == good_lr else 0.5)
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

    def args(*extra):
        return [
            "batch", "--store", str(tmp_path / "study.sqlite"), "--out", str(tmp_path / "out"),
            "--batch-sizes", "4", "16", "64", "--seq-length", "8", "--tokens", "65536",
            "--lr", "muon=0.01,0.02", "--lr", "adamw=0.005,0.02", "--ema", "0", "--num-thresholds", "5",
            "--device-unit", "64",
            "--template", f"{{python}} {trial} --optimizer {{optimizer}} --global-batch {{global_batch}} "
                          "--steps {steps} --lr {lr} --seq-length {seq_length} --out {out}",
            "--parallel", "4", "--poll-s", "0.05", "--quiet", *extra,
        ]

    return args


def test_study_runs_picks_the_best_lr_and_recovers_the_known_ratio(study_args, tmp_path):
    assert main(study_args()) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batch_tokens"] == [32, 128, 512]
    assert {(c["optimizer"], c["lr"]) for c in summary["chosen_runs"]} == {("muon", 0.02), ("adamw", 0.005)}
    for entry in summary["per_threshold"]:
        for ratio, batch in zip(entry["ratio"], (4, 16, 64)):
            assert ratio == pytest.approx(expected_ratio(batch), rel=0.02)
        assert entry["ratio_above_1"] and entry["ratio_non_decreasing"]
        # Tokens to loss grow with B for both: the smallest batch is token-optimal.
        assert entry["token_optimal_batch_muon"] == 32 and entry["token_optimal_batch_adamw"] == 32
        assert all(-1 < s < 0 for s in entry["steps_slopes_muon"])
    assert summary["share_of_thresholds_with_ratio_above_1"] == 1.0
    assert summary["devices"] == {"32": 8, "128": 32, "512": 128}
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


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "sgd=0.1"], "OPTIMIZER=VALUE"),
        (["--tokens", "100"], "less than one step"),
        (["--batch-sizes", "4", "4"], "duplicate"),
        (["--throughput", "muon=5"], "needs both"),
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
