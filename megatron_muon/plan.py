"""Which rank orthogonalizes which matrix: a pure, deterministic plan shared by every rank.

Newton-Schulz needs a whole logical matrix, but its momentum is spread over ranks (TP slices, DP shards). Each
matrix therefore gets exactly one home rank: the owners send their pieces there, the home runs Newton-Schulz once,
and sends every owner its piece of the result. NVIDIA's TP `duplicated` mode instead runs the full Newton-Schulz on
every TP rank (TP-fold redundant work), and its layer-wise DP optimizer balances homes by element count, although
the cost of an m x n matrix (m <= n) grows like 4 m^2 n + 2 m^3, not m n: per element and step a square 2560^2
matrix costs 6 * 2560 FLOPs, a 10240 x 2560 one 4.5 * 2560, a 1280 x 2560 one 2.5 * 2560.

Assignment is LPT (longest processing time first) on Newton-Schulz FLOPs (or on elements, `balance="elements"`,
the baseline): matrices in order of descending cost, ties by name; each goes to a rank whose load is currently the
least. Among several least-loaded ranks the one holding the largest piece of the matrix wins (less traffic), then
the lowest rank. Only exact ties are broken this way, so LPT's bound (max load <= 4/3 of the optimum) still holds.
All arithmetic is on integers and nothing depends on input order or hash seeds, so every rank computes the same
plan on its own.

Batching does not steer the assignment: same-shape matrices have equal cost, are consecutive in LPT order and
land round-robin on the least-loaded ranks, so each rank gets its even share of every shape. Grouping the result
by (home, shape) into `Stack`s, each one batched `orthogonalize` call, then gives each rank one launch per shape it
holds (8 ranks x 4 shapes = 32 stacks for the paper's 3.67B model); steering for bigger stacks could only
unbalance the FLOPs that dominate the step.

Pure Python: no torch.distributed, no Megatron.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Literal

from megatron_muon.newton_schulz import orthogonalization_flops

Balance = Literal["flops", "elements"]


@dataclass(frozen=True)
class LogicalMatrix:
    """A rows x cols matrix whose momentum is partitioned over ranks: `pieces` maps rank -> elements held there."""

    name: str
    rows: int
    cols: int
    pieces: dict[int, int] = field(hash=False)

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"matrix {self.name!r} needs a positive shape, got {self.rows} x {self.cols}")
        if not self.pieces or any(n < 1 for n in self.pieces.values()):
            raise ValueError(f"matrix {self.name!r} needs at least one piece, each non-empty; got {self.pieces}")
        if sum(self.pieces.values()) != self.rows * self.cols:
            raise ValueError(
                f"pieces of matrix {self.name!r} hold {sum(self.pieces.values())} elements, not "
                f"{self.rows} x {self.cols} = {self.rows * self.cols}; pieces must partition the matrix"
            )

    @classmethod
    def sharded(cls, name: str, rows: int, cols: int, owners: Sequence[int]) -> LogicalMatrix:
        """Split evenly over `owners` (TP slices); the first `elements % len(owners)` owners hold one more."""
        if not owners or len(set(owners)) != len(owners):
            raise ValueError(f"matrix {name!r} needs distinct owners, got {tuple(owners)}")
        base, extra = divmod(rows * cols, len(owners))
        return cls(name, rows, cols, {rank: base + (i < extra) for i, rank in enumerate(owners)})

    @property
    def owners(self) -> tuple[int, ...]:
        return tuple(sorted(self.pieces))


@dataclass(frozen=True)
class Stack:
    """Same-shape matrices with one home, orthogonalized by one batched call."""

    home: int
    rows: int
    cols: int
    names: tuple[str, ...]
    flops: int


@dataclass(frozen=True)
class OrthogonalizationPlan:
    """Homes, stacks, per-rank Newton-Schulz FLOPs and per-rank bytes of the gather (pieces to homes).

    The scatter (results back to owners) mirrors the gather, so each rank sends and receives the same total.
    `flops` is always the Newton-Schulz cost, also for a plan balanced by elements, so plans compare directly.
    """

    world_size: int
    balance: Balance
    home: dict[str, int]
    stacks: tuple[Stack, ...]
    flops: tuple[int, ...]
    gather_sent: tuple[int, ...]
    gather_received: tuple[int, ...]

    @property
    def total_flops(self) -> int:
        return sum(self.flops)

    @property
    def max_flops(self) -> int:
        return max(self.flops)

    @property
    def mean_flops(self) -> float:
        return self.total_flops / self.world_size

    @property
    def imbalance(self) -> float:
        """max / mean of per-rank FLOPs: 1.0 is perfect, the step waits for the slowest rank."""
        return self.max_flops / self.mean_flops if self.total_flops else 1.0

    @property
    def bytes_sent(self) -> tuple[int, ...]:
        # Gather: pieces a rank ships to their homes; scatter: results a home ships back (= what it gathered).
        return tuple(s + r for s, r in zip(self.gather_sent, self.gather_received))

    @property
    def bytes_received(self) -> tuple[int, ...]:
        # Rank by rank equal to bytes_sent: what a rank gathers it scatters back, what it sends comes back.
        return self.bytes_sent


def plan_orthogonalization(
    matrices: Iterable[LogicalMatrix],
    world_size: int,
    ns_steps: int = 5,
    max_stack: int | None = None,
    bytes_per_element: int = 4,
    balance: Balance = "flops",
    coefficients: str = "jordan",
    ns_method: str = "standard",
) -> OrthogonalizationPlan:
    """Assign every matrix one home rank by LPT on `balance` and group homes into batched stacks.

    Ranks are numbered 0..world_size-1 within the group that shares the work (e.g. TP x DP). `max_stack` caps
    matrices per stack (None: no cap); `bytes_per_element` sizes the traffic estimate. FLOPs are those of the
    Newton-Schulz variant that `ns_method` resolves to for each shape (Gram is cheaper on rectangular ones).
    """
    matrices = list(matrices)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if ns_steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
    if max_stack is not None and max_stack < 1:
        raise ValueError(f"max_stack must be None or >= 1, got {max_stack}")
    if bytes_per_element < 1:
        raise ValueError(f"bytes_per_element must be >= 1, got {bytes_per_element}")
    if balance not in ("flops", "elements"):
        raise ValueError(f"unknown balance {balance!r}; choose 'flops' or 'elements'")
    names = [m.name for m in matrices]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"matrix names must be unique; duplicated: {duplicates}")
    for m in matrices:
        if any(not 0 <= rank < world_size for rank in m.pieces):
            raise ValueError(f"matrix {m.name!r} has owners {m.owners} outside ranks [0, {world_size})")

    def flops(m: LogicalMatrix) -> int:
        return orthogonalization_flops(m.rows, m.cols, ns_steps, coefficients, ns_method)

    def cost(m: LogicalMatrix) -> int:
        return flops(m) if balance == "flops" else m.rows * m.cols

    load = [0] * world_size
    rank_flops = [0] * world_size
    sent = [0] * world_size
    received = [0] * world_size
    home: dict[str, int] = {}
    for m in sorted(matrices, key=lambda m: (-cost(m), m.name)):
        least = min(load)
        owners = [r for r in m.owners if load[r] == least]
        # The largest piece stays put; equal pieces go to the lowest rank (owners are sorted, max keeps the first).
        h = max(owners, key=lambda r: m.pieces[r]) if owners else load.index(least)
        home[m.name] = h
        load[h] += cost(m)
        rank_flops[h] += flops(m)
        for rank, elements in m.pieces.items():
            if rank != h:
                sent[rank] += elements * bytes_per_element
                received[h] += elements * bytes_per_element

    by_name = {m.name: m for m in matrices}

    def group_key(name: str) -> tuple[int, int, int]:
        return home[name], by_name[name].rows, by_name[name].cols

    stacks = []
    for (h, rows, cols), group in groupby(sorted(home, key=lambda n: (group_key(n), n)), key=group_key):
        group = list(group)
        step = max_stack or len(group)
        for i in range(0, len(group), step):
            chunk = tuple(group[i : i + step])
            stacks.append(Stack(h, rows, cols, chunk, len(chunk) * orthogonalization_flops(rows, cols, ns_steps, coefficients, ns_method)))

    return OrthogonalizationPlan(
        world_size=world_size,
        balance=balance,
        home=dict(sorted(home.items())),
        stacks=tuple(stacks),
        flops=tuple(rank_flops),
        gather_sent=tuple(sent),
        gather_received=tuple(received),
    )


def pipeline_groups(stacks: Sequence[Stack], groups: int) -> tuple[int, ...]:
    """The pipeline group of every stack, for a step that moves and orthogonalizes `groups` groups in turn.

    Each home's stacks, in plan order, are cut into consecutive runs of about equal Newton-Schulz FLOPs (a stack
    goes to the group its FLOPs' midpoint falls in), so on every rank the groups take similar time. A stack is
    never split: its batched call, and so every bit of its result, is the same however the step is pipelined.
    Groups that no home uses are dropped, so fewer groups may result.
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    total: dict[int, int] = {}
    for s in stacks:
        total[s.home] = total.get(s.home, 0) + s.flops
    done: dict[int, int] = {}
    raw = []
    for s in stacks:
        before = done.get(s.home, 0)
        done[s.home] = before + s.flops
        # Integer arithmetic: every rank computes the same groups.
        raw.append(min(groups - 1, groups * (2 * before + s.flops) // (2 * total[s.home])))
    used = sorted(set(raw))
    return tuple(used.index(g) for g in raw)
