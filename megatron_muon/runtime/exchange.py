"""Moving rectangles of tensors between ranks in one all-to-all: the only communication Muon adds.

A `Route` copies one rectangle of a tensor on this rank into one rectangle of a tensor on a peer. A
`RouteTable` lists, per peer of a process group, the routes this rank sends and the routes it receives, in
the same order on both ends (both ends derive them from the same deterministic plan).

Tensors are addressed by key and live in one flat buffer per side: a `Slot` says where a keyed tensor sits in
its buffer, and the tensor is either a whole row-major [rows, cols] matrix or a 1-D shard holding its elements
[start, start + numel). `Exchange` compiles a route table against the slots of both sides, once, and a call is
then the same few ops however many pieces there are (on a GPU, a step of one kernel per piece is bound by
launches): a gather that packs every outgoing element in wire order (peer after peer, routes in table order), a
cast to the wire dtype, one `all_to_all_single` (one per part, when the exchange is sent in parts), and a gather
that builds the whole destination buffer from what arrived, then a cast. Routes a rank sends to itself take the same path, so they are rounded to the wire dtype like
every other piece and the result does not depend on which pieces happened to be local; the collective copies
them locally (they never reach the wire).

A gather is compiled from runs, stretches contiguous in both its source and its output (a piece's rows, merged
where they continue each other), rather than from an index per element, which would hold 4 to 8 bytes per element
moved: four times the Muon momentum for both directions together. The output is cut into blocks of `BLOCK`
elements; a block inside one run is one window of the source (one index_select over a sliding-window view of
it), and only the elements of blocks that straddle a run boundary (at most one block per run) get an index of
their own. Hence `PADDING`: a window may read up to BLOCK - 1 elements past the data, so every buffer a gather
reads carries that many more elements; the buffers a gather returns are padded the same way, so they can be
read by the next gather as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_muon.pieces import Rect

BLOCK = 64
PADDING = BLOCK


@dataclass(frozen=True)
class Slot:
    """A tensor at positions [offset, offset + numel) of a flat buffer, holding elements [start, start + numel) of a
    row-major tensor with `cols` columns (start 0 and numel rows * cols: a whole matrix)."""

    offset: int
    numel: int
    cols: int
    start: int = 0

    def row_starts(self, rect: Rect) -> torch.Tensor:
        """Buffer position of the first element of each of `rect`'s rows (int64, on the CPU)."""
        first = rect.row0 * self.cols + rect.col0 - self.start
        end = (rect.row0 + rect.rows - 1) * self.cols + rect.col0 + rect.cols - self.start
        if rect.col0 + rect.cols > self.cols or first < 0 or end > self.numel:
            raise IndexError(f"{rect} is outside elements [{self.start}, {self.start + self.numel}) of a tensor "
                             f"with {self.cols} columns")
        return self.offset + first + torch.arange(rect.rows, dtype=torch.int64) * self.cols


@dataclass(frozen=True)
class Route:
    src_key: str
    src: Rect
    dst_key: str
    dst: Rect


@dataclass
class RouteTable:
    """Per peer (index = rank in the group): what this rank sends there and receives from there."""

    sends: list[list[Route]]
    recvs: list[list[Route]]
    my_rank: int
    sent_elements: list[int] = field(init=False)
    received_elements: list[int] = field(init=False)

    def __post_init__(self):
        if len(self.sends) != len(self.recvs):
            raise ValueError("sends and recvs must list the same peers")
        self.sent_elements = [sum(r.src.numel for r in routes) for routes in self.sends]
        self.received_elements = [sum(r.dst.numel for r in routes) for routes in self.recvs]
        local_out, local_in = self.sends[self.my_rank], self.recvs[self.my_rank]
        if [(r.src.numel) for r in local_out] != [(r.dst.numel) for r in local_in]:
            raise ValueError("routes to self must pair up one to one")

    def wire_elements(self) -> tuple[int, int]:
        """Elements this rank puts on and takes off the wire (routes to itself excluded)."""
        sent = sum(n for peer, n in enumerate(self.sent_elements) if peer != self.my_rank)
        received = sum(n for peer, n in enumerate(self.received_elements) if peer != self.my_rank)
        return sent, received


def _index(positions: torch.Tensor, device: torch.device, long: bool = False) -> torch.Tensor:
    # index_select takes int32 indices: half the memory, as long as every position fits (index_copy_ wants int64).
    small = not long and (positions.numel() == 0 or int(positions.max()) < 2**31)
    return positions.to(device=device, dtype=torch.int32 if small else torch.int64)


