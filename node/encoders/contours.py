"""Closed contours of binary masks, slice by slice (marching squares at the 0.5 level).

Every vertex lies half-way between a foreground and a background pixel centre, so filling the
polygons of a slice with the even-odd rule at pixel centres gives back exactly the mask:
islands are separate polygons, holes are polygons nested in them. Diagonally touching pixels are
kept as separate polygons (the saddle cells of marching squares isolate foreground corners), so
every polygon is simple. The mask is padded by one background pixel, so structures touching the
image border still close (their vertices lie half a pixel outside the image).

Every label of a label map (and any masks beside it) is traced in one pass over the volume, a
few slices at a time, with NumPy: only the 2x2 cells whose pixels differ are looked at; each
boundary cell of a label contributes one or two oriented segments, every crossing point starts
exactly one segment and ends exactly one, so "next segment" is a permutation whose cycles are
the contours, walked by SciPy's compiled graph search.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import depth_first_order

from node.volume import lookup

__all__ = ["Contours", "label_contours", "mask_contours", "outermost", "packed_contours"]

# Cell corners in clockwise order (rows grow downwards): a=(y, x) b=(y, x+1) c=(y+1, x+1) d=(y+1, x);
# case bit i is set when corner i is foreground. Edge e joins corner e to corner e+1: 0 top, 1 right,
# 2 bottom, 3 left. A segment runs from an edge entering the foreground (clockwise) to the next
# edge leaving it, which isolates foreground corners in the two saddle cases.


def _segment_table() -> np.ndarray:
    table = np.full((16, 2, 2), -1, dtype=np.int8)
    for case in range(16):
        inside = [(case >> i) & 1 for i in range(4)]
        pairs = []
        for e in range(4):
            if not inside[e] and inside[(e + 1) % 4]:
                f = next(g % 4 for g in range(e + 1, e + 4) if inside[g % 4] and not inside[(g + 1) % 4])
                pairs.append((e, f))
        for n, pair in enumerate(pairs):
            table[case, n] = pair
    return table


_SEGMENTS = _segment_table()


# Step from a cell to the neighbour across each edge, in cells of the (padded) chunk: top, right,
# bottom, left (multiplied out per chunk by the cell grid's width for the vertical steps).
_STEP_ROWS = np.array([-1, 0, 1, 0], dtype=np.int64)
_STEP_COLS = np.array([0, 1, 0, -1], dtype=np.int64)
# A crossing's doubled (row, col) offset from its cell's top-left pixel, per edge: the middle of
# the edge (top: between (y, x) and (y, x+1); right: between (y, x+1) and (y+1, x+1); ...).
_EDGE_ROW2 = np.array([0, 1, 2, 1], dtype=np.int64)
_EDGE_COL2 = np.array([1, 2, 1, 0], dtype=np.int64)


@dataclass(frozen=True)
class Contours:
    """The polygons of one label, packed: polygon i lies on slice ``slices[i]`` and has the next
    ``counts[i]`` rows of ``points``, (row, col) pixel-index coordinates without repeating the
    first vertex; slices ascending. An encoder writes them as they are, without a list of
    thousands of small arrays to make and join again."""

    slices: np.ndarray  # int64, one per polygon
    counts: np.ndarray  # int64, one per polygon
    points: np.ndarray  # (counts.sum(), 2) float64

    def polygons(self) -> list[tuple[int, np.ndarray]]:
        ends = np.cumsum(self.counts)
        return [(int(k), self.points[e - n:e]) for k, n, e in zip(self.slices, self.counts, ends)]


def label_contours(labels: np.ndarray, chunk: int = 32, skip: frozenset[int] = frozenset(),
                   masks: dict[int, np.ndarray] | None = None) -> dict[int, list[tuple[int, np.ndarray]]]:
    """``packed_contours`` as lists of ``(slice index, polygon)`` pairs, slices ascending; a polygon
    is an (n, 2) float array of (row, col) pixel-index coordinates without repeating the first vertex."""
    return {key: c.polygons() for key, c in packed_contours(labels, chunk, skip, masks).items()}


def mask_contours(mask: np.ndarray, chunk: int = 32) -> list[tuple[int, np.ndarray]]:
    """Contours of a (slices, rows, cols) boolean mask (see ``label_contours``)."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D (slices, rows, cols), got shape {mask.shape}")
    return label_contours(np.asarray(mask, dtype=bool).view(np.uint8), chunk).get(1, [])


