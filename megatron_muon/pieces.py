"""How logical matrices are cut into the pieces that ranks hold, as rectangles.

Muon orthogonalizes logical matrices (Q, K, V, attention out, GLU gate, up, down of each layer), but a rank holds
something else: a tensor-parallel shard of a fused Megatron weight (its local tensor, [rows, cols]), and of that
shard only a flat element range when the distributed optimizer splits it over data-parallel ranks. Two maps
connect them:

- a `Block` says which rectangle of a local tensor is which rectangle of which logical matrix (the TP layout:
  QKV interleaving, the GLU [gate; up] halves, column or row partitioning);
- a flat range [start, end) of the row-major local tensor is at most three rectangles: a partial first row,
  whole rows, a partial last row.

Intersecting the two gives `Piece`s: rectangles copied as one strided block each way between a rank's local
tensor and the logical matrix on its home rank. Pure integer geometry: no torch, no distributed, no Megatron.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rect:
    row0: int
    col0: int
    rows: int
    cols: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def intersect(self, other: Rect) -> Rect | None:
        r0, c0 = max(self.row0, other.row0), max(self.col0, other.col0)
        r1 = min(self.row0 + self.rows, other.row0 + other.rows)
        c1 = min(self.col0 + self.cols, other.col0 + other.cols)
        if r1 <= r0 or c1 <= c0:
            return None
        return Rect(r0, c0, r1 - r0, c1 - c0)


@dataclass(frozen=True)
class Block:
    """Rectangle `local` of a rank's local weight is the same-size rectangle at (logical_row0, logical_col0) of
    logical matrix `matrix`."""

    matrix: str
    local: Rect
    logical_row0: int
    logical_col0: int

    def to_logical(self, sub: Rect) -> Rect:
        """Where a sub-rectangle of `local` lands in the logical matrix."""
        return Rect(
            self.logical_row0 + sub.row0 - self.local.row0,
            self.logical_col0 + sub.col0 - self.local.col0,
            sub.rows,
            sub.cols,
        )


@dataclass(frozen=True)
class Piece:
    """One rectangle moved between a rank's local tensor and a logical matrix."""

    matrix: str
    local: Rect
    logical: Rect


def flat_range_rects(start: int, end: int, cols: int) -> list[Rect]:
    """The row-major element range [start, end) of a [*, cols] tensor as at most three rectangles."""
    if not 0 <= start <= end:
        raise ValueError(f"bad flat range [{start}, {end})")
    rects = []
    row, col = divmod(start, cols)
    if col and start < end:  # partial first row
        width = min(cols - col, end - start)
        rects.append(Rect(row, col, 1, width))
        start += width
        row += 1
    full_rows = (end - start) // cols
    if full_rows:
        rects.append(Rect(row, 0, full_rows, cols))
        start += full_rows * cols
        row += full_rows
    if start < end:  # partial last row
        rects.append(Rect(row, 0, 1, end - start))
    return rects


def pieces_of(blocks: list[Block], start: int, end: int, cols: int) -> list[Piece]:
    """The pieces of every logical matrix held in flat range [start, end) of a local tensor with `cols` columns.

    Ordered by position in the local tensor, so a sender and a receiver that both call this agree on the order.
    """
    out = []
    for rect in flat_range_rects(start, end, cols):
        for block in blocks:
            sub = rect.intersect(block.local)
            if sub is not None:
                out.append(Piece(block.matrix, sub, block.to_logical(sub)))
    return out


def check_blocks_tile(blocks: list[Block], rows: int, cols: int) -> None:
    """Raise unless `blocks` cover the [rows, cols] local tensor exactly once (a layout bug guard)."""
    covered = sum(b.local.numel for b in blocks)
    whole = Rect(0, 0, rows, cols)
    for b in blocks:
        if whole.intersect(b.local) != b.local:
            raise ValueError(f"block {b} reaches outside the {rows} x {cols} local tensor")
    for i, a in enumerate(blocks):
        for b in blocks[i + 1 :]:
            if a.local.intersect(b.local) is not None:
                raise ValueError(f"blocks overlap: {a} and {b}")
    if covered != rows * cols:
        raise ValueError(f"blocks cover {covered} of {rows * cols} elements of the local tensor")
