"""MuonConfig is the one source of every Muon setting: its defaults wherever a setting surfaces, its refusals through
megatron.training's argument validation (naming the flag), agreement with what the Newton-Schulz engine refuses,
and every plugin flag followed from a command line into the running optimizer."""

import dataclasses
import inspect
import itertools
import re
import sys

import pytest
import torch
from torch import nn

from megatron_muon import Muon, MuonConfig, MuonWithAdamW, orthogonalize
from megatron_muon.muon_config import SETTINGS, UPDATE_SETTINGS
from megatron_muon.testing.ranks import free_port
from tests.test_launch import ITERATION, SCRIPT, TRAIN_FLAGS, _env, _launcher, _run

# The paper's recipe, written out rather than read from MuonConfig, so a changed default is a visible decision.
PAPER_DEFAULTS = dict(
    momentum=0.95, nesterov=True, ns_steps=5, coefficients="jordan", ns_precision="bf16", ns_method="standard",
    scale_mode="essential", extra_scale_factor=1.0, split_qkv=True, split_glu=True, overlap_groups=1,
)
# Megatron's spelling of each setting: megatron-core 0.19.2's OptimizerConfig field where one means the same thing.
MEGATRON_FIELDS = dict(
    momentum="muon_momentum", nesterov="muon_nesterov", ns_steps="muon_num_ns_steps",
    coefficients="muon_coefficient_type", ns_precision="muon_ns_precision", ns_method="muon_ns_method",
    scale_mode="muon_scale_mode", extra_scale_factor="muon_extra_scale_factor", split_qkv="muon_split_qkv",
    split_glu="muon_split_glu", overlap_groups="muon_overlap_groups",
)
NEW_FIELDS = {"muon_ns_precision", "muon_ns_method", "muon_split_glu", "muon_overlap_groups"}


def _parse(monkeypatch, *flags: str):
    """megatron.training's own parser, with the plugin installed, on a command line."""
    import megatron.training.arguments as arguments

    import megatron_muon

    megatron_muon.install()
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *flags])
    return arguments.parse_args()


def _same(value, default) -> bool:
    return value == default and type(value) is type(default)


# --- one spelling, one default -------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    assert dataclasses.asdict(MuonConfig()) == PAPER_DEFAULTS
    assert set(SETTINGS) == set(PAPER_DEFAULTS)


def test_every_setting_has_megatrons_spelling():
    from megatron.core.optimizer import OptimizerConfig

    assert {name: s.megatron_field for name, s in SETTINGS.items()} == MEGATRON_FIELDS
    megatron_core = {f.name for f in dataclasses.fields(OptimizerConfig)}
    assert set(MEGATRON_FIELDS.values()) - megatron_core == NEW_FIELDS


def test_every_default_is_the_same_everywhere(monkeypatch):
    import megatron.training.arguments as arguments
    from megatron.training.training import get_megatron_optimizer_config

    from megatron_muon.integration.flags import MuonOptimizerConfig, muon_config_from
    from megatron_muon.integration.layouts import LayoutOptions

    defaults = MuonConfig()
    args = _parse(monkeypatch, *TRAIN_FLAGS)  # a working command line without any Muon flag
    parsed = {name: getattr(args, s.megatron_field) for name, s in SETTINGS.items()}
    arguments.validate_args(args, {})
    built, _ = get_megatron_optimizer_config(args)  # megatron.training's own OptimizerConfig from the arguments
    library = MuonOptimizerConfig()
    muon_group = Muon([nn.Parameter(torch.zeros(2, 2))]).param_groups[0]
    combined_group = MuonWithAdamW([dict(params=[nn.Parameter(torch.zeros(2, 2))], use_muon=True)]).param_groups[0]
    for name, setting in SETTINGS.items():
        default = getattr(defaults, name)
        assert _same(getattr(library, setting.megatron_field), default), name
        assert _same(parsed[name], default), name
        assert _same(getattr(built, setting.megatron_field), default), name
        if name in UPDATE_SETTINGS:
            assert _same(muon_group[name], default) and _same(combined_group[name], default), name
    # What build_muon_optimizer hands the runtime, and the layout it plans with.
    assert muon_config_from(built) == defaults
    assert (LayoutOptions().split_qkv, LayoutOptions().split_glu) == (defaults.split_qkv, defaults.split_glu)


