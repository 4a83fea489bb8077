"""Megatron model-parallel state for one TP x PP (x DP, inferred) layout, set up and torn down as a unit."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist


def on_cpu() -> bool:
    return not torch.cuda.is_available()


@contextlib.contextmanager
def model_parallel(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    collective_timeout_s: float = 120.0,
    expert_parallel: int = 1,
) -> Iterator[None]:
    """Initialize Megatron's parallel groups over the current default process group; destroy them on exit.

    DP = world_size / (TP x PP). On a machine without CUDA the CPU shims are applied first. Megatron's own
    subgroups get the same collective timeout as the default group, so a hang fails instead of waiting 30 min.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel x pipeline_parallel = "
            f"{tensor_parallel} x {pipeline_parallel}"
        )
    if on_cpu():
        from megatron_muon.integration import cpu_shims

        cpu_shims.apply()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        distributed_timeout_minutes=max(1, math.ceil(collective_timeout_s / 60)),
    )
    model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
