"""The distributed Muon step: every logical matrix orthogonalized exactly once across a TP x DP group.

Ranks hold pieces of logical matrices: a tensor-parallel shard of a (possibly fused) weight, and of that only
an element range when the optimizer state is sharded over data-parallel ranks. One step, on every rank of the
group at once:

  1. owners advance momentum M <- G + beta M and form the Nesterov direction U = G + beta M on what they own;
  2. one all-to-all sends every piece of U to the home rank of its logical matrix (`plan.py`: exactly one home
     per matrix, balanced by Newton-Schulz FLOPs), which reassembles the matrices (`pieces.py` geometry);
  3. homes orthogonalize their matrices in same-shape stacks and multiply by the logical shape's scale;
  4. a second all-to-all returns each owner its piece of the update: W <- W (1 - lr wd) - lr O.

With `--muon-overlap-groups G` steps 2-4 run as a pipeline over up to G groups of whole stacks
(`plan.pipeline_groups`): each group's pieces travel in their own asynchronous all-to-all, a home orthogonalizes a
group as soon as its pieces are in, and the group's updates start back at once, so Newton-Schulz runs while other
groups' pieces travel. Every stack gets the same Newton-Schulz call as in the one-group step and every element the
same wire rounding, so the result is bit-identical. The groups are a function of the plan alone; grouping by
gradient bucket instead would let a step start as soon as the buckets of its first group are reduced.

`ShardedMuonAdamW` is a torch optimizer that runs this step on its Muon groups and AdamW on the others; it is meant
to sit inside Megatron's optimizer wrappers (see integration/optimizer.py), but nothing here imports Megatron.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_muon.muon import adamw_updates_, advance_momenta, apply_muon_updates_, muon_directions_, update_scale
from megatron_muon.muon_config import MuonConfig
from megatron_muon.newton_schulz import check_precision, orthogonalize, precision_schedule
from megatron_muon.pieces import Block, pieces_of
from megatron_muon.plan import LogicalMatrix, OrthogonalizationPlan, Stack, pipeline_groups, plan_orthogonalization
from megatron_muon.runtime.exchange import PADDING, Exchange, Route, RouteTable, Slot


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
    """What the last Muon step cost this rank; bytes exclude pieces a rank keeps for itself. `index_bytes`: the
    memory its exchanges' index tensors hold between steps."""

    bytes_sent: int = 0
    bytes_received: int = 0
    ns_flops: int = 0
    orthogonalized: list[str] = field(default_factory=list)
    index_bytes: int = 0
    groups: int = 1  # pipeline groups the step ran in


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
        # Pipeline groups of whole stacks; group_of[m]: the group in which matrix m travels and is orthogonalized.
        stack_groups = pipeline_groups(self.plan.stacks, settings.overlap_groups)
        self.groups = max(stack_groups, default=0) + 1
        group_of = {name: g for stack, g in zip(self.plan.stacks, stack_groups) for name in stack.names}

        def tables():
            return [([[] for _ in range(world)], [[] for _ in range(world)]) for _ in range(self.groups)]

        gather, scatter = tables(), tables()
        # Every rank walks all holdings in the same order, so both ends of each exchange list the same pieces
        # in the same order.
        for rank, held in enumerate(holdings):
            for h in sorted(held, key=lambda h: h.key):
                for p in pieces(h, h.gather):
                    route, (out, into) = Route(h.key, p.local, p.matrix, p.logical), gather[group_of[p.matrix]]
                    if rank == self.me:
                        out[home[p.matrix]].append(route)
                    if home[p.matrix] == self.me:
                        into[rank].append(route)
                for p in pieces(h, h.update):
                    route, (out, into) = Route(p.matrix, p.logical, h.key, p.local), scatter[group_of[p.matrix]]
                    if home[p.matrix] == self.me:
                        out[rank].append(route)
                    if rank == self.me:
                        into[home[p.matrix]].append(route)
        self.gather = [RouteTable(*t, self.me) for t in gather]
        self.scatter = [RouteTable(*t, self.me) for t in scatter]
        # Per group, the stacks this rank orthogonalizes, one after another in one fp32 buffer (padded, see
        # exchange.py): the group's gather assembles them in place, and each stack is a [n, rows, cols] view of it,
        # batched into Newton-Schulz with no copy.
        self.my_stacks: list[list[Stack]] = [[] for _ in range(self.groups)]
        for stack, g in zip(self.plan.stacks, stack_groups):
            if stack.home == self.me:
                self.my_stacks[g].append(stack)
        self.homed: list[dict[str, Slot]] = []
        self.stack_numels = [[len(st.names) * st.rows * st.cols for st in stacks] for stacks in self.my_stacks]
        for stacks in self.my_stacks:
            slots, offset = {}, 0
            for st in stacks:
                for name in st.names:
                    slots[name] = Slot(offset, st.rows * st.cols, st.cols)
                    offset += st.rows * st.cols
            self.homed.append(slots)
        self._exchanges: tuple[list[Exchange], Exchange] | None = None

    def place(self, held: dict[str, Slot]) -> None:
        """Compile the exchanges for where this rank's weights sit in its flat buffer of directions and updates:
        one `Slot` per weight key it holds (a shard of the local weight, or all of it), covering the buffer (whose
        PADDING more elements follow). Per group a gather into that group's stacks, and one scatter whose parts
        are the groups, into the update buffer."""
        numel = sum(slot.numel for slot in held.values())
        gathers = [Exchange([table], [held], homed, sum(numels), self.device)
                   for table, homed, numels in zip(self.gather, self.homed, self.stack_numels)]
        self._exchanges = gathers, Exchange(self.scatter, self.homed, held, numel, self.device)

    def __call__(self, directions: torch.Tensor) -> tuple[torch.Tensor, StepStats]:
        """Orthogonalize: U, laid out as `place` said (and padded) -> scale * O for the same elements (padded the
        same way), in U's dtype.

        Pipelined over the groups: every group's pieces start travelling at once, each group is orthogonalized as
        soon as its own have arrived, and its updates start back right after, so Newton-Schulz overlaps the
        exchanges on either side of it. Each stack sees exactly the calls of the one-group step.
        """
        if self._exchanges is None:
            raise RuntimeError("DistributedMuonStep called before place(): bind it to an optimizer first")
        s, (gathers, scatter) = self.settings, self._exchanges
        incoming = [gather.start(self.wire_dtype, self.group) for gather in gathers]
        for transfer in incoming:
            transfer.send(0, directions)
        outgoing = scatter.start(self.wire_dtype, self.group)
        stats = StepStats(index_bytes=sum(g.index_bytes for g in gathers) + scatter.index_bytes, groups=self.groups)
        for g, transfer in enumerate(incoming):
            homed = transfer.finish(torch.float32)
            numels = self.stack_numels[g]
            for stack, flat in zip(self.my_stacks[g], homed.split([*numels, homed.numel() - sum(numels)])):
                matrices = flat.view(len(stack.names), stack.rows, stack.cols)
                ortho = orthogonalize(matrices, s.ns_steps, s.coefficients, s.ns_precision, method=s.ns_method)
                # Scaled straight back into the stack's place: the scatter packs the group from this buffer.
                torch.mul(ortho, update_scale(s.scale_mode, stack.rows, stack.cols, s.extra_scale_factor),
                          out=matrices)
                stats.ns_flops += stack.flops
                stats.orthogonalized.extend(stack.names)
            outgoing.send(g, homed)
        updates = outgoing.finish(directions.dtype)
        wire = [table.wire_elements() for table in (*self.gather, *self.scatter)]
        size = self.wire_dtype.itemsize
        stats.bytes_sent, stats.bytes_received = size * sum(w[0] for w in wire), size * sum(w[1] for w in wire)
        return updates, stats


