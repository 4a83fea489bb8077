"""Resuming Muon from a Megatron distributed checkpoint on another TP x DP x PP layout equals not stopping.

The tiny GQA + gated-MLP GPT trains 3 steps under (TP, DP, PP) = (2, 2, 1) with the distributed optimizer (fp32),
is saved with `dist_checkpointing.save` (model + the optimizer's sharded state dict in Megatron's
`fully_reshardable` format, its param groups / step included), then resumes in fresh processes under other layouts
for 3 more steps. Every parameter must equal the uninterrupted 6-step run. Every layout starts from the same
name-seeded model (`_write_global`), and every global step trains on the same global batch whatever the DP size
(each DP rank takes its contiguous slice of it), so the layouts differ only in reduction order.
"""

import dataclasses
import multiprocessing
import re

import numpy as np
import pytest
import torch

from megatron_muon.testing.ranks import run_ranks
from tests.test_distributed_muon import _assemble, _logical_pieces, _optimizer_config, _write_global

pytestmark = pytest.mark.multirank

GLOBAL_MICRO_BATCHES = 4  # of one sample each, per global step
SAVE_AT, TOTAL = 3, 6
META = {"distrib_optim_sharding_type": "fully_reshardable"}
# fp32, 6 steps on real gradients; layouts differ only in reduction order. Measured worst (2026-11-25, CPU/gloo):
# 0.0 on the saving layout (bit-exact resume), 4.6e-7 on (1,4,1), (1,1,1), (1,2,2) and replicated (1,2,2).
TOLERANCE = 1e-6


def _model_shape():
    from megatron_muon.models.shapes import TINY

    # Four K/V groups (8 query heads, still GQA) so the checkpoint can also resume under TP=4.
    return dataclasses.replace(TINY, num_attention_heads=8, num_query_groups=4)


def _global_batch_slice(shape, step: int, dp_rank: int, dp_size: int):
    from megatron_muon.integration.training import synthetic_batches

    batches = synthetic_batches(shape, micro_batch=1, count=GLOBAL_MICRO_BATCHES, seed=1000 + step)
    per_rank = GLOBAL_MICRO_BATCHES // dp_size
    return batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]


def _dp_identical(model) -> bool:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group()
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(replicas, flat, group=group)
    return all(torch.equal(r, replicas[0]) for r in replicas)


