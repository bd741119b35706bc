"""Closed contours of binary masks, slice by slice (marching squares at the 0.5 level).

Every vertex lies half-way between a foreground and a background pixel centre, so filling the
polygons of a slice with the even-odd rule at pixel centres gives back exactly the mask:
islands are separate polygons, holes are polygons nested in them. Diagonally touching pixels are
kept as separate polygons (the saddle cells of marching squares isolate foreground corners), so
every polygon is simple. The mask is padded by one background pixel, so structures touching the
image border still close (their vertices lie half a pixel outside the image).

The whole volume is traced at once with NumPy: each boundary cell contributes one or two oriented
segments, every crossing point starts exactly one segment and ends exactly one, so "next
segment" is a permutation whose cycles are the contours.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["label_contours", "mask_contours"]

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


def _crossing_ids(k: np.ndarray, y: np.ndarray, x: np.ndarray, edge: np.ndarray, hp: int, wp: int) -> np.ndarray:
    """Unique id of the crossing on ``edge`` of cell (k, y, x): 2*pixel index (+1 for vertical edges)."""
    # top/bottom edges are horizontal pixel pairs (y or y+1, x)-(.., x+1); left/right are vertical pairs.
    yy = y + (edge == 2)
    xx = x + (edge == 1)
    vertical = (edge == 1) | (edge == 3)
    return ((k * hp + yy) * wp + xx) * 2 + vertical


def _crossing_points(ids: np.ndarray, hp: int, wp: int) -> np.ndarray:
    """(n, 2) doubled (row, col) coordinates of crossings in the padded image (exact integers)."""
    vertical = ids & 1
    pix = ids >> 1
    y = (pix // wp) % hp
    x = pix % wp
    return np.stack([2 * y + vertical, 2 * x + 1 - vertical], axis=1)


def label_contours(labels: np.ndarray, chunk: int = 32,
                   skip: frozenset[int] = frozenset()) -> dict[int, list[tuple[int, np.ndarray]]]:
    """Contours of every non-zero label (except ``skip``) of a (slices, rows, cols) integer label volume.

    Returns label -> ``(slice index, polygon)`` pairs, slices ascending; a polygon is an (n, 2)
    float array of (row, col) pixel-index coordinates without repeating the first vertex. Each
    label is traced inside its bounding box only, ``chunk`` slices at a time, which keeps the
    temporary arrays small.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (slices, rows, cols), got shape {labels.shape}")
    out: dict[int, list[tuple[int, np.ndarray]]] = {}
    for label, box in _label_boxes(labels, skip).items():
        out[label] = _box_contours(lambda ks, js, is_, label=label: labels[ks, js, is_] == label, box, chunk)
    return out


def _label_boxes(labels: np.ndarray, skip: frozenset[int]) -> dict[int, tuple[slice, slice, slice]]:
    """Label -> its bounding box (ndimage.find_objects' boxes), for the labels not in ``skip``.
    A label map of a few labels is scanned plane by plane, a comparison per label (and its row and
    column projections where present): a fifth of find_objects' time on a 512x512x300
    volume (0.07 against 0.39 CPU s), which visits every voxel for every label up to the largest,
    the skipped one too."""
    top = int(labels.max()) if labels.size else 0
    if labels.dtype.kind not in "ub" or top > 16:
        return {i + 1: box for i, box in enumerate(ndimage.find_objects(labels))
                if box is not None and i + 1 not in skip}
    wanted = [v for v in range(1, top + 1) if v not in skip]
    planes: dict[int, list[int]] = {v: [] for v in wanted}
    rows = {v: np.zeros(labels.shape[1], dtype=bool) for v in wanted}
    cols = {v: np.zeros(labels.shape[2], dtype=bool) for v in wanted}
    same = np.empty(labels.shape[1:], dtype=bool)
    for k, plane in enumerate(labels):
        for v in wanted:
            if np.equal(plane, v, out=same).any():
                planes[v].append(k)
                rows[v] |= same.any(axis=1)
                cols[v] |= same.any(axis=0)
    boxes = {}
    for v in wanted:
        if planes[v]:
            js, is_ = np.flatnonzero(rows[v]), np.flatnonzero(cols[v])
            boxes[v] = (slice(planes[v][0], planes[v][-1] + 1), slice(int(js[0]), int(js[-1]) + 1),
                        slice(int(is_[0]), int(is_[-1]) + 1))
    return boxes