@dataclass
class _Prepared:
    """A prepared step, held until `apply`: the advanced momentum and the update of every Muon main param."""

    momenta: list[torch.Tensor]
    advanced: list[torch.Tensor]
    groups: list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]]  # (group, params, their updates)


class ShardedMuonAdamW(torch.optim.Optimizer):
    """Muon on param groups with `use_muon`, AdamW (torch.optim.AdamW's formula) on the others.

    Constructed over model parameters; a wrapper that swaps in main params (Megatron's) calls `bind()` with the
    step routing and, per Muon main param, its key and the first element of the local weight it covers.

    Every update rule runs over all parameters of a group at once (`torch._foreach_*`), and the Muon main params
    of all groups share one flat buffer per step, for the directions and then for their updates, so the
    exchange moves every piece with a constant number of ops: a step's op count does not grow with the number of
    parameters.
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
        # Set by a chain of optimizers that prepared every one of them and agreed once (MuonChainedOptimizer):
        # step() then applies or discards what is prepared instead of deciding alone.
        self.decision: bool | None = None
        self._pending: _Prepared | None = None
        self._routing: DistributedMuonStep | None = None
        self._buffer_dtype = torch.float32

    def _muon_groups(self) -> list[tuple[dict, list[torch.Tensor]]]:
        # Walked at every step: Megatron's checkpoint loading replaces the group dicts (the params stay).
        return [(g, g["params"]) for g in self.param_groups if g["use_muon"] and g["params"]]

    def bind(self, routing: DistributedMuonStep, where: dict[torch.Tensor, tuple[str, int, int]]) -> None:
        """where: Muon main param -> (weight key, first local element it covers, local weight's cols).

        The Muon main params, in group order, make up one flat buffer; the routing compiles its exchanges for it.
        """
        params = [p for _, group_params in self._muon_groups() for p in group_params]
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise ValueError(f"Muon main params of one optimizer must share a dtype (one flat buffer), got {dtypes}")
        held, offset = {}, 0
        for p in params:
            key, start, cols = where[p]
            held[key] = Slot(offset, p.numel(), cols, start)
            offset += p.numel()
        routing.place(held)
        self._routing = routing
        self._buffer_dtype = dtypes.pop() if dtypes else torch.float32

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

    @property
    def routing_device(self) -> torch.device:
        """The device of this optimizer's collectives (its process group's)."""
        return self._routing.device

    @torch.no_grad()
    def step(self, closure=None):
        """Muon and AdamW over every group, or nothing at all if any rank's orthogonalized update is not finite.

        Megatron skips a step whose gradients are not finite; an update can still turn non-finite inside
        Newton-Schulz (an overflowing low-precision GEMM). Applying it would poison the weights and, once saved,
        the checkpoints, so it is treated like a non-finite gradient: every rank skips, no state changes, and
        `skipped` tells the wrapper (which reports the step as unsuccessful, as for a non-finite gradient).
        """
        decided, self.decision = self.decision, None
        if decided is None:
            decided = agree_finite([self.prepare()], self._routing.device)
        self.skipped = not decided
        if decided:
            self.apply()
        else:
            self.discard()

    def prepare(self) -> torch.Tensor:
        """Phase 1, collective over the Muon group: the advanced momentum and the orthogonalized update of every
        Muon piece this rank owns, held until `apply`. Returns a 0-dim bool tensor: are this rank's updates finite."""
        if self._routing is None:
            raise RuntimeError("ShardedMuonAdamW.step() before bind(): build it with build_muon_optimizer()")
        self.init_state()
        groups = self._muon_groups()
        params = [p for _, group_params in groups for p in group_params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        momenta = [self.state[p]["momentum_buffer"] for p in params]
        beta = self.settings.momentum
        # M <- G + beta M into new tensors, kept aside until the step is known good.
        advanced = advance_momenta(grads, momenta, beta) if params else []
        device = params[0].device if params else self._routing.device
        numel = sum(p.numel() for p in params)
        directions = torch.empty(numel + PADDING, dtype=self._buffer_dtype, device=device)
        if params:
            muon_directions_(self._param_views(directions, params), grads, advanced, beta, self.settings.nesterov)
        updates, self.last_step = self._routing(directions)
        views, groups_updates = self._param_views(updates, params), []
        for group, group_params in groups:
            groups_updates.append((group, group_params, views[: len(group_params)]))
            views = views[len(group_params) :]
        self._pending = _Prepared(momenta, advanced, groups_updates)
        if numel == 0:
            return torch.ones((), dtype=torch.bool, device=self._routing.device)
        # A max-norm is inf or nan exactly when some element is: one reduction, no host sync here.
        return torch.linalg.vector_norm(updates[:numel], float("inf")).isfinite()

    @staticmethod
    def _param_views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The start of the padded buffer `flat` as consecutive tensors shaped like `params`: one split, plus a
        view per param that is not 1-D (Megatron's distributed optimizer hands out 1-D shards)."""
        pieces = flat.split([*(p.numel() for p in params), flat.numel() - sum(p.numel() for p in params)])
        return [v if p.dim() == 1 else v.view(p.shape) for v, p in zip(pieces, params)]

    def apply(self) -> None:
        """Phase 2: commit the momentum, apply the Muon updates and take the AdamW step."""
        prepared, self._pending = self._pending, None
        if prepared.momenta:
            torch._foreach_copy_(prepared.momenta, prepared.advanced)
        for group, params, updates in prepared.groups:
            apply_muon_updates_(params, updates, group["lr"], group["weight_decay"], 1.0)
        for group in self.param_groups:
            group["step"] += 1
            params = group["params"]
            if not params:
                continue
            steps = [self.state[p]["step"] for p in params]
            # Set, not incremented: a step tensor shared by several params (as Megatron's loader leaves them) is
            # then right too.
            torch._foreach_copy_(steps, [torch.full_like(steps[0], float(group["step"]))] * len(steps))
            if group["use_muon"]:
                continue
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            adamw_updates_(params, grads, [self.state[p]["exp_avg"] for p in params],
                           [self.state[p]["exp_avg_sq"] for p in params], group["step"], group["lr"],
                           self.adam_betas, group.get("eps", self.adam_eps), group["weight_decay"])

    def discard(self) -> None:
        self._pending = None


def agree_finite(flags: list[torch.Tensor], device: torch.device) -> bool:
    """True if every flag on every rank of the job is true. One all-reduce and one host sync: the decision to
    apply a step must be the same everywhere (pipeline stages, expert and dense optimizers included)."""
    ok = torch.stack([f.to(device) for f in flags]).all().to(torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
