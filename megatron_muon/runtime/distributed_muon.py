"""The distributed Muon step: every logical matrix orthogonalized exactly once across a TP x DP group.

Ranks hold pieces of logical matrices: a tensor-parallel shard of a (possibly fused) weight, and of that only
an element range when the optimizer state is sharded over data-parallel ranks. One step, on every rank of the
group at once:

  1. owners advance momentum M <- G + beta M and form the Nesterov direction U = G + beta M on what they own;
  2. one all-to-all sends every piece of U to the home rank of its logical matrix (`plan.py`: exactly one home
     per matrix, balanced by Newton-Schulz FLOPs), which reassembles the matrices (`pieces.py` geometry);
  3. homes orthogonalize their matrices in same-shape stacks and multiply by the logical shape's scale;
  4. a second all-to-all returns each owner its piece of the update: W <- W (1 - lr wd) - lr O.

`ShardedMuonAdamW` is a torch optimizer that runs this step on its Muon groups and AdamW on the others; it is meant
to sit inside Megatron's optimizer wrappers (see megatron/optimizer.py), but nothing here imports Megatron.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_muon.muon import adamw_update_, apply_muon_update_, muon_direction, update_scale
from megatron_muon.muon_config import MuonConfig
from megatron_muon.newton_schulz import check_precision, orthogonalize, precision_schedule
from megatron_muon.pieces import Block, pieces_of
from megatron_muon.plan import LogicalMatrix, OrthogonalizationPlan, plan_orthogonalization
from megatron_muon.runtime.exchange import Flat, Route, RouteTable, run_exchange


@dataclass(frozen=True)
class LocalWeight:
    """A weight as each TP rank holds it: its local [rows, cols] shape and, per TP rank, its blocks."""

    rows: int
    cols: int
    blocks: tuple[tuple[Block, ...], ...]


@dataclass(frozen=True)
class Holding:
    """Which elements of a local weight a rank sends to homes (`gather`) and receives updates for (`update`).

    With DP-sharded optimizer state both are the rank's shard. With replicated state every replica updates
    the whole weight, but each sends only its 1/DP part, so no piece travels twice.
    """

    key: str
    tp_rank: int
    gather: tuple[int, int]
    update: tuple[int, int]


@dataclass
class StepStats:
    """What the last Muon step cost this rank; bytes exclude pieces a rank keeps for itself."""

    bytes_sent: int = 0
    bytes_received: int = 0
    ns_flops: int = 0
    orthogonalized: list[str] = field(default_factory=list)


def wire_dtype(settings: MuonConfig) -> torch.dtype:
    """The dtype pieces travel in: no coarser than the finest Newton-Schulz GEMM that reads them.

    bf16 and fp8 iterations round their input to bf16 (fp8 quantizes from it), so bf16 pieces lose nothing and
    halve the traffic. fp32 and fp16 iterations would lose accuracy to a bf16 wire; fp16 pieces are not an option
    either, since raw momentum can sit below fp16's range (gradients of 1e-8 flush to 0): only the home rank's
    Frobenius normalization brings them into it. So those travel in fp32.
    """
    method = "standard" if settings.ns_method == "auto" else settings.ns_method
    used = set(precision_schedule(settings.ns_precision, settings.ns_steps, settings.coefficients, method))
    return torch.float32 if used & {"fp32", "fp16"} else torch.bfloat16


def group_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where this rank's exchange buffers and stacks live: the device the group's backend communicates on.

    Never the device of whichever tensor happens to be local: a rank whose shard holds no Muon element still sends,
    receives and orthogonalizes, and NCCL rejects CPU buffers.
    """
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DistributedMuonStep:
    """The routing of one rank, derived once from every rank's holdings (the same list on every rank)."""

    def __init__(
        self,
        weights: dict[str, LocalWeight],
        shapes: dict[str, tuple[int, int]],
        holdings: list[list[Holding]],
        group: dist.ProcessGroup | None,
        settings: MuonConfig,
    ):
        self.settings = settings
        self.group = group
        self.wire_dtype = wire_dtype(settings)
        self.device = group_device(group)
        self.me = dist.get_rank(group)
        world = dist.get_world_size(group)
        if len(holdings) != world:
            raise ValueError(f"holdings list {len(holdings)} ranks, the group has {world}")

        def pieces(h: Holding, which: tuple[int, int]):
            w = weights[h.key]
            return pieces_of(list(w.blocks[h.tp_rank]), *which, w.cols)

        elements: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for rank, held in enumerate(holdings):
            for h in held:
                for p in pieces(h, h.gather):
                    elements[p.matrix][rank] += p.local.numel
        self.plan: OrthogonalizationPlan = plan_orthogonalization(
            [LogicalMatrix(name, *shapes[name], dict(per_rank)) for name, per_rank in sorted(elements.items())],
            world,
            ns_steps=settings.ns_steps,
            coefficients=settings.coefficients,
            ns_method=settings.ns_method,
        )
        home = self.plan.home
        gather = ([[] for _ in range(world)], [[] for _ in range(world)])
        scatter = ([[] for _ in range(world)], [[] for _ in range(world)])
        # Every rank walks all holdings in the same order, so both ends of each exchange list the same pieces
        # in the same order.
        for rank, held in enumerate(holdings):
            for h in sorted(held, key=lambda h: h.key):
                for p in pieces(h, h.gather):
                    route = Route(h.key, p.local, p.matrix, p.logical)
                    if rank == self.me:
                        gather[0][home[p.matrix]].append(route)
                    if home[p.matrix] == self.me:
                        gather[1][rank].append(route)
                for p in pieces(h, h.update):
                    route = Route(p.matrix, p.logical, h.key, p.local)
                    if home[p.matrix] == self.me:
                        scatter[0][rank].append(route)
                    if rank == self.me:
                        scatter[1][home[p.matrix]].append(route)
        self.gather = RouteTable(*gather, self.me)
        self.scatter = RouteTable(*scatter, self.me)
        self.my_stacks = [s for s in self.plan.stacks if s.home == self.me]

    def __call__(self, directions: dict[str, Flat], updates: dict[str, Flat]) -> StepStats:
        """Orthogonalize: pieces of U in `directions` -> pieces of scale * O written into `updates`."""
        s, device = self.settings, self.device
        # Each stack's matrices are assembled straight into one [n, rows, cols] tensor: no copy before NS.
        stacked = [torch.zeros(len(st.names), st.rows, st.cols, dtype=torch.float32, device=device) for st in self.my_stacks]
        homed = {name: t[i] for st, t in zip(self.my_stacks, stacked) for i, name in enumerate(st.names)}
        run_exchange(self.gather, directions, homed, self.group, self.wire_dtype, device)
        stats = StepStats()
        for stack, matrices in zip(self.my_stacks, stacked):
            ortho = orthogonalize(matrices, s.ns_steps, s.coefficients, s.ns_precision, method=s.ns_method)
            ortho.mul_(update_scale(s.scale_mode, stack.rows, stack.cols, s.extra_scale_factor))
            homed.update(zip(stack.names, ortho))
            stats.ns_flops += stack.flops
            stats.orthogonalized.extend(stack.names)
        run_exchange(self.scatter, homed, updates, self.group, self.wire_dtype, device)
        (g_out, g_in), (s_out, s_in) = self.gather.wire_elements(), self.scatter.wire_elements()
        size = self.wire_dtype.itemsize
        stats.bytes_sent, stats.bytes_received = size * (g_out + s_out), size * (g_in + s_in)
        return stats


