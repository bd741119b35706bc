"""Connected components of a body-sized mask without a body-sized int32 label volume.

A model's bone label on a 512x512x300 CT has more than 65535 speckle components in its box, so
``ndimage.label`` of the whole box needs 32-bit labels (four bytes a voxel, ~140 MB): the peak of a
model job. Labelled a slab at a time instead, each slab fits 8 or 16 bits; the slabs' components
that touch across a boundary (26-connectivity) are joined as a graph, which gives the same
components, sizes and order as labelling the whole mask at once.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from node.volume import value_counts

__all__ = ["label_small", "components_to_drop"]

_SLAB = 32  # slices of the first axis labelled at a time
_FULL = np.ones((3, 3, 3), dtype=bool)


def label_small(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``ndimage.label`` in the smallest integer type its count fits: a body-sized box labelled as
    int32 is four times the mask (315 MB at 512x512x300)."""
    for dtype in (np.uint8, np.uint16):
        out = np.empty(mask.shape, dtype=dtype)
        try:
            return out, int(ndimage.label(mask, structure=structure, output=out))
        except RuntimeError:  # more components than the type holds
            del out
    return ndimage.label(mask, structure=structure)


def _touching(last: np.ndarray, first: np.ndarray, node_last: int, node_first: int) -> tuple[np.ndarray, np.ndarray]:
    """(node, node) pairs of components in two adjacent slices that touch: a voxel of ``last`` and
    any of the nine nearest voxels of ``first`` (26-connectivity across the boundary). Label L of a
    slice is node ``node_* + L - 1``."""
    rows, cols = [], []
    n_j, n_i = last.shape
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            a = last[max(0, -dj):n_j - max(0, dj), max(0, -di):n_i - max(0, di)]
            b = first[max(0, dj):n_j - max(0, -dj), max(0, di):n_i - max(0, -di)]
            both = (a > 0) & (b > 0)
            rows.append(a[both].astype(np.int64) + (node_last - 1))
            cols.append(b[both].astype(np.int64) + (node_first - 1))
    return np.concatenate(rows), np.concatenate(cols)


def components_to_drop(mask: np.ndarray, min_voxels: float = 0.0,
                       largest_only: bool = False) -> Iterator[tuple[slice, np.ndarray]]:
    """(slab, drop) for each slab of ``mask``'s first axis: ``drop`` (bool, the slab's shape) marks
    the voxels of components (26-connected over the whole mask) smaller than ``min_voxels``, and
    with ``largest_only`` of every component but the largest (the first in raster order among
    equals, as ``np.argmax`` over ``ndimage.label``'s numbering picks it)."""
    slabs = []  # (slab, labels, first node, count): node ids are global, 0-based, in raster order
    nodes = 0
    for k0 in range(0, mask.shape[0], _SLAB):
        labels, n = label_small(mask[k0:k0 + _SLAB], structure=_FULL)
        slabs.append((slice(k0, k0 + labels.shape[0]), labels, nodes, n))
        nodes += n
    if nodes == 0:
        return
    edges = [_touching(a[1][-1], b[1][0], a[2], b[2]) for a, b in zip(slabs, slabs[1:])]
    rows = np.concatenate([e[0] for e in edges]) if edges else np.zeros(0, np.int64)
    cols = np.concatenate([e[1] for e in edges]) if edges else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(nodes, nodes))
    count, component = connected_components(graph, directed=False)
    node_sizes = np.concatenate([value_counts(labels, n + 1)[1:n + 1] for _, labels, _, n in slabs])
    sizes = np.bincount(component, weights=node_sizes, minlength=count)
    keep = sizes >= min_voxels
    if largest_only:
        first_node = np.full(count, nodes, dtype=np.int64)
        np.minimum.at(first_node, component, np.arange(nodes))
        largest = np.flatnonzero(sizes == sizes.max())
        keep &= np.arange(count) == largest[np.argmin(first_node[largest])]
    drop_node = ~keep[component]
    for slab, labels, first, n in slabs:
        lookup = np.concatenate([[False], drop_node[first:first + n]])
        yield slab, lookup[labels]
