"""Resuming a MoE model's Muon under another expert-parallel size equals not stopping.

megatron-core gives expert weights an optimizer of their own only under EP > 1 (a dense and an expert optimizer in
the chain); under EP = 1 they are dense weights of the one dense optimizer. The tiny GQA GPT with 4 experts (top-2)
trains 3 steps under EP=2 (dense DP=2) and, separately, under EP=1 (DP=2), is saved with `dist_checkpointing`
exactly as tests/test_checkpoint.py does (`fully_reshardable`), with and without the distributed optimizer, then
resumes in fresh processes under the other EP size for 3 more steps (EP=2 -> EP=1 on 2 ranks and on 1 rank,
EP=1 -> EP=2 on 2 ranks). Every parameter must equal the uninterrupted saving run's within test_checkpoint's
TOLERANCE, so the Muon momentum of every expert matrix (and the AdamW state of the rest) must come back. Measured
(2026-12-06, CPU/gloo): 0.0 on every resume, both wrappers (same gradients, same arithmetic); with the expert
momenta zeroed after the load instead, 7.7e-2.

Gradients: after Megatron's reduction every step's gradient is overwritten with the same name-seeded one on every
layout (test_distributed_muon's synthetic gradients). With the model's own gradients EP=1 and EP=2 differ by
themselves: uninterrupted 6-step runs measured 3.6e-6 apart on the router weights (2026-12-06, CPU/gloo), over
TOLERANCE, from the token dispatch's reduction order amplified by Newton-Schulz; the checkpoint is under test here.
"""

import dataclasses
import multiprocessing

import pytest
import torch

from megatron_muon.testing.ranks import run_ranks
from tests.test_checkpoint import META, SAVE_AT, TOLERANCE, TOTAL, _global_batch_slice, _worst
from tests.test_distributed_muon import _assemble, _logical_pieces, _optimizer_config, _write_global

pytestmark = pytest.mark.multirank

WRAPPERS = {"distributed-optimizer": True, "replicated-state": False}


def _shape():
    from megatron_muon.models.shapes import TINY

    return dataclasses.replace(TINY, num_experts=4)


