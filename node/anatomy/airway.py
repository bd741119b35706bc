"""Trachea and main bronchi on the coarse grid.

The trachea is found as a round air column near the body's midline in the most cranial slices
that hold one. From its top cross-section, air is grown caudally (region growing with a
threshold between the lumen and the lung parenchyma) and a wavefront is marched through what
was grown: shells of equal geodesic distance are labelled, each shell component is attached to
the component it grew from, and the tree they form tells the generations apart. The trachea is
generation 0; the carina, its first real split, starts the main bronchi; their first real split
ends them. A split counts only when both branches go on for a while and are as wide as an
airway, so a wall irregularity or a trail of noise into the parenchyma is not a bifurcation, and
leaks beyond the main bronchi are cut off with the rest of the tree. A column of gas without a
carina (bowel gas near the midline) is not taken for a trachea.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from node.anatomy.grid import Coarse

LUMEN_HU = -900.0  # candidate trachea cross-sections are darker than this (block means)
TRACHEA_AREA_MM2 = (80.0, 1000.0)  # cross-section of an adult trachea: ~1.5-3.5 cm diameter
MIDLINE_MM = 30.0  # the trachea lies within this distance of the body's centre (x)
MIN_PERSIST_MM = 10.0  # a trachea candidate continues at least this far caudally
SHELL_MM = 2.0  # wavefront shell thickness
BRANCH_MM = 8.0  # a branch counts when it goes on at least this far
BRANCH_RADIUS_MM = 2.5  # ... with at least the volume of a tube this wide
KEEP_GENERATIONS = 1  # 0 = trachea, 1 = main bronchi
TRIM_MM = 4.0  # how far the wavefront runs past a branch point before it parts: about a branch radius
MAX_PATH_MM = 300.0  # trachea in a neck-to-abdomen scan plus main bronchi, with room to spare
MAX_CANDIDATES = 5  # trachea-like cross-sections tried, most cranial first


@dataclass(frozen=True)
class Airway:
    mask: np.ndarray  # trachea + main bronchi, coarse grid
    lumen_hu: float  # median HU of the trachea lumen (block means)


def _trachea_seeds(coarse: Coarse, external: np.ndarray, body_x: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(coarse slice index, 2-D mask) of trachea-like cross-sections, most cranial first."""
    z = coarse.slice_z()
    order = np.argsort(-z)  # head first, whatever the slice order
    sx, sy, sz = coarse.geometry.spacing
    pixel_mm2 = sx * sy
    persist = max(1, int(np.ceil(MIN_PERSIST_MM / sz)))
    dark = coarse.hu < LUMEN_HU
    for pos, k in enumerate(order[:len(order) - persist]):
        if not np.isfinite(body_x[k]):
            continue
        labels, n = ndimage.label(dark[k] & external[k])
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        area = ndimage.sum_labels(np.ones_like(labels), labels, idx) * pixel_mm2
        cx = np.asarray(ndimage.mean(coarse.x_plane(k), labels, idx))
        ok = (area >= TRACHEA_AREA_MM2[0]) & (area <= TRACHEA_AREA_MM2[1]) & (np.abs(cx - body_x[k]) <= MIDLINE_MM)
        for lab in idx[ok][np.argsort(area[ok])[::-1]]:
            seed = labels == lab
            # A real trachea goes on caudally, overlapping itself slice after slice.
            column = seed
            for nxt in order[pos + 1:pos + 1 + persist]:
                column = ndimage.binary_dilation(column) & dark[nxt]
                if not column.any():
                    break
            else:
                yield int(k), seed


