"""Moving rectangles of tensors between ranks in one all-to-all: the only communication Muon adds.

A `Route` copies one rectangle of a tensor on this rank into one rectangle of a tensor on a peer. A
`RouteTable` lists, per peer of a process group, the routes this rank sends and the routes it receives, in
the same order on both ends (both ends derive them from the same deterministic plan). `run_exchange` packs
every outgoing rectangle into one flat buffer, runs a single `all_to_all_single`, and unpacks the incoming
ones; rectangles whose peer is this rank are copied directly, never sent.

Tensors are addressed by key in a mapping. A tensor is either 2-D (rectangles index it directly) or a flat
1-D shard holding elements [start, start + numel) of a row-major [rows, cols] tensor, described by `Flat`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_muon.pieces import Rect


@dataclass(frozen=True)
class Flat:
    """A 1-D tensor holding elements [start, start + numel) of a row-major tensor with `cols` columns."""

    tensor: torch.Tensor
    start: int
    cols: int


def rect_view(target: torch.Tensor | Flat, rect: Rect) -> torch.Tensor:
    """A [rows, cols] view of `rect` inside `target` (writes through)."""
    if isinstance(target, Flat):
        offset = rect.row0 * target.cols + rect.col0 - target.start
        if offset < 0 or offset + (rect.rows - 1) * target.cols + rect.cols > target.tensor.numel():
            raise IndexError(f"{rect} is outside the flat shard starting at {target.start}")
        return target.tensor.as_strided(
            (rect.rows, rect.cols), (target.cols, 1), target.tensor.storage_offset() + offset
        )
    return target[rect.row0 : rect.row0 + rect.rows, rect.col0 : rect.col0 + rect.cols]


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


def run_exchange(
    table: RouteTable,
    sources: Mapping[str, torch.Tensor | Flat],
    destinations: Mapping[str, torch.Tensor | Flat],
    group: dist.ProcessGroup | None,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Copy every routed rectangle from `sources` on the senders into `destinations` on the receivers.

    Values travel as `dtype`; rectangles a rank routes to itself are rounded to it too, so the result does not
    depend on which pieces happened to be local.
    """
    me = table.my_rank
    for out, into in zip(table.sends[me], table.recvs[me]):
        rect_view(destinations[into.dst_key], into.dst).copy_(rect_view(sources[out.src_key], out.src).to(dtype))

    if len(table.sends) == 1:
        return
    # all_to_all is collective: a rank with nothing of its own to move still joins its peers' exchange.
    send_sizes = [0 if peer == me else n for peer, n in enumerate(table.sent_elements)]
    recv_sizes = [0 if peer == me else n for peer, n in enumerate(table.received_elements)]
    send = torch.empty(sum(send_sizes), dtype=dtype, device=device)
    offset = 0
    for peer, routes in enumerate(table.sends):
        if peer == me:
            continue
        for route in routes:
            n = route.src.numel
            send[offset : offset + n].view(route.src.rows, route.src.cols).copy_(
                rect_view(sources[route.src_key], route.src)
            )
            offset += n
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    offset = 0
    for peer, routes in enumerate(table.recvs):
        if peer == me:
            continue
        for route in routes:
            n = route.dst.numel
            rect_view(destinations[route.dst_key], route.dst).copy_(
                recv[offset : offset + n].view(route.dst.rows, route.dst.cols)
            )
            offset += n

