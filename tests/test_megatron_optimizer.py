"""Megatron semantics of the plugin's Muon: install() routing, skipped non-finite steps, grad norm and zero
counting as Megatron's Adam reports them, state sharded ~1/DP, and configuration errors that name their flag."""

import sys

import pytest
import torch

from megatron_muon.testing.ranks import run_ranks


def _build(kind: str, distributed: bool, dtype=torch.float32, schedule=None, **config):
    """The tiny GPT, DDP-wrapped, with the optimizer megatron-core's get_megatron_optimizer returns after install()."""
    from megatron_muon.integration.flags import MuonOptimizerConfig
    from megatron_muon.integration.training import Trainer, TrainingSetup
    from megatron_muon.models.shapes import TINY

    options = dict(optimizer=kind, lr=1e-3, bf16=dtype == torch.bfloat16, use_distributed_optimizer=distributed,
                   clip_grad=1.0, log_num_zeros_in_grad=True, **config)
    return Trainer(TrainingSetup(TINY, MuonOptimizerConfig(**options), dtype, schedule=schedule))


def _grads(trainer, step: int = 0):
    from megatron_muon.integration.training import synthetic_batches
    from megatron_muon.models.shapes import TINY

    trainer.forward_backward(synthetic_batches(TINY, 2, 2, seed=10 * step + trainer.data_parallel[0]))
    trainer.finalize_grads()


def _semantics(distributed: bool) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.runtime.distributed_muon import ShardedMuonAdamW

    out = {}
    with model_parallel(seed=7):
        adam = _build("adam", distributed)
        _grads(adam)
        out["adam_step"] = adam.optimizer.step()
    with model_parallel(seed=7):
        trainer = _build("muon", distributed, muon_ns_precision="fp32")
        (model,), muon = trainer.models, trainer.optimizer
        inner = muon.chained_optimizers[0].optimizer
        out["routed_to_plugin"] = isinstance(inner, ShardedMuonAdamW)
        _grads(trainer)
        out["muon_step"] = muon.step()
        # Megatron's wrappers read one common `step` from the inner state (checkpoint metadata).
        state_dict = muon.state_dict()
        out["inner_steps"] = sorted({float(inner.state[p]["step"]) for p in inner.state})
        out["state_dict_groups"] = len(state_dict["optimizer"]["param_groups"])
        # Optimizer state of this rank: momentum elements of Muon matrices.
        out["momentum_elements"] = sum(
            inner.state[p]["momentum_buffer"].numel() for g in inner.param_groups if g["use_muon"] for p in g["params"]
        )
        out["muon_model_elements"] = sum(
            p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embedding" not in n
        )

        # A non-finite gradient on one rank: every rank skips, and nothing changes.
        _grads(trainer, step=1)
        if ps.get_data_parallel_rank() == 0:
            next(p for n, p in model.named_parameters() if "linear_fc2" in n).main_grad[0, 0] = float("nan")
        before_params = [p.detach().clone() for p in model.parameters()]
        before_state = {k: v.clone() for p in inner.state for k, v in inner.state[p].items() if torch.is_tensor(v)}
        before_main = [p.detach().clone() for g in inner.param_groups for p in g["params"]]
        out["nan_step"] = muon.step()
        out["params_unchanged"] = all(torch.equal(a, b.detach()) for a, b in zip(before_params, model.parameters()))
        after_main = [p.detach() for g in inner.param_groups for p in g["params"]]
        out["main_unchanged"] = all(torch.equal(a, b) for a, b in zip(before_main, after_main))
        after_state = {k: v for p in inner.state for k, v in inner.state[p].items() if torch.is_tensor(v)}
        out["state_unchanged"] = before_state.keys() == after_state.keys() and all(
            torch.equal(before_state[k], after_state[k]) for k in before_state
        )
    with model_parallel(seed=7):
        # Megatron's scheduler drives every group through the chain, with its lr / wd multipliers.
        from megatron_muon.integration.training import LRSchedule

        trainer = _build("muon", distributed, muon_ns_precision="fp32", weight_decay=0.1,
                         schedule=LRSchedule(decay_steps=10, warmup_steps=4, style="cosine"))
        trainer.scheduler.step(increment=2)
        inner = trainer.optimizer.chained_optimizers[0].optimizer
        out["scheduled_groups"] = [
            (g["use_muon"], g["lr"], g["weight_decay"], g["wd_mult"], sum(p.numel() for p in g["params"]))
            for g in inner.param_groups
        ]
    with model_parallel(seed=7):
        # NVIDIA's Muon on its plain (non-layer-wise) path: only the routing is under test here.
        nvidia = _build("nvidia_muon", False, dtype=torch.bfloat16).optimizer
        out["nvidia_inner"] = type(nvidia).__name__ + "/" + "/".join(
            type(o).__name__ for o in getattr(nvidia, "chained_optimizers", [nvidia])
        )
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("distributed", [True, False], ids=["distributed-optimizer", "replicated-state"])
def test_megatron_semantics(distributed):
    ranks = run_ranks(_semantics, 2, (distributed,))
    for r in ranks:
        assert r["routed_to_plugin"]
        (adam_ok, adam_norm, adam_zeros), (muon_ok, muon_norm, muon_zeros) = r["adam_step"], r["muon_step"]
        assert adam_ok and muon_ok
        # Same model, same data, same grads: Megatron computes the norm and zero count, as for Adam.
        assert muon_norm == pytest.approx(adam_norm, rel=1e-6) and muon_zeros == adam_zeros
        assert r["inner_steps"] == [1.0] and r["state_dict_groups"] > 0
        assert r["nan_step"] == (False, None, None)
        assert r["params_unchanged"] and r["main_unchanged"] and r["state_unchanged"]
        assert "ShardedMuonAdamW" not in r["nvidia_inner"]
        for use_muon, lr, wd, wd_mult, numel in r["scheduled_groups"]:
            assert lr == pytest.approx(1e-3 * 2 / 4)  # each group's max_lr (= config.lr), warmup step 2 of 4
            assert wd == pytest.approx(0.1 * wd_mult)
            # Megatron's standard overrides: no weight decay on 1-D parameters (the 5 norms) and biases.
            assert wd_mult == 1.0 or use_muon and numel == 0 or not use_muon and numel <= 5 * 64
    total = ranks[0]["muon_model_elements"]
    if distributed:
        # Each DP rank keeps momentum for its shard only: the two halves add up to the model.
        assert sum(r["momentum_elements"] for r in ranks) == total
        assert all(r["momentum_elements"] < 0.75 * total for r in ranks)
    else:
        assert all(r["momentum_elements"] == total for r in ranks)