_OFFSETS = np.array([(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                     if (dz, dy, dx) != (0, 0, 0)])


def _wavefront(mask: np.ndarray, seed: np.ndarray, max_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """BFS over 26-neighbours of ``mask`` (False on its border) from ``seed``.

    Returns flat (steps, predecessor): steps -1 where unreached; each reached voxel's predecessor
    is a neighbour one step nearer the seed, which ties every shell component to its parent.
    """
    strides = np.array([mask.shape[1] * mask.shape[2], mask.shape[2], 1])
    offsets = _OFFSETS @ strides
    inside = mask.ravel()
    steps = np.full(inside.size, -1, np.int32)
    pred = np.full(inside.size, -1, np.int64)
    front = np.flatnonzero(seed.ravel() & inside)
    steps[front] = 0
    step = 0
    while front.size and step < max_steps:
        step += 1
        cand = (front[:, None] + offsets[None, :]).ravel()
        src = np.repeat(front, len(offsets))
        ok = inside[cand] & (steps[cand] < 0)
        cand, first = np.unique(cand[ok], return_index=True)
        steps[cand] = step
        pred[cand] = src[ok][first]
        front = cand
    return steps, pred


def _keep_generations(shape: tuple, steps: np.ndarray, pred: np.ndarray, step_mm: float,
                      voxel_mm3: float) -> np.ndarray | None:
    """Flat mask of the wavefront tree's generations <= KEEP_GENERATIONS (see module docstring);
    None when the tree never splits (no carina)."""
    width = max(1, int(round(SHELL_MM / step_mm)))
    vox = np.flatnonzero(steps >= 0)
    shell = steps[vox] // width
    compact = np.full(steps.size, -1, np.int64)
    compact[vox] = np.arange(len(vox))
    # Components of each shell: edges join 26-neighbours of the same shell.
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    neighbour = compact[vox[:, None] + (_OFFSETS @ strides)[None, :]]
    same = neighbour >= 0
    same[same] = shell[neighbour[same]] == np.broadcast_to(shell[:, None], same.shape)[same]
    rows = np.broadcast_to(np.arange(len(vox))[:, None], same.shape)[same]
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, neighbour[same])), shape=(len(vox), len(vox)))
    n, comp = connected_components(graph, directed=False)
    # Number nodes shell by shell, so that every parent comes before its children.
    comp_shell = np.zeros(n, np.int64)
    comp_shell[comp] = shell
    order = np.argsort(comp_shell, kind="stable")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    node = rank[comp]
    depth = comp_shell[order]
    parent = np.full(n, -1, np.int64)
    entry = (steps[vox] == shell * width) & (shell > 0)  # their predecessors lie in the shell before
    parent[node[entry]] = node[compact[pred[vox[entry]]]]
    reach = depth.copy()  # deepest shell of each subtree
    volume = np.bincount(node, minlength=n) * voxel_mm3  # of each subtree
    for i in range(n - 1, 0, -1):
        if parent[i] >= 0:
            reach[parent[i]] = max(reach[parent[i]], reach[i])
            volume[parent[i]] += volume[i]
    # A branch goes on for BRANCH_MM and is as wide as an airway: a trail of noise is neither.
    real = ((reach - depth) >= max(1, int(np.ceil(BRANCH_MM / SHELL_MM)))) & \
        (volume >= np.pi * BRANCH_RADIUS_MM ** 2 * BRANCH_MM)
    has_parent = parent >= 0
    real_children = np.bincount(parent[has_parent & real], minlength=n)
    generation = np.zeros(n, np.int32)
    for i in range(n):
        if parent[i] >= 0:
            generation[i] = generation[parent[i]] + (1 if real_children[parent[i]] >= 2 else 0)
    if generation.max() == 0:
        return None
    kept = generation <= KEEP_GENERATIONS
    # The wavefront parts a little after the branch point: the last shells before a split that
    # ends the kept generations are already the start of the next airways.
    for i in np.nonzero((real_children >= 2) & (generation == KEEP_GENERATIONS))[0]:
        a = i
        for _ in range(int(round(TRIM_MM / SHELL_MM))):
            if a < 0 or generation[a] < KEEP_GENERATIONS:
                break
            kept[a] = False
            a = parent[a]
    keep = np.zeros(steps.size, bool)
    keep[vox] = kept[node]
    return keep


def _grow(coarse: Coarse, external: np.ndarray, k0: int, seed2d: np.ndarray, lung_hu: float) -> Airway | None:
    """Trachea and main bronchi grown from the cross-section ``seed2d`` on slice ``k0``."""
    lumen = float(np.median(coarse.hu[k0][seed2d]))
    threshold = lumen + 0.35 * (lung_hu - lumen)
    z = coarse.slice_z()
    # Only down from the seed: the larynx above it is not trachea.
    air = (coarse.hu < threshold) & external & (z <= z[k0] + 1e-6)[:, None, None]
    seed = np.zeros_like(air)
    seed[k0] = seed2d & air[k0]
    labels, _ = ndimage.label(air, structure=np.ones((3, 3, 3), bool))
    connected = np.isin(labels, np.unique(labels[seed]))
    connected &= labels > 0
    del labels
    box = ndimage.find_objects(connected.astype(np.uint8))[0]
    region = np.pad(connected[box], 1)
    start = np.pad(seed[box], 1)
    step_mm = float(min(coarse.geometry.spacing))
    steps, pred = _wavefront(region, start, int(MAX_PATH_MM / step_mm))
    kept = _keep_generations(region.shape, steps, pred, step_mm, coarse.voxel_ml * 1000.0)
    if kept is None:
        return None
    mask = np.zeros(coarse.hu.shape, bool)
    mask[box] = kept.reshape(region.shape)[1:-1, 1:-1, 1:-1]
    return Airway(mask, lumen)


def segment_airway(coarse: Coarse, external: np.ndarray, body_x: np.ndarray, lung_hu: float) -> Airway | None:
    """Trachea and main bronchi, or None when the volume shows no trachea with its carina."""
    for n, (k0, seed2d) in enumerate(_trachea_seeds(coarse, external, body_x)):
        if n == MAX_CANDIDATES:
            break
        airway = _grow(coarse, external, k0, seed2d, lung_hu)
        if airway is not None:
            return airway
    return None
