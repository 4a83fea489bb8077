"""Megatron setups users bring: each trains correctly through megatron.training, or is refused before step 1
with a message naming the flag. One test per case found by trying real command lines (issue 13)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap

import pytest

from megatron_muon.testing.ranks import free_port, run_ranks
from tests.test_launch import ITERATION, SCRIPT, TRAIN_FLAGS, _env, _run


def _launch(*flags: str, ranks: int = 1, script: str | None = None):
    target = ["-m", "megatron_muon.launch", str(SCRIPT)] if script is None else ["-m", script]
    if ranks == 1:
        cmd = [sys.executable, *target, *flags]
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), *target, *flags]
        env = _env()
    return _run(cmd, env, timeout=300)


def _with(flags: list[str], **replace: str) -> list[str]:
    """TRAIN_FLAGS with some values replaced (flag -> value) and shorter runs."""
    out = list(flags)
    for flag, value in {"--train-iters": "3", **replace}.items():
        out[out.index(flag) + 1] = value
    return out


def _losses(stdout: str) -> list[float]:
    return [float(m.group(3)) for m in ITERATION.finditer(stdout)]


# --- 1. --decoupled-lr is Megatron's own feature: refused only when muP sets the same LRs ---------------------


@pytest.mark.parametrize("optimizer", ["adam", "muon"])
def test_decoupled_lr_trains_without_mup(optimizer):
    result = _launch(*_with(TRAIN_FLAGS), "--optimizer", optimizer, "--decoupled-lr", "3e-3",
                     "--decoupled-min-lr", "3e-4")
    assert result.returncode == 0, result.stdout[-5000:]
    losses = _losses(result.stdout)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


# --- 7 / 8. virtual pipeline stages and MoE in the shipped entry points ----------------------------------------

VPP = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]


@pytest.mark.multirank
def test_virtual_pipeline_trains_through_the_cpu_example():
    result = _launch(*_with(TRAIN_FLAGS, **{"--num-layers": "4"}), *VPP, "--global-batch-size", "4", ranks=2)
    assert result.returncode == 0, result.stdout[-5000:]
    assert re.search(r"^ +virtual_pipeline_model_parallel_size \.+ 2$", result.stdout, re.M)
    losses = _losses(result.stdout)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


@pytest.mark.multirank
def test_virtual_pipeline_trains_through_megatron_muon_train():
    result = _launch("--model-config", "cpu-tiny", "--num-layers", "4", *VPP, "--mock-data",
                     "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--seq-length", "32",
                     "--max-position-embeddings", "32", "--micro-batch-size", "1", "--global-batch-size", "4",
                     "--train-iters", "2", "--lr", "1e-2", "--optimizer", "muon", "--use-distributed-optimizer",
                     "--log-interval", "1", "--eval-iters", "0", ranks=2, script="megatron_muon.train")
    assert result.returncode == 0, result.stdout[-5000:]
    losses = _losses(result.stdout)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_cpu_example_honours_the_moe_flags():
    result = _launch(*_with(TRAIN_FLAGS), "--num-experts", "4", "--moe-router-topk", "2",
                     "--moe-token-dispatcher-type", "allgather")
    assert result.returncode == 0, result.stdout[-5000:]
    # Per layer Q, K, V, O, the router and each expert's gate, up and fc2: 2 x (5 + 4 x 3) = 34 matrices (the
    # dense model the script built before had 2 x 7 = 14). Under EP=1 experts live in the dense optimizer.
    assert "megatron-muon: 34 dense logical matrices" in result.stdout, result.stdout[-5000:]
    assert all(math.isfinite(x) for x in _losses(result.stdout))


# --- 4 / 9. setups the plugin's Muon cannot run yet: refused before the model is built --------------------------


@pytest.mark.parametrize("flags,message", [
    (["--use-torch-fsdp2"], r"--use-torch-fsdp2: FSDP \(ZeRO-3\).*megatron-muon's --optimizer muon"),
    (["--use-megatron-fsdp"], r"--use-megatron-fsdp: FSDP \(ZeRO-3\).*megatron-muon's --optimizer muon"),
    (["--num-distributed-optimizer-instances", "2"], r"--num-distributed-optimizer-instances 2: megatron-muon"),
    (["--fp16"], r"--optimizer muon trains in bf16 or fp32; --fp16 is not supported"),
    (["--use-precision-aware-optimizer"], r"--use-precision-aware-optimizer: megatron-muon's --optimizer muon"),
    (["--optimizer-cpu-offload"], r"--optimizer-cpu-offload: megatron-muon's --optimizer muon"),
    (["--muon-scalar-optimizer", "lion"], r"--muon-scalar-optimizer lion: megatron-muon's --optimizer muon trains"),
    (["--dump-param-to-param-group-map", "map.json"], r"--dump-param-to-param-group-map: not supported"),
])
def test_unsupported_setups_are_refused_before_the_model(flags, message):
    result = _launch(*_with(TRAIN_FLAGS), *flags)
    assert result.returncode != 0
    assert re.search(message, result.stdout), result.stdout[-5000:]
    assert "building GPT model" not in result.stdout


# --- 10. the import-order trap ------------------------------------------------------------------------------------


def _optimizer_after(import_first: bool) -> str:
    if import_first:
        from megatron.core.optimizer import get_megatron_optimizer  # what user code does at its top
    import megatron_muon

    megatron_muon.install()
    if not import_first:
        from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_muon.integration.flags import MuonOptimizerConfig
    from megatron_muon.integration.gpt import build_gpt
    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.models.shapes import TINY

    with model_parallel(seed=1):
        model = build_gpt(TINY)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
        built = {}
        for kind in (MuonOptimizerConfig, OptimizerConfig):
            try:
                optimizer = get_megatron_optimizer(kind(optimizer="muon", lr=1e-3), [ddp])
                built[kind.__name__] = type(optimizer.chained_optimizers[0].optimizer).__name__
            except Exception as err:  # noqa: BLE001 (the message is what the test checks)
                built[kind.__name__] = f"{type(err).__name__}: {err}"
    return built


@pytest.mark.parametrize("import_first", [True, False], ids=["imported-before-install", "imported-after-install"])
def test_muon_reaches_the_plugin_whatever_the_import_order(import_first):
    [built] = run_ranks(_optimizer_after, world_size=1, args=(import_first,), timeout=300)
    assert built["MuonOptimizerConfig"] == "ShardedMuonAdamW", built
    # A plain megatron-core OptimizerConfig lacks the plugin's fields: an error naming them, never NVIDIA's Muon.
    assert "ShardedMuonAdamW" == built["OptimizerConfig"] or "MuonOptimizerConfig" in built["OptimizerConfig"], built


@pytest.mark.parametrize("optimizer", ["muon", "nvidia_muon"])
def test_a_yaml_config_asking_for_muon_is_refused_naming_the_flag(tmp_path, monkeypatch, optimizer):
    """--yaml-cfg replaces the command line and skips validate_args, where the plugin's flags are checked."""
    import megatron.training.arguments as arguments

    import megatron_muon

    megatron_muon.install()
    config = tmp_path / "run.yaml"
    # Besides the optimizer, what megatron-core 0.19.2's parse_args reads from a YAML before validating it.
    config.write_text(f"optimizer: {optimizer}\nlr: 0.01\ndisable_msc_deprecated: false\nenable_msc: false\n"
                      f"use_checkpoint_args: false\n")
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", "--yaml-cfg", str(config)])
    with pytest.raises(ValueError, match=rf"--yaml-cfg {re.escape(str(config))}: optimizer {optimizer} through "
                                         r"Megatron's experimental YAML arguments skips megatron-muon's flags"):
        arguments.parse_and_validate_args()