class RunGather:
    """out[i] = source[i's source position] for i < n, compiled from runs that tile the output [0, n) exactly once.

    A run is (output position, source position, length): `length` elements contiguous in both. The source must
    hold at least PADDING elements after the last position any run reads (see the module docstring).
    """

    def __init__(self, out_pos: torch.Tensor, src_pos: torch.Tensor, lengths: torch.Tensor, n: int,
                 source_numel: int, device: torch.device):
        order = torch.argsort(out_pos)
        out_pos, src_pos, lengths = out_pos[order], src_pos[order], lengths[order]
        ends = out_pos + lengths
        if out_pos.numel() == 0:
            tiles = n == 0
        else:
            tiles = int(out_pos[0]) == 0 and int(ends[-1]) == n and bool((out_pos[1:] == ends[:-1]).all())
        if not tiles:
            raise ValueError(f"routes must cover the {n} destination elements exactly once")
        if out_pos.numel() and (int(src_pos.min()) < 0 or int((src_pos + lengths).max()) > source_numel):
            raise IndexError(f"a route reads outside the {source_numel} elements of its source buffer")
        # Runs that continue each other in the source too are one run: fewer boundaries, fewer straddling blocks.
        joined = torch.cat([torch.zeros(min(1, out_pos.numel()), dtype=torch.bool),
                            src_pos[1:] == src_pos[:-1] + lengths[:-1]])
        run = torch.cumsum(~joined, 0) - 1
        lengths = torch.zeros(int(run[-1]) + 1 if run.numel() else 0, dtype=torch.int64).index_add_(0, run, lengths)
        out_pos, src_pos = out_pos[~joined], src_pos[~joined]
        ends = out_pos + lengths

        def source_of(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(the run each output position falls in, the source position it reads)."""
            r = (torch.searchsorted(out_pos, positions, right=True) - 1).clamp(min=0)
            if out_pos.numel() == 0:
                return r, torch.zeros_like(positions)
            return r, src_pos[r] + positions - out_pos[r]

        # One block more than the data needs: the output is padded like every buffer a gather reads.
        starts = torch.arange(-(-n // BLOCK) + 1, dtype=torch.int64) * BLOCK
        r, windows = source_of(starts)
        in_data = starts < n
        straddles = in_data & (ends[r] < (starts + BLOCK).clamp(max=n)) if out_pos.numel() else in_data
        fix_out = (starts[straddles].unsqueeze(1) + torch.arange(BLOCK)).reshape(-1)
        fix_out = fix_out[fix_out < n]
        self.source_numel = source_numel
        self.windows = _index(torch.where(in_data, windows, 0), device)
        self.fix_out = _index(fix_out, device, long=True)
        self.fix_src = _index(source_of(fix_out)[1], device)

    def __call__(self, source: torch.Tensor) -> torch.Tensor:
        """The output, padded: n elements, then PADDING or more that mean nothing."""
        if source.numel() < self.source_numel + PADDING:
            raise ValueError(f"a gather source needs {self.source_numel} elements + {PADDING} of padding, "
                             f"got {source.numel()}")
        windows = source.as_strided((source.numel() - BLOCK + 1, BLOCK), (1, 1))
        out = windows.index_select(0, self.windows).view(-1)
        if self.fix_out.numel():
            out.index_copy_(0, self.fix_out, source.index_select(0, self.fix_src))
        return out

    @property
    def index_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.windows, self.fix_out, self.fix_src))


def _runs(table_routes: list[list[Route]], slots: Mapping[str, Slot], slot_side: str):
    """(slot positions, wire positions, lengths) of every rectangle row, walking the routes in wire order."""
    slot_pos, wire_pos, lengths, cursor = [], [], [], 0
    for routes in table_routes:
        for route in routes:
            rect = route.src if slot_side == "src" else route.dst
            slot = slots[route.src_key if slot_side == "src" else route.dst_key]
            slot_pos.append(slot.row_starts(rect))
            wire_pos.append(cursor + torch.arange(rect.rows, dtype=torch.int64) * rect.cols)
            lengths.append(torch.full((rect.rows,), rect.cols, dtype=torch.int64))
            cursor += rect.numel
    empty = torch.zeros(0, dtype=torch.int64)
    return tuple(torch.cat(parts) if parts else empty for parts in (slot_pos, wire_pos, lengths))


class Exchange:
    """Route tables compiled against the slots of their source buffers and of one destination buffer.

    An exchange moves one or more *parts*, each its own route table over its own source buffer: a part is packed
    and sent as soon as its source is ready (`Transfer.send`, an asynchronous all-to-all), while the parts before it
    may still travel; what arrives lands part after part in one incoming buffer, and one gather builds the
    destination from it once every part is in (`Transfer.finish`). The pipelined Muon step sends its updates back
    this way, one part per group of stacks, each as soon as its Newton-Schulz is done.

    Every element of the destination buffer (`destination_numel` of them) must be routed to exactly once by the
    parts together: the destination is then built whole by one gather from what arrives, and needs neither zeroing
    nor a scatter. A layout that leaves a gap or writes an element twice is an error here.
    """

    def __init__(
        self,
        tables: Sequence[RouteTable],
        sources: Sequence[Mapping[str, Slot]],
        destinations: Mapping[str, Slot],
        destination_numel: int,
        device: torch.device,
    ):
        if len(tables) != len(sources) or not tables:
            raise ValueError(f"an exchange needs one source buffer per route table, got {len(tables)} tables and "
                             f"{len(sources)} sources")
        self.device = device
        self.send_sizes = [list(t.sent_elements) for t in tables]
        self.recv_sizes = [list(t.received_elements) for t in tables]
        self.packs = []
        for table, slots in zip(tables, sources):
            src, wire, lengths = _runs(table.sends, slots, "src")
            self.packs.append(RunGather(wire, src, lengths, sum(table.sent_elements),
                                        sum(slot.numel for slot in slots.values()), device))
        # The incoming buffer holds the parts one after another, each in its table's wire order.
        self.part_offsets = [0]
        for sizes in self.recv_sizes:
            self.part_offsets.append(self.part_offsets[-1] + sum(sizes))
        dst, wire, lengths = _runs([routes for t in tables for routes in t.recvs], destinations, "dst")
        self.unpack = RunGather(dst, wire, lengths, destination_numel, self.part_offsets[-1], device)

    def start(self, wire: torch.dtype, group: dist.ProcessGroup | None) -> Transfer:
        """Begin moving this exchange's parts, values travelling as `wire`. Collective: every rank of `group` starts
        the same exchanges in the same order, and sends each part, even one with nothing of its own to move."""
        return Transfer(self, wire, group)

    def __call__(self, source: torch.Tensor, wire: torch.dtype, out_dtype: torch.dtype,
                 group: dist.ProcessGroup | None) -> torch.Tensor:
        """A one-part exchange, start to finish: the destination buffer (padded), in `out_dtype`, from every rank's
        `source` buffer (padded)."""
        transfer = self.start(wire, group)
        transfer.send(0, source)
        return transfer.finish(out_dtype)

    @property
    def index_bytes(self) -> int:
        return sum(pack.index_bytes for pack in self.packs) + self.unpack.index_bytes


class Transfer:
    """An exchange in flight: its parts sent so far and the collectives still moving them."""

    def __init__(self, exchange: Exchange, wire: torch.dtype, group: dist.ProcessGroup | None):
        self.exchange, self.wire, self.group = exchange, wire, group
        self.single_rank = len(exchange.send_sizes[0]) == 1
        self.incoming = None
        if not (self.single_rank and len(exchange.packs) == 1):
            self.incoming = torch.empty(exchange.part_offsets[-1] + PADDING, dtype=wire, device=exchange.device)
        self.sent = 0
        # (work, packed buffer): the buffer must outlive its asynchronous collective.
        self.in_flight: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, part: int, source: torch.Tensor) -> None:
        """Pack part `part` from `source` (its padded source buffer) and start moving it; parts go in order."""
        exchange = self.exchange
        if part != self.sent:
            raise RuntimeError(f"exchange parts are sent in order: expected part {self.sent}, got {part}")
        self.sent += 1
        packed = exchange.packs[part](source).to(self.wire)
        sent, received = exchange.send_sizes[part], exchange.recv_sizes[part]
        if self.incoming is None:  # one rank, one part: what it packed is what arrives
            self.incoming = packed
            return
        begin, end = exchange.part_offsets[part], exchange.part_offsets[part + 1]
        if self.single_rank:
            self.incoming[begin:end].copy_(packed[:end - begin])
            return
        work = dist.all_to_all_single(self.incoming[begin:end], packed[: sum(sent)], received, sent,
                                      group=self.group, async_op=True)
        self.in_flight.append((work, packed))

    def wait(self) -> None:
        for work, _ in self.in_flight:
            work.wait()
        self.in_flight.clear()

    def finish(self, out_dtype: torch.dtype) -> torch.Tensor:
        """Once every part is sent: wait for them and build the destination buffer (padded) in `out_dtype`."""
        if self.sent != len(self.exchange.packs):
            raise RuntimeError(f"{len(self.exchange.packs) - self.sent} exchange parts were never sent")
        self.wait()
        return self.exchange.unpack(self.incoming).to(out_dtype)