def test_the_runtime_has_no_defaults_of_its_own():
    from megatron_muon.runtime.distributed_muon import DistributedMuonStep, ShardedMuonAdamW

    for runtime in (DistributedMuonStep, ShardedMuonAdamW):
        assert inspect.signature(runtime).parameters["settings"].default is inspect.Parameter.empty


def test_flags_take_choices_and_help_from_muon_config(monkeypatch):
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    import megatron_muon

    megatron_muon.install()
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    for name, setting in SETTINGS.items():
        actions = [a for a in parser._actions if a.dest == setting.megatron_field]
        assert setting.flag in {flag for a in actions for flag in a.option_strings}, name
        for action in actions:
            assert action.help.startswith(setting.help), (name, action.option_strings)
            assert list(action.choices or []) == setting.accepted, (name, action.option_strings)
    assert SETTINGS["coefficients"].accepted == ["jordan", "quintic", "polar_express", "simple"]


def test_a_plain_megatron_config_is_refused_naming_what_it_lacks():
    from megatron.core.optimizer import OptimizerConfig

    from megatron_muon.integration.flags import muon_config_from

    with pytest.raises(TypeError, match=r"OptimizerConfig has no muon_ns_precision, muon_ns_method, muon_split_glu, "
                                        r"muon_overlap_groups: "
                                        r"build the config as .*MuonOptimizerConfig, or call megatron_muon.install\(\)"):
        muon_config_from(OptimizerConfig(optimizer="muon"))


def test_aliases_and_numbers_are_stored_in_one_form():
    assert MuonConfig(coefficients="simple", scale_mode="shape", momentum=0) == MuonConfig(
        coefficients="jordan", scale_mode="shape_scaling", momentum=0.0
    )
    assert isinstance(MuonConfig(extra_scale_factor=2).extra_scale_factor, float)
    group = Muon([nn.Parameter(torch.zeros(2, 2))], coefficients="simple", scale_mode="shape").param_groups[0]
    assert (group["coefficients"], group["scale_mode"]) == ("jordan", "shape_scaling")


@pytest.mark.parametrize("options", [dict(ns_steps=2.0), dict(ns_steps=True), dict(nesterov=1), dict(momentum="0.9"),
                                     dict(ns_precision=("bf16",) * 5)])
def test_wrong_types_are_refused(options):
    name = next(iter(options))
    with pytest.raises(TypeError, match=rf"{SETTINGS[name].flag} \({name}\) must be of type"):
        MuonConfig(**options)


@pytest.mark.parametrize("options", [
    dict(momentum=0.0), dict(momentum=0.999), dict(ns_steps=1), dict(extra_scale_factor=1e-9),
    dict(ns_precision="fp8*2>bf16", ns_method="gram"), dict(ns_precision="fp8>bf16", ns_method="auto"),
    dict(ns_precision="fp8>bf16", coefficients="quintic", ns_method="auto"),
    dict(ns_precision="fp8*0>bf16", coefficients="polar_express"),
])
def test_values_at_the_edge_of_their_range_are_accepted(options):
    assert all(getattr(MuonConfig(**options), k) == v for k, v in options.items())