def packed_contours(labels: np.ndarray, chunk: int = 32, skip: frozenset[int] = frozenset(),
                    masks: dict[int, np.ndarray | tuple[int, ...]] | None = None) -> dict[int, Contours]:
    """Contours of every non-zero label (except ``skip``) of a (slices, rows, cols) integer label
    volume, and of each mask of ``masks`` under its key: a boolean volume of the same shape, or a
    tuple of labels standing for their union (made a chunk at a time, never a volume); keys ascending.
    The volume is traced ``chunk`` slices at a time, which keeps the temporary arrays small,
    every label and mask of a chunk in one pass."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (slices, rows, cols), got shape {labels.shape}")
    masks = dict(masks or {})
    for key, mask in masks.items():
        if isinstance(mask, tuple):
            continue
        if mask.shape != labels.shape:
            raise ValueError(f"mask {key}: shape {mask.shape} differs from the labels' {labels.shape}")
    if labels.dtype.kind not in "uib":
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and labels.dtype.kind == "i" and int(labels.min()) < 0:
        raise ValueError("labels must not be negative")
    # One code per pixel: the label in the low bits, one bit per mask above it. A cell (2x2 pixel
    # centres) whose four codes are equal is inside or outside every label and mask at once, so
    # only the cells with differing codes are looked at any further (a few percent of a CT's).
    top = int(labels.max()) if labels.size else 0
    clash = sorted(key for key in masks if key not in skip and 0 < key <= top)
    if clash:
        raise ValueError(f"mask keys {clash} may also be labels of the volume: skip those labels")
    label_bits = top.bit_length()
    bits = label_bits + len(masks)
    dtype = next((t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if np.iinfo(t).bits >= bits), None)
    if dtype is None:
        raise ValueError(f"labels up to {top} with {len(masks)} masks do not fit 64 bits")
    parts: dict[int, list[Contours]] = {}
    scratch = _Scratch()
    for k0 in range(0, labels.shape[0], chunk):
        k1 = min(k0 + chunk, labels.shape[0])
        box = _chunk_box(labels[k0:k1], masks, k0, k1)
        if box is None:
            continue  # nothing in these slices
        r0, r1, c0, c1 = box
        # Only the rows and columns holding a label or mask, with a background ring: a body
        # leaves a third of a CT's field of view or more empty, and every step below is per pixel.
        code = scratch.array("code", (k1 - k0, r1 - r0 + 2, c1 - c0 + 2), dtype)
        code.fill(0)
        inner = code[:, 1:-1, 1:-1]
        inner[...] = labels[k0:k1, r0:r1, c0:c1]
        for bit, mask in enumerate(masks.values(), start=label_bits):
            cut = labels[k0:k1, r0:r1, c0:c1]
            part = _union(cut, mask, top, scratch) if isinstance(mask, tuple) else np.asarray(mask[k0:k1, r0:r1, c0:c1], dtype=bool)
            shifted = scratch.array("shifted", inner.shape, dtype)
            np.left_shift(part.view(np.uint8), dtype(bit), out=shifted)
            inner |= shifted
        for key, found in _trace(code, label_bits, skip, list(masks), scratch):
            parts.setdefault(key, []).append(Contours(found.slices + k0, found.counts,
                                                      found.points + np.array([r0, c0], dtype=float)))
    return {key: Contours(*(np.concatenate([getattr(p, f) for p in parts[key]]) for f in ("slices", "counts", "points")))
            for key in sorted(parts)}


def _chunk_box(labels: np.ndarray, masks: dict, k0: int, k1: int) -> tuple[int, int, int, int] | None:
    """The rows r0:r1 and columns c0:c1 of slices k0:k1 that hold a non-zero label or a mask's
    pixel (a union holding 0 covers everything), or None when there is none."""
    if any(isinstance(m, tuple) and 0 in m for m in masks.values()):
        return 0, labels.shape[1], 0, labels.shape[2]
    plane = np.any(labels, axis=0)
    for mask in masks.values():
        if not isinstance(mask, tuple):
            plane |= np.any(mask[k0:k1], axis=0)
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


class _Scratch:
    """Arrays reused from chunk to chunk, each the largest any chunk has asked for: a job worker
    maps every array of 1 MB or more afresh and hands it back when freed (node/jobs/worker.py),
    and a CT's chunks asked for some 30 MB each (60 000 page faults over a 512x512x300 label map)."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``, in the buffer kept under ``name``."""
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[name] = np.empty(size, dtype=np.uint8)
        return buffer[:size].view(dtype).reshape(shape)


