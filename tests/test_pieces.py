"""Rectangle geometry of pieces: checked element by element against explicit index sets."""

import itertools

import pytest

from megatron_muon.pieces import Block, Rect, check_blocks_tile, flat_range_rects, pieces_of


def cells(rect: Rect) -> set[tuple[int, int]]:
    return {(r, c) for r in range(rect.row0, rect.row0 + rect.rows) for c in range(rect.col0, rect.col0 + rect.cols)}


@pytest.mark.parametrize("cols", [1, 3, 7])
def test_flat_range_rects_cover_exactly_the_range(cols):
    rows = 5
    for start, end in itertools.combinations_with_replacement(range(rows * cols + 1), 2):
        rects = flat_range_rects(start, end, cols)
        assert len(rects) <= 3
        covered = [cell for rect in rects for cell in cells(rect)]
        assert len(covered) == len(set(covered)) == end - start
        assert set(covered) == {divmod(i, cols) for i in range(start, end)}


def test_pieces_map_each_element_to_its_logical_place():
    # A 6 x 4 local tensor: rows 0-3 are logical matrix "a" rows 8-11, rows 4-5 are "b" rows 0-1 at column 4.
    blocks = [Block("a", Rect(0, 0, 4, 4), 8, 0), Block("b", Rect(4, 0, 2, 4), 0, 4)]
    check_blocks_tile(blocks, 6, 4)
    start, end = 5, 22
    seen = {}
    for piece in pieces_of(blocks, start, end, 4):
        for (r, c), (lr, lc) in zip(sorted(cells(piece.local)), sorted(cells(piece.logical))):
            seen[r * 4 + c] = (piece.matrix, lr, lc)
    assert sorted(seen) == list(range(start, end))
    for flat, (matrix, lr, lc) in seen.items():
        r, c = divmod(flat, 4)
        assert (matrix, lr, lc) == (("a", r + 8, c) if r < 4 else ("b", r - 4, c + 4))


def test_tiling_errors():
    with pytest.raises(ValueError, match="overlap"):
        check_blocks_tile([Block("a", Rect(0, 0, 2, 2), 0, 0), Block("b", Rect(1, 0, 1, 2), 0, 0)], 2, 2)
    with pytest.raises(ValueError, match="cover 2 of 4"):
        check_blocks_tile([Block("a", Rect(0, 0, 1, 2), 0, 0)], 2, 2)
    with pytest.raises(ValueError, match="outside"):
        check_blocks_tile([Block("a", Rect(0, 0, 3, 2), 0, 0)], 2, 2)