# --- version and symbol guard ----------------------------------------------------------------------------------


def test_guard_passes_on_the_pinned_megatron_core():
    from megatron_muon.integration import compat

    version = compat.installed_version()
    touches = compat.CORE_TOUCHES + compat.TOOL_TOUCHES + compat.TRAINING_TOUCHES + compat.CPU_SHIM_TOUCHES
    assert compat.problems(touches, version) == []
    compat.check_megatron(include_training=True, include_cpu_shims=True)


def test_guard_names_a_missing_symbol_and_a_changed_signature(monkeypatch):
    import megatron.core.optimizer as mcore_optimizer

    from megatron_muon.integration import compat

    monkeypatch.delattr(mcore_optimizer, "_get_param_groups")
    monkeypatch.setattr(mcore_optimizer, "get_standard_config_overrides", lambda config, extra=None: {})
    found = compat.problems(compat.CORE_TOUCHES, "9.9.9")
    assert any(line.startswith("megatron.core.optimizer._get_param_groups does not exist") and "0.19.2" in line
               and "installed 9.9.9" in line for line in found), found
    assert any("megatron.core.optimizer.get_standard_config_overrides takes (config, extra)" in line
               and "as (config)" in line for line in found), found
    with pytest.raises(compat.MegatronVersionError, match="_get_param_groups does not exist"):
        compat.check_megatron(include_training=False)