def _sharded(trainer, is_loading: bool) -> dict:
    model_sd = trainer.models[0].sharded_state_dict()
    return {"model": model_sd, "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading, metadata=META)}


def _replicas_identical(model) -> bool:
    """Dense weights equal over DP, expert weights (EP > 1) over expert DP."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    same = True
    for expert, group in ((False, ps.get_data_parallel_group()), (True, ps.get_expert_data_parallel_group())):
        flat = torch.cat([p.detach().flatten() for p in model.parameters()
                          if getattr(p, "allreduce", True) != expert] or [torch.zeros(0)])
        replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(replicas, flat, group=group)
        same &= all(torch.equal(r, replicas[0]) for r in replicas)
    return same


def _train(ep: int, ckpt_dirs: dict, resume: bool) -> list[dict]:
    """For each wrapper: resume=False trains TOTAL steps under EP=`ep`, saving after SAVE_AT into ckpt_dirs[wrapper];
    resume=True loads that checkpoint under EP=`ep` and trains the remaining steps."""
    from megatron.core import dist_checkpointing

    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import Trainer, TrainingSetup

    # torch_dist's writer starts a multiprocessing Manager, which run_ranks' daemonic ranks may not (test_checkpoint).
    multiprocessing.current_process()._config["daemon"] = False
    shape = _shape()
    results = []
    for wrapper, distributed in WRAPPERS.items():
        with model_parallel(seed=1234, expert_parallel=ep):
            # A resumed run starts from other weights: everything must come from the checkpoint.
            trainer = Trainer(
                TrainingSetup(shape, _optimizer_config(torch.float32, distributed)),
                init_weights=lambda models: _write_global(models[0], 0, 1, -3 if resume else -1, "weight"),
            )
            # What is under test: EP > 1 chains a dense and an expert optimizer, EP = 1 only the dense one.
            assert len(trainer.optimizer.chained_optimizers) == (2 if ep > 1 else 1)
            (model,) = trainer.models
            first, identical_after_load = 0, True
            if resume:
                loaded = dist_checkpointing.load(_sharded(trainer, True), ckpt_dirs[wrapper])
                model.load_state_dict(loaded["model"])
                trainer.optimizer.load_state_dict(loaded["optimizer"])
                identical_after_load = _replicas_identical(model)
                first = SAVE_AT
            dp_rank, dp_size = trainer.data_parallel
            for step in range(first, TOTAL):
                if not resume and step == SAVE_AT:
                    dist_checkpointing.save(_sharded(trainer, False), ckpt_dirs[wrapper])
                trainer.forward_backward(_global_batch_slice(shape, step, dp_rank, dp_size))
                trainer.finalize_grads()
                _write_global(model, 0, 1, step, "grad")
                assert trainer.optimizer_step()
            results.append(dict(config=wrapper, pieces=_logical_pieces(model, 0, 1),
                                replicas_identical=identical_after_load and _replicas_identical(model)))
    return results


def _by_wrapper(ranks: list) -> dict:
    assert all(run["replicas_identical"] for rank in ranks for run in rank)
    return {wrapper: _assemble(ranks, wrapper) for wrapper in WRAPPERS}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoint directories and uninterrupted parameters per saving EP size and wrapper."""
    out = {}
    for ep in (2, 1):
        dirs = {wrapper: str(tmp_path_factory.mktemp(f"ep{ep}-{wrapper}")) for wrapper in WRAPPERS}
        out[ep] = dirs, _by_wrapper(run_ranks(_train, 2, (ep, dirs, False)))
    return out


RESUMES = [(2, 1, 2), (2, 1, 1), (1, 2, 2)]


@pytest.mark.parametrize("saved_ep,ep,ranks", RESUMES, ids=[f"ep{s}-to-ep{e}-{n}rank" for s, e, n in RESUMES])
def test_resume_under_another_expert_parallel_size_equals_uninterrupted(saved, saved_ep, ep, ranks):
    dirs, uninterrupted = saved[saved_ep]
    resumed = _by_wrapper(run_ranks(_train, ranks, (ep, dirs, True)))
    for wrapper in WRAPPERS:
        worst = _worst(resumed[wrapper], uninterrupted[wrapper])
        print(f"resume ep{saved_ep} -> ep{ep} on {ranks} rank(s), {wrapper}: worst relative difference {worst:.2e}")
        assert worst <= TOLERANCE, (wrapper, worst)


def _groups(expert: bool, lr: float = 1e-3) -> list[dict]:
    """A Muon and an AdamW group as Megatron's checkpoint holds them (no params)."""
    common = dict(is_expert_parallel=expert, wd_mult=1.0, lr_mult=1.0, max_lr=5e-3, lr=lr, step=3)
    return [{**common, "optimizer": "muon", "use_muon": True}, {**common, "optimizer": "adamw", "use_muon": False}]


def test_regroup_joins_and_splits_dense_and_expert_groups():
    from megatron_muon.integration.checkpoint import regroup

    # EP=2 -> EP=1: the dense optimizer's groups continue the saved dense and expert groups (equal values).
    joined = regroup(_groups(False), _groups(False) + _groups(True), "test")
    assert joined == _groups(False)
    # EP=1 -> EP=2: the expert optimizer's groups continue the saved dense groups, as expert groups.
    assert regroup(_groups(True), _groups(False), "test") == _groups(True)
    # Saved dense and expert groups that would become one group must agree.
    with pytest.raises(ValueError, match=r"differ in \['lr'\]; resume under the expert-parallel size it was saved"):
        regroup(_groups(False), _groups(False) + _groups(True, lr=2e-3), "test")
    with pytest.raises(ValueError, match="has no param group"):
        regroup(_groups(False), [{**g, "wd_mult": 0.0} for g in _groups(False)], "test")
