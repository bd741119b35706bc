"""Bone on the coarse grid: where the skeleton is, for the source-grid thresholds to outline it.

Bone is told from iodinated contrast (blood pools reach 200-500 HU) by its cortex: a dense
component counts as bone only when its densest part is cortical. On the source grid a voxel is
bone when it is marrow-dense inside the skeleton, or, near it, denser than half-way between the
local bone peak and soft tissue: that is where partial volume puts the surface, also of a thin
rib whose peak a thick slice or a coarse pixel has lowered.

Undiluted contrast (an arm injection: subclavian vein, SVC; 600-3000 HU) is as dense as cortex,
so density alone cannot tell it from bone; its shape can. Dense bone is a shell a few millimetres
thick around marrow, and contrast fills a vessel's lumen: a region dense through and through,
wider than ``SOLID_MM`` across and of at least ``SOLID_ML``, is contrast, and it and its
partial-volume rim are kept out of the skeleton. A bone dense through and through (a sclerotic
vertebra, a bone island over a centimetre wide) would be taken for contrast too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.anatomy.grid import SOFT_TISSUE_HU, Coarse, grow, local_max, shrink

CANDIDATE_HU = 200.0  # block means of bone (cortex + marrow) exceed this
CORTICAL_PEAK_HU = 550.0  # a bone component holds cortex at least this dense; contrast blood does not
MIN_BONE_ML = 0.05
CORTEX_HU = 400.0  # surface threshold of thick cortex: half-way between cortex (~800) and soft tissue
SURFACE_FLOOR_HU = 200.0  # the surface threshold never drops below this (contrast blood stays out)
MARROW_HU = 150.0  # source-grid threshold inside the skeleton (cancellous bone)
SOLID_MM = 3.0  # in-plane opening radius: dense regions wider than ~2x this across are not a cortex
SOLID_ML = 1.0  # ... and bigger than this (where cortices meet, small solid spots occur)


@dataclass(frozen=True)
class Skeleton:
    marrow: np.ndarray  # coarse voxels inside the skeleton, off its surface
    near: np.ndarray  # coarse voxels within one voxel of the skeleton
    surface_hu: np.ndarray  # per coarse voxel, the source-grid surface threshold (float32)
    mask: np.ndarray  # coarse voxels of the skeleton


def dense_contrast(coarse: Coarse, candidate: np.ndarray) -> np.ndarray:
    """Coarse voxels of vessels full of dense contrast, with their rim (see the module docstring)."""
    dense = (coarse.hu >= CORTICAL_PEAK_HU) & candidate
    rx, ry = coarse.radius(SOLID_MM)
    solid = grow(shrink(dense, rx, ry, 0), rx, ry, 0) & dense
    labels, n = ndimage.label(solid)
    if n == 0:
        return solid
    big = np.zeros(n + 1, bool)
    big[1:] = np.bincount(labels.ravel(), minlength=n + 1)[1:] * coarse.voxel_ml >= SOLID_ML
    return grow(big[labels]) & candidate


def segment_bone(coarse: Coarse, external: np.ndarray) -> Skeleton:
    """The skeleton on the coarse grid (empty masks when there is none)."""
    candidate = (coarse.hu >= CANDIDATE_HU) & external
    candidate &= ~dense_contrast(coarse, candidate)
    labels, n = ndimage.label(candidate, structure=np.ones((3, 3, 3), bool))
    cortical = np.bincount(labels[coarse.peak >= CORTICAL_PEAK_HU], minlength=n + 1)
    size = np.bincount(labels.ravel(), minlength=n + 1) * coarse.voxel_ml
    keep = (cortical > 0) & (size >= MIN_BONE_ML)
    keep[0] = False
    skeleton = keep[labels]
    surface = np.clip((local_max(coarse.peak) + SOFT_TISSUE_HU) / 2, SURFACE_FLOOR_HU, CORTEX_HU)
    return Skeleton(shrink(skeleton, 1, 1, 0), grow(skeleton), surface.astype(np.float32), skeleton)