def mask_contours(mask: np.ndarray, chunk: int = 32) -> list[tuple[int, np.ndarray]]:
    """Contours of a (slices, rows, cols) boolean mask (see ``label_contours``)."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D (slices, rows, cols), got shape {mask.shape}")
    mask = np.asarray(mask, dtype=bool)  # no copy of a bool mask (a uint8 copy and a labelling pass cost
    # as much as a body outline's tracing); its bounding box from three projections instead
    box = []
    for axis in range(3):
        present = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if present.size == 0:
            return []
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return _box_contours(lambda ks, js, is_: mask[ks, js, is_], tuple(box), chunk)


def _box_contours(crop_of, box: tuple[slice, slice, slice], chunk: int) -> list[tuple[int, np.ndarray]]:
    """Contours of the mask ``crop_of(slices, rows, cols)`` inside ``box``, ``chunk`` slices at a time."""
    ks, js, is_ = box
    polygons = []
    for k0 in range(ks.start, ks.stop, chunk):
        for k, poly in _trace(crop_of(slice(k0, min(k0 + chunk, ks.stop)), js, is_)):
            poly += (js.start, is_.start)
            polygons.append((k0 + k, poly))
    return polygons


def _trace(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    s, r, c = mask.shape
    hp, wp = r + 2, c + 2
    padded = np.zeros((s, hp, wp), dtype=np.uint8)
    padded[:, 1:-1, 1:-1] = mask
    case = (padded[:, :-1, :-1] | (padded[:, :-1, 1:] << 1) | (padded[:, 1:, 1:] << 2) | (padded[:, 1:, :-1] << 3))
    del padded
    k, y, x = np.nonzero((case - 1) < 14)  # uint8 wraps 0 to 255: true for mixed cells 1..14
    if k.size == 0:
        return []
    cases = case[k, y, x]
    del case
    saddle = _SEGMENTS[cases, 1, 0] >= 0
    # One segment per boundary cell, a second one for saddle cells.
    k2, y2, x2 = (np.concatenate([a, a[saddle]]) for a in (k, y, x))
    starts = np.concatenate([_SEGMENTS[cases, 0, 0], _SEGMENTS[cases[saddle], 1, 0]]).astype(np.int64)
    ends = np.concatenate([_SEGMENTS[cases, 0, 1], _SEGMENTS[cases[saddle], 1, 1]]).astype(np.int64)
    src = _crossing_ids(k2, y2, x2, starts, hp, wp)
    dst = _crossing_ids(k2, y2, x2, ends, hp, wp)
    order = np.argsort(src, kind="stable")
    pos = np.searchsorted(src[order], dst)
    if np.any(src[order][np.minimum(pos, len(src) - 1)] != dst):
        raise AssertionError("marching squares produced an open contour")  # cannot happen on a padded mask
    succ = order[pos].tolist()

    # Cycles of the permutation; each starts at its lowest segment, so slices come out in order.
    n = len(succ)
    seen = bytearray(n)
    chain: list[int] = []
    lengths: list[int] = []
    for start in range(n):
        if seen[start]:
            continue
        j, length = start, 0
        while not seen[j]:
            seen[j] = 1
            chain.append(j)
            j = succ[j]
            length += 1
        lengths.append(length)
    chain_arr = np.asarray(chain, dtype=np.int64)
    pts = _crossing_points(src[chain_arr], hp, wp)
    slice_of = k2[chain_arr]

    # Drop vertices in the middle of straight runs (same step in and out): same polygon, fewer points.
    bounds = np.cumsum([0] + lengths)
    idx = np.arange(len(chain_arr))
    first = np.repeat(bounds[:-1], lengths)
    length = np.repeat(lengths, lengths)
    local = idx - first
    prev = first + (local - 1) % length
    nxt = first + (local + 1) % length
    keep = np.any((pts - pts[prev]) != (pts[nxt] - pts), axis=1)
    coords = pts / 2.0 - 1.0  # doubled padded coordinates -> pixel indices of the original mask
    out = []
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        sel = keep[b0:b1]
        out.append((int(slice_of[b0]), coords[b0:b1][sel]))
    out.sort(key=lambda t: t[0])  # a contour made only of saddle cells may start late
    return out
