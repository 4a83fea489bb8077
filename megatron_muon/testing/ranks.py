"""Run a function on N gloo ranks in fresh processes, and fail fast (never hang) when one of them does.

    results = run_ranks(train_and_report, world_size=4, args=(tp, dp))

Each rank is a spawned process with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (so code written for
torchrun runs unchanged), a gloo process group whose collectives time out after `collective_timeout`
seconds, and one intra-op thread (N ranks share the machine's cores). `fn` must be importable by name
(a module-level function) and its return value picklable; results come back in rank order.

Failure is loud: the first rank that raises ends the whole run with its traceback; a rank that dies
without reporting (segfault, OOM kill) ends it with its exit code; and if the run exceeds `timeout`
seconds, every rank is killed and RankTimeout names the ranks that never finished.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence


class RankFailed(RuntimeError):
    pass


class RankTimeout(RankFailed):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, args, rank, world_size, port, collective_timeout, env, results):
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
            **env,
        }
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=collective_timeout)
        )
        # Report before tearing the group down: peers then fail with "connection closed", and the root cause
        # must reach the parent first.
        try:
            # Pickled here, by value: a queue would hand torch tensors over as shared-memory handles that die
            # with this process.
            results.put((rank, True, pickle.dumps(fn(*args))))
        except BaseException:  # including KeyboardInterrupt and SystemExit
            results.put((rank, False, traceback.format_exc()))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _failure_report(world_size: int, failures: dict[int, str], results, grace_s: float = 2.0) -> str:
    """The first failure plus any others that arrive within `grace_s` (peers of a crashed rank fail too)."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if not ok:
            failures.setdefault(rank, value)
    first = next(iter(failures))
    lines = [f"rank {first} of {world_size} raised first:\n{failures[first]}"]
    lines += [f"then rank {rank} raised:\n{tb}" for rank, tb in failures.items() if rank != first]
    return "\n".join(lines)


def run_ranks(
    fn: Callable,
    world_size: int,
    args: Sequence = (),
    *,
    timeout: float = 600.0,
    collective_timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> list:
    """Run `fn(*args)` on `world_size` gloo ranks; return the per-rank results in rank order."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, tuple(args), rank, world_size, port, collective_timeout, dict(env or {}), results),
            name=f"rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    done: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(done))
                raise RankTimeout(
                    f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s "
                    f"(a hung collective or a deadlock); all ranks were killed"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if rank not in done and p.exitcode not in (None, 0):
                        raise RankFailed(f"rank {rank} died with exit code {p.exitcode} before reporting a result")
                continue
            if not ok:
                raise RankFailed(_failure_report(world_size, {rank: value}, results))
            done[rank] = pickle.loads(value)
    finally:
        for p in procs:
            if p.is_alive() and len(done) < world_size:
                p.kill()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return [done[rank] for rank in range(world_size)]
