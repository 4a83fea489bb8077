"""The CPU multi-rank harness runs real megatron-core: TP=2 equals TP=1, DP replicas stay identical, hangs fail."""

import time

import pytest
import torch

from megatron_muon.testing.ranks import RankFailed, RankTimeout, run_ranks

pytestmark = pytest.mark.multirank

STEPS = 3


def _train_tiny_gpt(tp: int, pp: int, dtype_name: str, distributed_optimizer: bool, overlap: bool) -> dict:
    """Train the tiny GQA + gated-MLP GPT with Megatron's own Adam; report losses and DP consistency."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import Trainer, TrainingSetup, synthetic_batches
    from megatron_muon.models.shapes import TINY

    dtype = getattr(torch, dtype_name)
    with model_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=1234):
        optimizer = OptimizerConfig(
            optimizer="adam", lr=1e-2, weight_decay=0.01, bf16=dtype == torch.bfloat16,
            use_distributed_optimizer=distributed_optimizer, clip_grad=1.0,
        )
        trainer = Trainer(TrainingSetup(TINY, optimizer, dtype, overlap_grad_reduce=overlap))
        dp_rank, dp_size = trainer.data_parallel
        # A fixed set of batches per DP rank, so the loss must fall if training works at all.
        batches = synthetic_batches(TINY, micro_batch=2, count=2, seed=dp_rank)
        losses = [trainer.step(batches) for _ in range(STEPS)]
        flat = torch.cat([p.detach().float().flatten() for p in trainer.models[0].parameters()])
        replicas = [torch.empty_like(flat) for _ in range(dp_size)]
        dist.all_gather(replicas, flat, group=parallel_state.get_data_parallel_group())
        return dict(
            losses=losses,
            dp_identical=all(torch.equal(r, replicas[0]) for r in replicas),
            dp_world=dp_size,
            first_stage=parallel_state.is_pipeline_first_stage(),
        )


def test_tp2_matches_tp1():
    (single,) = run_ranks(_train_tiny_gpt, 1, (1, 1, "float32", False, False))
    tp2 = run_ranks(_train_tiny_gpt, 2, (2, 1, "float32", False, False))
    # The model is built from one CPU seed and then sharded, so the first forward pass is the same model.
    for rank in tp2:
        assert rank["losses"][0] == pytest.approx(single["losses"][0], rel=1e-6)
        # Later steps differ only by the order of TP reductions in fp32.
        assert rank["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert single["losses"][-1] < single["losses"][0]


def test_dp_replicas_identical_with_megatron_adam():
    # TP=2 x DP=2 on 4 ranks, Megatron's distributed optimizer, grad reduce overlapped with backward.
    ranks = run_ranks(_train_tiny_gpt, 4, (2, 1, "float32", True, True))
    assert all(r["dp_world"] == 2 for r in ranks)
    assert all(r["dp_identical"] for r in ranks)
    # Different DP replicas see different data, so their losses differ (the check above is not vacuous).
    assert ranks[0]["losses"] != ranks[2]["losses"]
    assert all(r["losses"][-1] < r["losses"][0] for r in ranks)


def test_pipeline_parallel_runs_bf16():
    ranks = run_ranks(_train_tiny_gpt, 2, (1, 2, "bfloat16", True, False))
    first, last = ranks
    assert first["first_stage"] and first["losses"] == [None] * STEPS
    assert all(torch.isfinite(torch.tensor(last["losses"])))
    assert last["losses"][-1] < last["losses"][0]


def _one_rank_skips_the_barrier():
    import torch.distributed as dist

    if dist.get_rank() == 0:
        dist.barrier()


def _rank_one_sleeps():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(3600)


def _rank_one_raises():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("bad shard on rank 1")
    dist.barrier()  # rank 0 would wait here forever without the runner


def test_hung_collective_fails_loudly():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 0 of 2 raised first"):
        run_ranks(_one_rank_skips_the_barrier, 2, collective_timeout=3, timeout=120)
    assert time.monotonic() - start < 60


def test_stuck_rank_is_killed_at_the_deadline():
    with pytest.raises(RankTimeout, match=r"ranks \[1\]"):
        run_ranks(_rank_one_sleeps, 2, timeout=15)


def test_exception_on_one_rank_ends_the_run():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 of 2 raised first:(.|\n)*bad shard on rank 1"):
        run_ranks(_rank_one_raises, 2, timeout=120)
    assert time.monotonic() - start < 60
