"""examples/reproduce_paper.py's gap study (part c) on stores shaped like the ones its `sweep brute` and
`sweep report` calls write, with constructed losses: every number it reports, derived by hand."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from megatron_muon.sweep.runner import TelescopeConfig, brute_force_specs, seeded_specs
from megatron_muon.sweep.store import ResultStore
from megatron_muon.sweep.telescope import LogRange

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce_paper.py"
WIDTH = 64
SEEDS = (1234, 1235, 1236)
# Four points of one log range put the scanned learning rates on whole decades.
SCAN_LRS = (1e-3, 1e-2, 1e-1, 1.0)
# Per parametrization: the first seed's loss at each LR of SCAN_LRS, and the refined point's loss per seed (its
# first seed's is the lowest first-seed loss, so `--refine-top 1` reruns it).
SCANS = {
    # SP's best mean, 3.00 at lr 1e-2, is above lr 1e-1's lone first seed (2.99): only seeded points compete.
    "sp": ((3.30, 2.98, 2.99, 3.40), (2.98, 3.04, 2.98)),
    "essential": ((3.50, 3.40, 3.30, 3.20), (3.20, 3.10, 3.30)),
    "essential_exact": ((3.15, 3.25, 3.35, 3.45), (3.15, 3.05, 3.10)),
    "spectral": ((3.40, 3.30, 3.12, 3.50), (3.12, 2.90, 3.06)),
}
# The factorial's multipliers: the embedding LR's above 1, the output's below, so the corner of 1 is each range's
# other end.
EMBEDDING_LR_MULT, OUTPUT_MULT = 2.0, 0.5
# (embedding LR multiplier moved, output multiplier moved) -> loss per seed. The output multiplier alone ends
# closer to SP's best on average than both together, but worse at every seed; both straddle SP across seeds: only
# the paired interval, no threshold on the mean, tells which closes the gap.
FACTORIAL = {
    (False, False): (3.18, 3.24, 3.18),  # mean 3.20: 0.20 above SP's best
    (True, False): (3.08, 3.14, 3.08),  # mean 3.10
    (False, True): (3.01, 3.09, 3.02),  # mean 3.04
    (True, True): (2.92, 3.14, 3.12),  # mean 3.06
}


def _load_script():
    # Registered before it runs: its @dataclass looks its own module up in sys.modules.
    spec = importlib.util.spec_from_file_location("reproduce_paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _finish(store, trial, loss):
    store.mark_running(trial.id, f"/runs/{trial.id}", f"/runs/{trial.id}.log")
    # The smoothed loss differs from the final one, so reading the wrong objective changes every number.
    store.mark_finished(trial.id, final_loss=loss, smoothed_loss=loss + 0.5, tokens=100, wall_s=1.0,
                        tokens_per_second=100.0, curve=[(0.0, loss + 0.5)])


def _config(ranges, fixed, points):
    fixed = dict(fixed, seed=SEEDS[0], wd=0.001)
    flags = " ".join(f"--{name} {{{name}}}" for name in [*fixed, *(r.name for r in ranges)])
    return TelescopeConfig(32, WIDTH, ranges, points=points, template=f"{{python}} t.py {flags} --out {{out}}",
                           fixed=fixed, seeds=len(SEEDS))


def _scan_store(path, fixed, first_seed, refined):
    """`sweep brute --hp lr=1e-3:1 --points 4 --refine-top 1 --seeds 3`: every LR at the first seed, then the best
    one at the other two seeds, added after the grid as the runner adds them."""
    assert refined[0] == min(first_seed)
    config = _config((LogRange("lr", 1e-3, 1.0),), fixed, points=4)
    with ResultStore(path, config.fingerprint_dict()) as store:
        grid = brute_force_specs(config, WIDTH, 4, SEEDS[:1])
        store.add_trials(grid)
        for trial, loss in zip(store.trials(), first_seed):
            _finish(store, trial, loss)
        best = grid[first_seed.index(min(first_seed))]
        store.add_trials(seeded_specs(best.key.rsplit("/seed", 1)[0], "brute_force", None, WIDTH, best.params,
                                      SEEDS[1:]))
        for trial, loss in zip(store.trials(status="pending"), refined[1:]):
            _finish(store, trial, loss)


def _factorial_store(path):
    """`sweep brute --points 2 --hp embedding_lr_mult=1:2 --hp output_mult=0.5:1 --fixed lr=0.06 --seeds 3`."""
    ranges = (LogRange("embedding_lr_mult", 1.0, EMBEDDING_LR_MULT), LogRange("output_mult", OUTPUT_MULT, 1.0))
    config = _config(ranges, dict(lr=0.06), points=2)
    with ResultStore(path, config.fingerprint_dict()) as store:
        store.add_trials(brute_force_specs(config, WIDTH, 2))
        for trial in store.trials():
            moved = (trial.params["embedding_lr_mult"] > 1.5, trial.params["output_mult"] < 0.75)
            _finish(store, trial, FACTORIAL[moved][SEEDS.index(trial.params["seed"])])


KNOB_STAGES = [
    dict(stage=0, width=32, chosen=dict(lr=0.06, embedding_lr_mult=2.0, output_mult=0.5), best_loss=3.4),
    dict(stage=1, width=64, chosen=dict(lr=0.06, embedding_lr_mult=EMBEDDING_LR_MULT, output_mult=OUTPUT_MULT),
         best_loss=3.25),
    dict(stage=2, width=128),  # not run yet: no choice, no loss
]


@pytest.fixture(scope="module")
def gap(tmp_path_factory):
    script = _load_script()
    gap = tmp_path_factory.mktemp("gap")
    presets = {"sp": dict(mup_base_width=0), "essential": dict(mup_preset="essential"),
               "essential_exact": dict(mup_preset="essential_exact"), "spectral": dict(mup_preset="spectral")}
    assert set(presets) == set(script.SCANS) == set(SCANS)
    for name, (first_seed, refined) in SCANS.items():
        _scan_store(gap / f"scan_{name}.sqlite", presets[name], first_seed, refined)
    _factorial_store(gap / "factorial.sqlite")
    (gap / "knobs_report").mkdir()
    knobs = dict(stages=KNOB_STAGES, chosen=KNOB_STAGES[1]["chosen"])
    (gap / "knobs_report" / "summary.json").write_text(json.dumps(knobs))
    summary = script.gap_study(gap, WIDTH)
    # What main writes to gap_study.json: nothing in it that JSON cannot hold.
    json.dumps(summary)
    return gap, summary


def test_each_scan_reports_its_best_seeded_lr_and_its_loss_minus_sp_paired_by_seed(gap):
    path, summary = gap
    assert summary["width"] == WIDTH
    scans = summary["scans"]
    assert list(scans) == ["sp", "essential", "essential_exact", "spectral"]
    for name, (first_seed, _) in SCANS.items():
        assert scans[name]["lrs"] == pytest.approx(SCAN_LRS, rel=1e-9)
        assert scans[name]["first_seed_loss"] == list(first_seed)
    best = {name: (s["best_lr"], s["best_lr_on_scan_edge"]) for name, s in scans.items()}
    assert best == {"sp": (pytest.approx(1e-2), False), "essential": (pytest.approx(1.0), True),
                    "essential_exact": (pytest.approx(1e-3), True), "spectral": (pytest.approx(1e-1), False)}
    sp = scans["sp"]["best"]
    # (2.98 + 3.04 + 2.98) / 3; std of (-0.02, +0.04, -0.02) around it: sqrt(0.0024 / 2).
    assert (sp["mean"], sp["std"], sp["seeds"]) == (pytest.approx(3.00), pytest.approx(0.0012 ** 0.5), 3)
    assert sp["ci_low"] < 3.00 < sp["ci_high"]
    assert scans["sp"]["minus_sp"] is None
    minus_sp = {name: scans[name]["minus_sp"] for name in ("essential", "essential_exact", "spectral")}
    # Per seed against SP's (2.98, 3.04, 2.98): essential (0.22, 0.06, 0.32), essential_exact (0.17, 0.01, 0.12),
    # spectral (0.14, -0.14, 0.08).
    assert {name: d["mean"] for name, d in minus_sp.items()} == pytest.approx(
        {"essential": 0.60 / 3, "essential_exact": 0.30 / 3, "spectral": 0.08 / 3})
    assert all(d["seeds"] == 3 for d in minus_sp.values())  # paired: one difference per seed
    # The spread of the per-seed differences, not of the unpaired means: essential's (0.22, 0.06, 0.32).
    assert minus_sp["essential"]["std"] == pytest.approx((0.02 ** 2 + 0.14 ** 2 + 0.12 ** 2) ** 0.5 / 2 ** 0.5)
    # 7 of the 27 equally likely resamples of (0.14, -0.14, 0.08) have a mean below 0 (26% > the 2.5% tail).
    assert minus_sp["spectral"]["ci_low"] < 0 < minus_sp["spectral"]["ci_high"]
    assert minus_sp["essential_exact"]["ci_low"] >= 0.01 - 1e-12  # no resample goes below the smallest difference
    assert (path / "lr_scans.png").stat().st_size > 0


def test_the_knob_telescope_stages_pass_through(gap):
    _, summary = gap
    assert summary["knob_telescope"] == [
        dict(width=32, chosen=dict(lr=0.06, embedding_lr_mult=2.0, output_mult=0.5), best_loss=3.4),
        dict(width=64, chosen=dict(lr=0.06, embedding_lr_mult=2.0, output_mult=0.5), best_loss=3.25),
        dict(width=128, chosen=None, best_loss=None),
    ]


def test_factorial_corners_against_the_preset_and_against_sp(gap):
    _, summary = gap
    factorial = summary["factorial"]
    assert factorial["lr"] == 0.06
    corners = {c["label"]: c for c in factorial["corners"]}
    assert list(corners) == ["preset (1, 1)", "embedding LR only", "output mult only", "both"]
    multipliers = {label: (c["embedding_lr_mult"], c["output_mult"]) for label, c in corners.items()}
    assert multipliers == {"preset (1, 1)": pytest.approx((1.0, 1.0)), "embedding LR only": pytest.approx((2.0, 1.0)),
                           "output mult only": pytest.approx((1.0, 0.5)), "both": pytest.approx((2.0, 0.5))}
    assert {label: c["loss"]["mean"] for label, c in corners.items()} == pytest.approx(
        {"preset (1, 1)": 3.20, "embedding LR only": 3.10, "output mult only": 3.04, "both": 3.06})
    # Gap at the preset: 3.20 - 3.00 = 0.20; a corner closes (3.20 - its loss) / 0.20 of it.
    assert {label: c["share_of_gap_closed"] for label, c in corners.items()} == pytest.approx(
        {"preset (1, 1)": 0.0, "embedding LR only": 0.5, "output mult only": 0.8, "both": 0.7})
    gain = {label: c["gain_over_preset"] for label, c in corners.items()}
    # Preset minus corner per seed: embedding LR (0.10, 0.10, 0.10), output (0.17, 0.15, 0.16), both (0.26, 0.10, 0.06).
    assert {label: g["mean"] for label, g in gain.items()} == pytest.approx(
        {"preset (1, 1)": 0.0, "embedding LR only": 0.10, "output mult only": 0.16, "both": 0.42 / 3})
    assert gain["embedding LR only"]["std"] == pytest.approx(0.0, abs=1e-12)
    minus_sp = {label: c["minus_sp"] for label, c in corners.items()}
    # Corner minus SP's (2.98, 3.04, 2.98) per seed: preset (0.20, 0.20, 0.20), embedding LR (0.10, 0.10, 0.10),
    # output (0.03, 0.05, 0.04), both (-0.06, +0.10, +0.14).
    assert {label: d["mean"] for label, d in minus_sp.items()} == pytest.approx(
        {"preset (1, 1)": 0.20, "embedding LR only": 0.10, "output mult only": 0.04, "both": 0.06})
    assert all(d["seeds"] == 3 for d in minus_sp.values())
    # All differences of one sign: every resample's mean is at least the smallest, so the interval misses 0.
    assert minus_sp["output mult only"]["ci_low"] >= 0.03 - 1e-12
    # 4 of the 27 equally likely resamples of (-0.06, +0.10, +0.14) have a mean below 0 (15% > the 2.5% tail):
    # (-0.06, -0.06, -0.06) and the three orders of (-0.06, -0.06, +0.10).
    assert minus_sp["both"]["ci_low"] <= 0 < minus_sp["both"]["ci_high"]
    assert {label: c["closes_gap"] for label, c in corners.items()} == {
        "preset (1, 1)": False, "embedding LR only": False, "output mult only": False, "both": True}