def _union(labels: np.ndarray, members: tuple[int, ...], top: int, scratch: _Scratch) -> np.ndarray:
    """Where ``labels`` is one of ``members`` (``top``: the volume's largest label). A table
    lookup, or a comparison when the members are every label: np.isin compared the chunk with
    each member in turn, five times slower."""
    if 0 not in members and set(range(1, top + 1)) <= set(members):
        return np.not_equal(labels, 0, out=scratch.array("union", labels.shape, bool))
    table = np.zeros(max(top + 1, 256), dtype=bool)  # every byte value: looked up two at a time
    table[[m for m in members if 0 <= m <= top]] = True
    return lookup(table, labels)


def _trace(code: np.ndarray, label_bits: int, skip: frozenset[int], mask_keys: list[int],
           scratch: _Scratch) -> list[tuple[int, Contours]]:
    """The contours of every label (the low ``label_bits`` of ``code``) and mask (one bit each
    above them) of a padded chunk."""
    s, hp, wp = code.shape
    ch, cw = hp - 1, wp - 1  # the cell grid: cell (y, x) has pixel (y, x) as its top-left corner
    # Not all four corners equal: a != b, or b != c, or c != d.
    mixed, pair = scratch.array("mixed", (s, ch, cw), bool), scratch.array("pair", (s, ch, cw), bool)
    np.not_equal(code[:, :-1, :-1], code[:, :-1, 1:], out=mixed)
    mixed |= np.not_equal(code[:, :-1, 1:], code[:, 1:, 1:], out=pair)
    mixed |= np.not_equal(code[:, 1:, 1:], code[:, 1:, :-1], out=pair)
    cells = np.flatnonzero(mixed)  # raster order: slice, row, column
    if cells.size == 0:
        return []
    k, rest = np.divmod(cells, ch * cw)
    y, x = np.divmod(rest, cw)
    top_left = (k * hp + y) * wp + x
    flat = code.reshape(-1)
    # Corners a, b, c, d clockwise from the top left (the order of the case bits).
    corners = np.stack([flat[top_left], flat[top_left + 1], flat[top_left + wp + 1], flat[top_left + wp]], axis=1)
    del top_left
    groups = []  # (key, its boundary cells (indices into cells, ascending), their cases)
    if label_bits:
        lab = corners & corners.dtype.type((1 << label_bits) - 1)
        # Each label of a cell once, at the first corner holding it, with its case (the corners holding it).
        columns = [np.ascontiguousarray(lab[:, i]) for i in range(4)]
        case = np.empty(lab.shape, dtype=np.uint8)
        for j in range(4):
            case[:, j] = 1 << j
        first = lab != 0
        for j in range(4):
            for i in range(j):  # each pair of corners compared once
                same = columns[i] == columns[j]
                bits = same.view(np.uint8)
                case[:, j] |= bits << np.uint8(i)
                case[:, i] |= bits << np.uint8(j)
                first[:, j] &= ~same
        first &= case != 15
        for value in skip:
            first &= lab != value
        pick = np.flatnonzero(first)  # cell by cell: each label's cells stay in raster order below
        lab_p, case_p, cell_p = lab.reshape(-1)[pick], case.reshape(-1)[pick], pick // 4
        order = np.argsort(lab_p, kind="stable")
        lab_p, case_p, cell_p = lab_p[order], case_p[order], cell_p[order]
        cuts = np.flatnonzero(np.diff(lab_p)) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), lab_p.size]):
            if b > a:
                groups.append((int(lab_p[a]), cell_p[a:b], case_p[a:b]))
    for n, key in enumerate(mask_keys):
        on = ((corners >> corners.dtype.type(label_bits + n)) & corners.dtype.type(1)).astype(np.uint8)
        case = on[:, 0] | (on[:, 1] << 1) | (on[:, 2] << 2) | (on[:, 3] << 3)
        where = np.flatnonzero((case - np.uint8(1)) < 14)  # uint8 wraps 0 to 255: true for 1..14
        if where.size:
            groups.append((key, where, case[where]))
    return [(key, _cycles(cells[members], case, k[members], y[members], x[members], cw))
            for key, members, case in groups]