def test_install_refuses_an_unsupported_release_before_patching_anything():
    code = textwrap.dedent("""
        import megatron.core.optimizer as mcore_optimizer
        from megatron.core import package_info
        original = mcore_optimizer.get_megatron_optimizer
        package_info.__version__ = "0.21.0"
        import megatron_muon
        try:
            megatron_muon.install()
        except Exception as err:
            print(type(err).__name__, err)
        print("untouched", mcore_optimizer.get_megatron_optimizer is original)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert "MegatronVersionError megatron-muon supports megatron-core >= 0.19.0, < 0.20.0" in result.stdout, \
        result.stdout + result.stderr[-3000:]
    assert "installed: 0.21.0" in result.stdout
    assert "untouched True" in result.stdout


# --- layouts through megatron.training beyond tests/test_launch.py's ----------------------------------------------


@pytest.mark.multirank
def test_replicated_optimizer_state_trains_over_dp2():
    """Without --use-distributed-optimizer: Megatron's Float16OptimizerWithFloat16Params around the plugin."""
    flags = [f for f in _with(TRAIN_FLAGS) if f != "--use-distributed-optimizer"]
    result = _launch(*flags, ranks=2)
    assert result.returncode == 0, result.stdout[-5000:]
    assert re.search(r"^ +use_distributed_optimizer \.+ False$", result.stdout, re.M)
    assert "megatron-muon: 14 dense logical matrices over 2 ranks (TP 1 x DP 2)" in result.stdout
    assert all(math.isfinite(x) for x in _losses(result.stdout)) and len(_losses(result.stdout)) == 3


@pytest.mark.multirank
def test_moe_with_expert_parallel_2_trains_through_megatron_training():
    result = _launch(*_with(TRAIN_FLAGS), "--num-experts", "4", "--moe-router-topk", "2",
                     "--moe-token-dispatcher-type", "allgather", "--expert-model-parallel-size", "2", ranks=2)
    assert result.returncode == 0, result.stdout[-5000:]
    # Each EP rank holds 2 of the 4 experts: 2 layers x 2 experts x (gate, up, fc2) expert matrices, planned over
    # the ranks holding the same experts; the router and attention stay dense over DP=2.
    assert "megatron-muon: 12 expert logical matrices" in result.stdout, result.stdout[-5000:]
    assert "megatron-muon: 10 dense logical matrices over 2 ranks (TP 1 x DP 2)" in result.stdout
    assert all(math.isfinite(x) for x in _losses(result.stdout)) and len(_losses(result.stdout)) == 3


def test_nvidia_muon_runs_the_same_update_under_megatron_cores_names():
    """The plugin redefaults Megatron's --muon-* flags; --optimizer nvidia_muon gets them in its own vocabulary."""
    from emerging_optimizers.orthogonalized_optimizers.muon import get_muon_scale_factor

    from megatron_muon.integration.flags import MuonOptimizerConfig
    from megatron_muon.integration.install import nvidia_muon_fields
    from megatron_muon.muon import update_scale

    fields = nvidia_muon_fields(MuonOptimizerConfig(optimizer="nvidia_muon", muon_extra_scale_factor=1.5))
    assert fields == {"muon_coefficient_type": "simple", "muon_scale_mode": "spectral",
                      "muon_extra_scale_factor": pytest.approx(0.3)}
    for rows, cols in ((256, 1024), (1024, 256), (640, 640)):
        nvidia = get_muon_scale_factor(rows, cols, mode=fields["muon_scale_mode"]) * fields["muon_extra_scale_factor"]
        assert nvidia == pytest.approx(update_scale("essential", rows, cols, 1.5), rel=1e-12)
    assert nvidia_muon_fields(MuonOptimizerConfig(optimizer="nvidia_muon", muon_coefficient_type="quintic",
                                                  muon_scale_mode="spectral")) == {}


# --- 3. a non-finite orthogonalized update, inside Megatron's wrappers and chain ----------------------------------


def _poisoned_step(expert_parallel: int, distributed: bool) -> dict:
    """One good step, then one where the last optimizer of the chain (the experts' under EP=2) reports a
    non-finite update on rank 0 only: Megatron must see an unsuccessful step on every rank, nothing may change."""
    import torch
    import torch.distributed as dist

    from megatron_muon.integration.flags import MuonOptimizerConfig
    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import Trainer, TrainingSetup, synthetic_batches
    from megatron_muon.models.shapes import TINY, GPTShape

    shape = GPTShape(num_experts=4) if expert_parallel > 1 else TINY
    with model_parallel(seed=3, expert_parallel=expert_parallel):
        config = MuonOptimizerConfig(optimizer="muon", lr=1e-2, use_distributed_optimizer=distributed,
                                     muon_ns_precision="fp32")
        trainer = Trainer(TrainingSetup(shape, config))
        chain = trainer.optimizer.chained_optimizers
        outcomes = []
        for step, poison in enumerate((False, True)):
            trainer.forward_backward(synthetic_batches(shape, 2, 1, seed=step + 10 * dist.get_rank()))
            trainer.finalize_grads()
            params = [p.detach().clone() for m in trainer.models for p in m.parameters()]
            inners = [o.optimizer for o in chain]
            for inner in inners:
                inner.init_state()  # lazily created at the first step: compare from zeros on
            state = [{k: v.clone() for k, v in inner.state[p].items()} for inner in inners for p in inner.state]
            last = inners[-1]
            real_prepare = last.prepare
            if poison and dist.get_rank() == 0:
                last.prepare = lambda: real_prepare() & False
            applied = trainer.optimizer_step()
            last.prepare = real_prepare
            after = [p.detach() for m in trainer.models for p in m.parameters()]
            state_after = [inner.state[p] for inner in inners for p in inner.state]
            outcomes.append(dict(
                applied=applied,
                params_changed=any(not torch.equal(a, b) for a, b in zip(params, after)),
                state_changed=any(not torch.equal(s[k], t[k]) for s, t in zip(state, state_after) for k in s),
                skipped=[inner.skipped for inner in inners],
            ))
        return dict(chain=len(chain), outcomes=outcomes)


@pytest.mark.multirank
@pytest.mark.parametrize("expert_parallel,distributed", [(1, True), (1, False), (2, True)],
                         ids=["dense-distributed", "dense-replicated", "moe-ep2-chain"])
def test_a_non_finite_update_is_a_skipped_step_on_every_rank(expert_parallel, distributed):
    for r in run_ranks(_poisoned_step, 2, (expert_parallel, distributed), timeout=300):
        assert r["chain"] == (2 if expert_parallel > 1 else 1)
        good, poisoned = r["outcomes"]
        assert good["applied"] and good["params_changed"] and good["state_changed"], r
        # The dense optimizer's update was finite, yet it is skipped too: one decision for the chain.
        assert not poisoned["applied"] and all(poisoned["skipped"]), r
        assert not poisoned["params_changed"] and not poisoned["state_changed"], r