class ShardedMuonAdamW(torch.optim.Optimizer):
    """Muon on param groups with `use_muon`, AdamW (torch.optim.AdamW's formula) on the others.

    Constructed over model parameters; a wrapper that swaps in main params (Megatron's) calls `bind()` with the
    step routing and, per Muon main param, its key and the first element of the local weight it covers.
    """

    def __init__(
        self,
        param_groups: list[dict],
        settings: MuonConfig,
        lr: float,
        weight_decay: float,
        adam_betas=(0.95, 0.95),
        adam_eps: float = 1e-8,
    ):
        for group in param_groups:
            if "use_muon" not in group:
                raise ValueError("every ShardedMuonAdamW param group needs a `use_muon` flag")
        # Groups without their own lr / weight_decay use these until a scheduler sets them (as in Megatron); a
        # group's own `eps` (muP's per-parameter override) wins over adam_eps.
        super().__init__(param_groups, dict(lr=lr, weight_decay=weight_decay))
        check_precision(settings.ns_precision)
        self.settings = settings
        self.adam_betas = tuple(adam_betas)
        self.adam_eps = adam_eps
        self.last_step = StepStats()
        self.skipped = False  # the last step's orthogonalized update was not finite somewhere: nothing applied
        self._pending = None
        self._routing: DistributedMuonStep | None = None
        self._where: dict[torch.Tensor, tuple[str, int, int]] = {}

    def bind(self, routing: DistributedMuonStep, where: dict[torch.Tensor, tuple[str, int, int]]) -> None:
        """where: Muon main param -> (weight key, first local element it covers, local weight's cols)."""
        self._routing = routing
        self._where = where

    def init_state(self) -> None:
        """Create every state tensor (Megatron calls this before loading a checkpoint into the state).

        Every parameter, Muon's included, carries torch Adam's 0-dim `step` tensor and every group a `step`
        count: Megatron's checkpointing reads the step from one or the other (which one depends on whether
        Transformer Engine is installed) and requires it to be the same everywhere.
        """
        for group in self.param_groups:
            group.setdefault("step", 0)
            for p in group["params"]:
                state = self.state[p]
                if state:
                    continue
                state["step"] = torch.tensor(float(group["step"]), device=p.device)
                if group["use_muon"]:
                    state["momentum_buffer"] = torch.zeros_like(p)
                else:
                    state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))

    @torch.no_grad()
    def step(self, closure=None):
        """Muon and AdamW over every group, or nothing at all if any rank's orthogonalized update is not finite.

        Megatron skips a step whose gradients are not finite; an update can still turn non-finite inside
        Newton-Schulz (an overflowing low-precision GEMM). Applying it would poison the weights and, once saved,
        the checkpoints, so it is treated like a non-finite gradient: every rank skips, no state changes, and
        `skipped` tells the wrapper (which reports the step as unsuccessful, as for a non-finite gradient).
        """
        self.skipped = not agree_finite([self.prepare()], self._routing.device)
        if self.skipped:
            self.discard()
        else:
            self.apply()

    def prepare(self) -> torch.Tensor:
        """Phase 1, collective over the Muon group: the advanced momentum and the orthogonalized update of every
        Muon piece this rank owns, held until `apply`. Returns a 0-dim bool tensor: are this rank's updates finite."""
        if self._routing is None:
            raise RuntimeError("ShardedMuonAdamW.step() before bind(): build it with build_muon_optimizer()")
        self.init_state()
        beta, nesterov = self.settings.momentum, self.settings.nesterov
        directions, updates, pending = {}, {}, []
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            for p in group["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                # M <- G + beta M, kept aside (same operations as the in-place form) until the step is known good.
                advanced = self.state[p]["momentum_buffer"] * beta
                advanced.add_(grad)
                u = grad.add(advanced, alpha=beta) if nesterov else advanced
                key, start, cols = self._where[p]
                directions[key] = Flat(u.reshape(-1), start, cols)
                updates[key] = Flat(torch.empty(p.numel(), dtype=torch.float32, device=p.device), start, cols)
                pending.append((p, group, advanced, updates[key].tensor))
        self.last_step = self._routing(directions, updates)
        self._pending = pending
        if not pending:
            return torch.ones((), dtype=torch.bool, device=self._routing.device)
        # A max-norm is inf or nan exactly when some element is: one reduction per piece, no host sync here.
        return torch.stack(torch._foreach_norm([u for *_, u in pending], float("inf"))).isfinite().all()

    def apply(self) -> None:
        """Phase 2: commit the momentum, apply the Muon updates and take the AdamW step."""
        for p, group, advanced, update in self._pending:
            self.state[p]["momentum_buffer"].copy_(advanced)
            apply_muon_update_(p, update.view_as(p), group["lr"], group["weight_decay"], 1.0)
        self._pending = None
        for group in self.param_groups:
            group["step"] += 1
            for p in group["params"]:
                state = self.state[p]
                state["step"].fill_(group["step"])
                if group["use_muon"]:
                    continue
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                adamw_update_(p, grad, state["exp_avg"], state["exp_avg_sq"], group["step"], group["lr"],
                              self.adam_betas, group.get("eps", self.adam_eps), group["weight_decay"])

    def discard(self) -> None:
        self._pending = None


def agree_finite(flags: list[torch.Tensor], device: torch.device) -> bool:
    """True if every flag on every rank of the job is true. One all-reduce and one host sync: the decision to
    apply a step must be the same everywhere (pipeline stages, expert and dense optimizers included)."""
    ok = torch.stack([f.to(device) for f in flags]).all().to(torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