# --- refusals through megatron.training ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags,named", [
    (["--muon-momentum", "1.5"], ["--muon-momentum"]),
    (["--muon-momentum", "1"], ["--muon-momentum"]),
    (["--muon-momentum", "-0.1"], ["--muon-momentum"]),
    (["--muon-momentum", "nan"], ["--muon-momentum"]),
    (["--muon-num-ns-steps", "0"], ["--muon-num-ns-steps"]),
    (["--muon-num-ns-steps", "-3"], ["--muon-num-ns-steps"]),
    (["--muon-extra-scale-factor", "nan"], ["--muon-extra-scale-factor"]),
    (["--muon-extra-scale-factor", "inf"], ["--muon-extra-scale-factor"]),
    (["--muon-extra-scale-factor", "-1"], ["--muon-extra-scale-factor"]),
    (["--muon-extra-scale-factor", "0"], ["--muon-extra-scale-factor"]),
    (["--muon-ns-precision", "int8"], ["--muon-ns-precision"]),
    (["--muon-ns-precision", "fp8*x>bf16"], ["--muon-ns-precision"]),
    (["--muon-ns-precision", "fp16>bf16"], ["--muon-ns-precision", "--muon-coefficient-type", "--muon-ns-method"]),
    (["--muon-ns-precision", "fp8", "--muon-coefficient-type", "polar_express"],
     ["--muon-ns-precision", "--muon-coefficient-type"]),
    (["--muon-ns-precision", "fp8*1>bf16", "--muon-coefficient-type", "polar_express"],
     ["--muon-ns-precision", "--muon-coefficient-type"]),
    (["--muon-ns-precision", "fp8>bf16", "--muon-coefficient-type", "polar_express"],
     ["--muon-ns-precision", "--muon-coefficient-type"]),
    (["--muon-ns-precision", "fp8", "--muon-ns-method", "gram"], ["--muon-ns-precision", "--muon-ns-method"]),
    (["--muon-ns-precision", "fp8*3>bf16", "--muon-ns-method", "gram"], ["--muon-ns-precision", "--muon-ns-method"]),
    (["--muon-ns-precision", "fp8", "--muon-ns-method", "auto"], ["--muon-ns-precision", "--muon-ns-method"]),
])
def test_out_of_range_flags_fail_megatrons_argument_validation(monkeypatch, flags, named):
    import megatron.training.arguments as arguments

    args = _parse(monkeypatch, *TRAIN_FLAGS, *flags)
    with pytest.raises(ValueError) as refused:
        arguments.validate_args(args, {})
    for flag in named:
        assert flag in str(refused.value), str(refused.value)


def test_valid_non_default_flags_pass_megatrons_argument_validation(monkeypatch):
    import megatron.training.arguments as arguments

    args = _parse(monkeypatch, *TRAIN_FLAGS, *NON_DEFAULT_FLAGS)
    arguments.validate_args(args, {})


@pytest.mark.parametrize("flags", [
    ["--muon-coefficient-type", "cubic"], ["--muon-scale-mode", "rms"], ["--muon-ns-method", "svd"],
    ["--muon-num-ns-steps", "2.5"], ["--muon-momentum", "high"],
])
def test_unknown_names_and_non_numbers_fail_megatrons_parser(monkeypatch, capsys, flags):
    with pytest.raises(SystemExit):
        _parse(monkeypatch, "--optimizer", "muon", *flags)
    assert f"argument {flags[0]}:" in capsys.readouterr().err


def test_fp8_device_check_names_the_flag(monkeypatch):
    config = MuonConfig(ns_precision="fp8>bf16")
    config.check_device("cpu")
    monkeypatch.delattr(torch, "_scaled_mm")
    with pytest.raises(RuntimeError, match="--muon-ns-precision fp8>bf16: .*needs torch._scaled_mm"):
        config.check_device("cpu")


# --- validation refuses exactly what the engine refuses ------------------------------------------------------------
PRECISION_SPECS = ["fp32", "bf16", "fp16", "fp8", "fp8>bf16", "fp8*1>bf16", "fp8*3>bf16", "fp16>bf16"]