def _cycles(cell: np.ndarray, case: np.ndarray, k: np.ndarray, y: np.ndarray, x: np.ndarray, cw: int) -> Contours:
    """The closed polygons of one label or mask from its boundary cells (cell numbers ascending in
    a grid ``cw`` cells wide, their cases, slices, rows and columns), slices ascending."""
    saddle = _SEGMENTS[case, 1, 0] >= 0
    second = np.flatnonzero(saddle)
    # One segment per boundary cell, a second one for saddle cells (numbered after all the first).
    owner = np.concatenate([np.arange(cell.size), second])
    starts = np.concatenate([_SEGMENTS[case, 0, 0], _SEGMENTS[case[second], 1, 0]]).astype(np.int64)
    ends = np.concatenate([_SEGMENTS[case, 0, 1], _SEGMENTS[case[second], 1, 1]]).astype(np.int64)
    # The next segment starts where this one ends: on the same edge, seen from the neighbour cell
    # across it (the opposite edge there); that cell is found among the sorted cell numbers.
    target = cell[owner] + _STEP_ROWS[ends] * cw + _STEP_COLS[ends]
    nxt = np.minimum(np.searchsorted(cell, target), cell.size - 1)
    want = (ends + 2) % 4
    second_of = np.cumsum(saddle) - 1 + cell.size  # a saddle cell's second segment
    succ = np.where(_SEGMENTS[case[nxt], 0, 0] == want, nxt, second_of[nxt])
    if np.any(cell[nxt] != target) or np.any(starts[succ] != want):
        raise AssertionError("marching squares produced an open contour")  # cannot happen on a padded mask
    chain, lengths = _permutation_cycles(succ)

    at = owner[chain]
    pts = np.stack([2 * y[at] + _EDGE_ROW2[starts[chain]], 2 * x[at] + _EDGE_COL2[starts[chain]]], axis=1)  # doubled
    # Drop vertices in the middle of straight runs (same step in and out): same polygon, fewer points.
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    step = np.empty_like(pts)  # from the previous vertex of the same polygon (the last one, for its first)
    step[1:] = pts[1:] - pts[:-1]
    step[bounds[:-1]] = pts[bounds[:-1]] - pts[bounds[1:] - 1]
    following = np.empty_like(step)  # to the next vertex: the next one's step, the first one's for the last
    following[:-1] = step[1:]
    following[bounds[1:] - 1] = step[bounds[:-1]]
    keep = np.any(step != following, axis=1)
    slices = k[at[bounds[:-1]]]
    counts = np.add.reduceat(keep.astype(np.int64), bounds[:-1])
    points = pts[keep] / 2.0 - 1.0  # doubled padded coordinates -> pixel indices of the original mask
    if np.any(np.diff(slices) < 0):  # a contour made only of saddle cells' second segments starts late
        order = np.argsort(slices, kind="stable")
        begin = np.cumsum(counts) - counts
        moved = counts[order]
        points = points[np.repeat(begin[order] - (np.cumsum(moved) - moved), moved) + np.arange(points.shape[0])]
        slices, counts = slices[order], moved
    return Contours(slices, counts, points)