def _sharded(trainer, is_loading: bool) -> dict:
    """The model's and the optimizer's sharded state, as saved and as loaded."""
    model_sd = trainer.models[0].sharded_state_dict()
    return {"model": model_sd, "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading, metadata=META)}


def _run(tp: int, pp: int, ckpt_dir: str, resume: bool, distributed: bool = True) -> dict:
    """resume=False: train TOTAL steps, saving after SAVE_AT. resume=True: load, then train the remaining steps."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import Trainer, TrainingSetup

    out = {}
    shape = _model_shape()
    with model_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=1234):
        tp_rank = ps.get_tensor_model_parallel_rank()
        # A resumed run starts from other weights: everything must come from the checkpoint.
        trainer = Trainer(
            TrainingSetup(shape, _optimizer_config(torch.float32, distributed)),
            init_weights=lambda models: _write_global(models[0], tp_rank, tp, -3 if resume else -1, "weight"),
        )
        (model,) = trainer.models
        first = 0
        if resume:
            loaded = dist_checkpointing.load(_sharded(trainer, True), ckpt_dir)
            model.load_state_dict(loaded["model"])
            trainer.optimizer.load_state_dict(loaded["optimizer"])
            out["dp_identical_after_load"] = _dp_identical(model)
            first = SAVE_AT
        dp_rank, dp_size = trainer.data_parallel
        for step in range(first, TOTAL):
            if not resume and step == SAVE_AT:
                # torch_dist's writer starts a multiprocessing Manager; run_ranks' ranks are daemonic (so they
                # die with the test), which multiprocessing forbids to have children. torchrun's ranks are not.
                multiprocessing.current_process()._config["daemon"] = False
                dist_checkpointing.save(_sharded(trainer, False), ckpt_dir)
            trainer.step(_global_batch_slice(shape, step, dp_rank, dp_size))
        out["dp_identical"] = _dp_identical(model)
        out["pieces"] = [dict(config="run", pieces=_logical_pieces(model, tp_rank, tp))]
    return out


def _params(ranks):
    return _assemble([r["pieces"] for r in ranks], "run")


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.linalg.norm(a[n] - b[n]) / np.linalg.norm(b[n])) for n in a)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    ranks = run_ranks(_run, 4, (2, 1, ckpt, False))
    assert all(r["dp_identical"] for r in ranks)
    return ckpt, _params(ranks)


LAYOUTS = [(2, 2, 1), (1, 4, 1), (4, 1, 1), (1, 2, 2), (1, 1, 1)]


@pytest.mark.parametrize("tp,dp,pp", LAYOUTS, ids=[f"tp{t}-dp{d}-pp{p}" for t, d, p in LAYOUTS])
def test_resume_on_another_layout_equals_uninterrupted(saved, tp, dp, pp):
    ckpt, uninterrupted = saved
    ranks = run_ranks(_run, tp * dp * pp, (tp, pp, ckpt, True))
    assert all(r["dp_identical_after_load"] and r["dp_identical"] for r in ranks)
    worst = _worst(_params(ranks), uninterrupted)
    print(f"resume tp{tp}-dp{dp}-pp{pp}: worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE, worst


def test_replicated_state_resumes_on_another_layout(tmp_path):
    # Without the distributed optimizer (fp32 model: megatron-core's own wrapper could not checkpoint it).
    ckpt = str(tmp_path)
    uninterrupted = _params(run_ranks(_run, 4, (2, 1, ckpt, False, False)))
    ranks = run_ranks(_run, 4, (1, 2, ckpt, True, False))
    assert all(r["dp_identical_after_load"] and r["dp_identical"] for r in ranks)
    worst = _worst(_params(ranks), uninterrupted)
    print(f"replicated resume tp1-dp2-pp2: worst relative difference {worst:.2e}")
    assert worst <= TOLERANCE, worst


def _try_load(trainer, ckpt_dir) -> str:
    """Load model + optimizer state from `ckpt_dir`: "loaded", or the error it raised."""
    from megatron.core import dist_checkpointing

    try:
        loaded = dist_checkpointing.load(_sharded(trainer, True), ckpt_dir)
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    except BaseException as e:  # noqa: BLE001  (torch's CheckpointException is a BaseException)
        return f"{type(e).__name__}: {e}"
    return "loaded"


def _tiny_trainer(config):
    from megatron_muon.integration.training import Trainer, TrainingSetup
    from megatron_muon.models.shapes import TINY

    return Trainer(TrainingSetup(TINY, config))


def _trained_one_step(config):
    from megatron_muon.models.shapes import TINY

    trainer = _tiny_trainer(config)
    trainer.step(_global_batch_slice(TINY, 0, 0, 1))
    return trainer


def _load_adam_into_muon(ckpt_dir: str, distributed: bool) -> str:
    """Save Megatron's own Adam, then load that checkpoint into Muon: returns the error raised."""
    from megatron.core import dist_checkpointing

    from megatron_muon.integration.parallel_state import model_parallel

    multiprocessing.current_process()._config["daemon"] = False
    config = _optimizer_config(torch.float32, distributed)
    with model_parallel(seed=1234):
        # One real step: Megatron's state init for torch's AdamW creates no `step`, which its checkpoint needs.
        adam = _trained_one_step(dataclasses.replace(config, optimizer="adam"))
        dist_checkpointing.save(_sharded(adam, False), ckpt_dir)
        return _try_load(_tiny_trainer(config), ckpt_dir)


@pytest.mark.parametrize("distributed", [True, False], ids=["distributed-optimizer", "replicated-state"])
def test_adam_checkpoint_is_refused_by_muon(tmp_path, distributed):
    (error,) = run_ranks(_load_adam_into_muon, 1, (str(tmp_path), distributed))
    print(error[:600])
    assert error != "loaded"
    # The refusal names a Muon tensor (its momentum is missing) or the foreign param groups.
    assert "momentum_buffer" in error or "megatron-muon" in error, error


def _load_muon_into_adam(ckpt_dir: str, distributed: bool) -> str:
    """Save the plugin's Muon, then load that checkpoint into Megatron's own Adam: returns the error raised."""
    from megatron.core import dist_checkpointing

    from megatron_muon.integration.parallel_state import model_parallel

    multiprocessing.current_process()._config["daemon"] = False
    config = _optimizer_config(torch.float32, distributed)
    with model_parallel(seed=1234):
        muon = _trained_one_step(config)
        dist_checkpointing.save(_sharded(muon, False), ckpt_dir)
        # One real Adam step first: megatron-core's Adam (torch's AdamW without Apex / TE) has no `step` state
        # before it, and its own state_dict asserts on that (so megatron.training cannot --load Adam on CPU at all).
        adam = _trained_one_step(dataclasses.replace(config, optimizer="adam"))
        return _try_load(adam, ckpt_dir)


@pytest.mark.parametrize("distributed", [True, False], ids=["distributed-optimizer", "replicated-state"])
def test_muon_checkpoint_is_refused_by_megatron_adam(tmp_path, distributed):
    (error,) = run_ranks(_load_muon_into_adam, 1, (str(tmp_path), distributed))
    print(error[:1500])
    assert error != "loaded"
    # megatron-core refuses it itself, before any tensor is read: the first Muon matrix's Adam moment is missing
    # (the checkpoint holds its momentum_buffer instead), named in the KeyError.
    missing = r"KeyError: .optimizer\.state\.exp_avg(_sq)?\.decoder\.[\w.]+weight from model not in state dict"
    assert re.search(missing, error), error