# --- configuration errors, before any model work ------------------------------------------------------------------
def _config(**overrides):
    from megatron_muon.integration.flags import MuonOptimizerConfig

    return MuonOptimizerConfig(optimizer="muon", **overrides)


@pytest.mark.parametrize(
    "overrides,flag",
    [
        (dict(fp16=True), "--fp16"),
        (dict(muon_scale_mode="rms"), "--muon-scale-mode"),
        (dict(muon_coefficient_type="cubic"), "--muon-coefficient-type"),
        (dict(muon_ns_precision="int8"), "--muon-ns-precision"),
        (dict(muon_ns_method="svd"), "--muon-ns-method"),
        (dict(muon_num_ns_steps=0), "--muon-num-ns-steps"),
        (dict(muon_momentum=1.5), "--muon-momentum"),
    ],
)
def test_bad_configuration_names_the_flag(overrides, flag):
    from megatron_muon.integration.flags import validate_muon_config

    with pytest.raises(ValueError, match=flag):
        validate_muon_config(_config(**overrides))


def test_fp8_without_an_fp8_gemm_names_the_flag(monkeypatch):
    from megatron_muon.integration.flags import validate_muon_config

    monkeypatch.delattr(torch, "_scaled_mm")
    with pytest.raises(RuntimeError, match="--muon-ns-precision fp8"):
        validate_muon_config(_config(muon_ns_precision="fp8"), torch.device("cpu"))


# --- flags ----------------------------------------------------------------------------------------------------
def _parse(monkeypatch, *flags):
    import megatron.training.arguments as arguments

    import megatron_muon

    megatron_muon.install()
    monkeypatch.setattr(sys, "argv", ["train.py", *flags])
    args = arguments.parse_args()
    from megatron_muon.integration.flags import resolve_adam_betas

    resolve_adam_betas(args)
    return args


def test_muon_flags_default_to_the_papers_recipe(monkeypatch):
    args = _parse(monkeypatch, "--optimizer", "muon")
    assert (args.muon_momentum, args.muon_nesterov, args.muon_num_ns_steps) == (0.95, True, 5)
    assert (args.muon_coefficient_type, args.muon_scale_mode, args.muon_extra_scale_factor) == ("jordan", "essential", 1.0)
    assert (args.muon_split_qkv, args.muon_split_glu, args.muon_ns_precision) == (True, True, "bf16")
    assert (args.adam_beta1, args.adam_beta2) == (0.95, 0.95)


def test_adam_keeps_megatrons_betas(monkeypatch):
    args = _parse(monkeypatch, "--optimizer", "adam")
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.999)


def test_flags_override_every_default(monkeypatch):
    args = _parse(
        monkeypatch, "--optimizer", "muon", "--no-muon-nesterov", "--muon-no-split-glu", "--muon-no-split-qkv",
        "--muon-ns-precision", "fp8", "--muon-scale-mode", "unit_rms_norm", "--muon-coefficient-type", "polar_express",
        "--muon-momentum", "0.9", "--adam-beta1", "0.8",
    )
    assert (args.muon_nesterov, args.muon_split_glu, args.muon_split_qkv) == (False, False, False)
    assert (args.muon_ns_precision, args.muon_scale_mode, args.muon_coefficient_type) == ("fp8", "unit_rms_norm", "polar_express")
    assert (args.muon_momentum, args.adam_beta1, args.adam_beta2) == (0.9, 0.8, 0.95)


def test_nvidia_muon_stays_selectable(monkeypatch):
    assert _parse(monkeypatch, "--optimizer", "nvidia_muon").optimizer == "nvidia_muon"


def test_unknown_scale_mode_flag_is_rejected(monkeypatch):
    with pytest.raises(SystemExit):
        _parse(monkeypatch, "--optimizer", "muon", "--muon-scale-mode", "rms")