def test_validation_refuses_exactly_what_orthogonalize_refuses():
    """Over coefficients x precisions x methods x steps: MuonConfig accepts a combination iff orthogonalize runs it on
    a square and a 4:1 matrix (`auto` runs standard on the first and Gram on the second)."""
    g = torch.Generator().manual_seed(0)
    square, wide = torch.randn(16, 16, generator=g), torch.randn(16, 64, generator=g)
    disagreements = []
    for coefficients, precision, method, steps in itertools.product(
        ("jordan", "quintic", "polar_express"), PRECISION_SPECS, ("standard", "gram", "auto"), (1, 2, 5)
    ):
        try:
            MuonConfig(coefficients=coefficients, ns_precision=precision, ns_method=method, ns_steps=steps)
            accepted = True
        except ValueError:
            accepted = False
        try:
            for x in (square, wide):
                orthogonalize(x, steps, coefficients, precision, method=method)
            runs = True
        except ValueError:
            runs = False
        if accepted != runs:
            disagreements.append((coefficients, precision, method, steps, accepted, runs))
    assert not disagreements


# --- from the command line into the running optimizer --------------------------------------------------------------
# A non-default value of every plugin setting, as a user types it, and the value the optimizer must then hold.
NON_DEFAULT = {
    "momentum": (["--muon-momentum", "0.9"], 0.9),
    "nesterov": (["--no-muon-nesterov"], False),
    "ns_steps": (["--muon-num-ns-steps", "4"], 4),
    "coefficients": (["--muon-coefficient-type", "quintic"], "quintic"),
    "ns_precision": (["--muon-ns-precision", "fp16"], "fp16"),
    "ns_method": (["--muon-ns-method", "gram"], "gram"),
    "scale_mode": (["--muon-scale-mode", "spectral"], "spectral"),
    "extra_scale_factor": (["--muon-extra-scale-factor", "0.5"], 0.5),
    "split_qkv": (["--muon-no-split-qkv"], False),
    "split_glu": (["--muon-no-split-glu"], False),
    "overlap_groups": (["--muon-overlap-groups", "2"], 2),
}
NON_DEFAULT_FLAGS = [flag for flags, _ in NON_DEFAULT.values() for flag in flags]


def test_the_end_to_end_values_cover_every_setting_and_differ_from_its_default():
    assert set(NON_DEFAULT) == set(SETTINGS)
    for name, (_, value) in NON_DEFAULT.items():
        assert value != getattr(MuonConfig(), name), name


@pytest.mark.multirank
def test_every_plugin_flag_reaches_the_running_optimizer():
    """An unmodified Megatron script through the launcher: the optimizer megatron.training built logs the MuonConfig
    its distributed step holds, and plans the matrices its layout settings give."""
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # Three iterations: Megatron's scheduler needs more than TRAIN_FLAGS' two warmup iterations.
    result = _run(_launcher(str(SCRIPT), *TRAIN_FLAGS, "--train-iters", "3", *NON_DEFAULT_FLAGS), env)
    assert result.returncode == 0, result.stdout[-6000:]
    expected = MuonConfig(**{name: value for name, (_, value) in NON_DEFAULT.items()})
    logged = re.findall(r"megatron-muon: (\d+) dense logical matrices .*; (MuonConfig\(.*\))$", result.stdout, re.M)
    # 2 layers x (QKV, projection, fused [gate; up], fc2): 14 with the default splits.
    assert logged == [("8", repr(expected))], logged
    assert len(ITERATION.findall(result.stdout)) == 3


@pytest.mark.multirank
def test_an_out_of_range_flag_stops_training_before_the_model_is_built():
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = _run(_launcher(str(SCRIPT), *TRAIN_FLAGS, "--muon-extra-scale-factor", "nan"), env)
    assert result.returncode != 0
    assert "--muon-extra-scale-factor nan is out of range: extra_scale_factor must be in (0, inf)" in result.stdout
    assert "Setting up DistributedDataParallel" not in result.stdout  # INFO logging is on in TRAIN_FLAGS
    assert "number of parameters" not in result.stdout