def _signed_areas(c: Contours) -> np.ndarray:
    """Twice each polygon's signed area (shoelace, x = column, y = row)."""
    ends = np.cumsum(c.counts)
    begins = ends - c.counts
    following = np.arange(1, c.points.shape[0] + 1)
    following[ends - 1] = begins
    y, x = c.points[:, 0], c.points[:, 1]
    return np.add.reduceat(x * y[following] - x[following] * y, begins)


def _outer_sign() -> float:
    """The sign of an island's area (a hole's is the other): the tracing's orientation, measured."""
    pixel = np.zeros((1, 1, 1), dtype=np.uint8)
    pixel[0, 0, 0] = 1
    return float(np.sign(_signed_areas(packed_contours(pixel)[1]))[0])


def _inside(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Whether each (row, col) point lies inside ``polygon`` (even-odd rule, a ray along +col).
    The points are vertices of other contours of the same mask, never on this one's edges."""
    y0, x0 = polygon[:, 0], polygon[:, 1]
    y1, x1 = np.roll(y0, -1), np.roll(x0, -1)
    py, px = points[:, 0:1], points[:, 1:2]
    spans = (y0 > py) != (y1 > py)  # (points, edges): the edge crosses the point's row
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    return np.count_nonzero(spans & (px < at), axis=1) % 2 == 1


def outermost(c: Contours) -> Contours:
    """The polygons of ``c`` that no other polygon of their slice encloses: the outline of the
    mask with every hole filled, and with it whatever lies in a hole (an island there is inside
    the filled outline). These are exactly the contours of the mask with its holes filled, a hole
    being background that does not reach the edge of its slice, diagonal steps included (the
    background is 8-connected when the foreground is 4-connected, as traced here). An island
    encloses nothing but holes, and a hole is enclosed by an island, so an island is outermost
    when no hole of its slice holds it; holes are few (none on most slices of a body outline)."""
    if c.counts.size == 0:
        return c
    hole = np.sign(_signed_areas(c)) != _OUTER_SIGN
    if not hole.any():
        return c
    keep = ~hole
    begins = np.cumsum(c.counts) - c.counts
    for k in np.unique(c.slices[hole]).tolist():
        on_slice = np.flatnonzero(c.slices == k)
        islands = on_slice[~hole[on_slice]]
        firsts = c.points[begins[islands]]  # one vertex of each island tells where it lies
        for h in on_slice[hole[on_slice]].tolist():
            keep[islands[_inside(firsts, c.points[begins[h]:begins[h] + c.counts[h]])]] = False
    return Contours(c.slices[keep], c.counts[keep], c.points[np.repeat(keep, c.counts)])


def _permutation_cycles(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cycles of the permutation ``succ``, each from its lowest element, in the order of those:
    (every element in that order, each cycle's length).

    The walk runs in SciPy's compiled depth-first search (a Python loop over the 1.5 million
    segments of a CT's contours took half a second): each element i gets a "backbone" node
    n + i whose edges go to i, then to the next backbone node. From the first backbone node the
    search walks a cycle from its lowest element to its end, returns to the backbone and moves
    on to the next element not yet seen, the lowest of its cycle: the elements come out as a walk
    from each cycle's lowest one gives them, and a cycle starts wherever one follows a backbone node."""
    n = succ.size
    backbone = np.empty(2 * n - 1, dtype=np.int32)
    backbone[0::2] = np.arange(n, dtype=np.int32)
    backbone[1::2] = np.arange(n + 1, 2 * n, dtype=np.int32)
    indices = np.concatenate([succ.astype(np.int32), backbone])
    indptr = np.concatenate([np.arange(n + 1, dtype=np.int32),
                             n + np.minimum(np.arange(2, 2 * n + 1, 2, dtype=np.int32), 2 * n - 1)])
    graph = csr_matrix((np.ones(indices.size), indices, indptr), shape=(2 * n, 2 * n))
    order = depth_first_order(graph, n, directed=True, return_predecessors=False)
    element = order[1:] < n
    chain = order[1:][element]
    if chain.size != n:
        raise AssertionError("contour walk missed segments")
    begins = np.flatnonzero((order[:-1] >= n)[element])
    return chain.astype(np.int64), np.diff(np.append(begins, n))


_OUTER_SIGN = _outer_sign()
