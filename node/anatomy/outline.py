"""Structures on the source grid, slab by slab, with their HU statistics.

Each coarse mask is split into a core (eroded by one voxel: certainly inside) and a band (the
voxels within one coarse voxel of its boundary). Core voxels are taken as they are; band voxels
are decided by a threshold half-way between the two tissues that meet there, which puts the
boundary where partial volume puts it. The coarse masks travel as bits of one code array, so a
slab needs one upsampling; the pass reads each source slice once, writes both label volumes in
place, and gathers HU histograms per structure on the way (exact mean and SD for integer HU).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.anatomy.bone import Skeleton
from node.anatomy.grid import PADDING_HU, Coarse, Slab, grow, shrink

HIST_RANGE = (-1024, 4095)  # HU outside are counted at the nearest end


@dataclass(frozen=True)
class Thresholds:
    body: float  # air | tissue
    lung: float  # aerated lung | soft tissue
    airway_in_lung: float  # lumen | lung parenchyma
    airway_in_wall: float  # lumen | airway wall
    marrow: float  # inside the skeleton


def core_and_band(mask: np.ndarray, edge_inside: bool = False,
                  solid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(core, band) of a coarse mask. ``edge_inside``: the volume's edge is no boundary (a body cut
    by the field of view); ``solid``: voxels taken whole although near the boundary (dense lung)."""
    core = shrink(mask, edge_inside=edge_inside)
    if solid is not None:
        core |= solid
    return core, grow(mask) & ~core


class Histograms:
    """Integer-HU histograms per label value."""

    def __init__(self, n_labels: int) -> None:
        self.lo, hi = HIST_RANGE
        self.bins = hi - self.lo + 1
        self.counts = np.zeros(n_labels * self.bins, np.int64)

    def add(self, labels: np.ndarray, hu: np.ndarray) -> None:
        values = hu if np.issubdtype(hu.dtype, np.integer) else np.rint(hu)
        key = labels.astype(np.int32) * self.bins
        key += np.clip(values, self.lo, self.lo + self.bins - 1).astype(np.int32, copy=False)
        key -= self.lo
        self.counts += np.bincount(key.ravel(), minlength=len(self.counts))

    def stats(self, labels: tuple[int, ...]) -> tuple[int, float, float]:
        """(voxels, mean HU, SD HU) of the union of ``labels``."""
        h = sum(self.counts[lab * self.bins:(lab + 1) * self.bins] for lab in labels)
        n = int(h.sum())
        if n == 0:
            return 0, float("nan"), float("nan")
        values = np.arange(self.lo, self.lo + self.bins, dtype=np.float64)
        mean = float(h @ values) / n
        return n, mean, float(np.sqrt(h @ (values - mean) ** 2 / n))


# Bits of the coarse code array.
_EXT_CORE, _EXT_BAND, _L_CORE, _L_BAND, _R_CORE, _R_BAND, _AW_CORE, _AW_BAND, _NEAR_LUNG, _BONE_NEAR, \
    _MARROW, _GAS = (1 << b for b in range(12))
BODY = 1  # label of body voxels that belong to no organ


def _code(coarse: Coarse, external: np.ndarray, lungs: tuple[np.ndarray, np.ndarray], airway: np.ndarray | None,
          skeleton: Skeleton | None, dense_lung_hu: float, walled_gas: np.ndarray | None) -> np.ndarray:
    code = np.zeros(coarse.hu.shape, np.uint16)

    def put(mask: np.ndarray, bit: int) -> None:
        code[mask] |= np.uint16(bit)

    # Neither the image's edge nor the reconstruction circle is a boundary of the body: what the
    # field cuts off is not decided by a threshold there (the padding itself never is body).
    beside_padding = grow(~coarse.field[None], 1, 1, 0)[0]
    for mask, bit in zip(core_and_band(external, edge_inside=True, solid=external & beside_padding),
                         (_EXT_CORE, _EXT_BAND)):
        put(mask, bit)
    for lung, bits in zip(lungs, ((_L_CORE, _L_BAND), (_R_CORE, _R_BAND))):
        for mask, bit in zip(core_and_band(lung, solid=lung & ((coarse.hu >= dense_lung_hu) | beside_padding)), bits):
            put(mask, bit)
    if airway is not None:
        for mask, bit in zip(core_and_band(airway), (_AW_CORE, _AW_BAND)):
            put(mask, bit)
    put(grow(lungs[0] | lungs[1]), _NEAR_LUNG)
    if walled_gas is not None:
        put(walled_gas, _GAS)
    if skeleton is not None:
        put(skeleton.near, _BONE_NEAR)
        put(skeleton.marrow, _MARROW)
    return code


def outline(array: np.ndarray, coarse: Coarse, external: np.ndarray, lungs: tuple[np.ndarray, np.ndarray],
            airway: np.ndarray | None, skeleton: Skeleton | None, labels: tuple[int, int, int, int],
            t: Thresholds, walled_gas: np.ndarray | None = None) -> tuple[np.ndarray, Histograms]:
    """(label volume, histograms) on the source grid: ``labels`` = (left lung, right lung, airway,
    bone) values, ``BODY`` where the body holds none of them, 0 outside the body. ``walled_gas``:
    coarse voxels of gas outside the lung (bowel gas at a lung base), whose air is never lung."""
    lung_l, lung_r, airway_label, bone_label = labels
    code = _code(coarse, external, lungs, airway, skeleton, t.lung, walled_gas)
    slab = Slab(coarse)
    fz = coarse.factors[0]
    out = np.zeros(array.shape, np.uint8)
    hist = Histograms(max(labels) + 1)
    for kc in range(coarse.hu.shape[0]):
        rows, cols = slab.extent(code[kc] != 0)  # nothing to decide outside the body's box
        if rows is None:
            continue
        k0, k1 = kc * fz, min((kc + 1) * fz, array.shape[0])
        hu = array[k0:k1, rows, cols]
        c = slab.up(code[kc])[rows, cols]
        has = lambda bit: (c & np.uint16(bit)) != 0  # noqa: E731 - one bit of the code, source rows/cols
        inside = (has(_EXT_CORE) | (has(_EXT_BAND) & (hu > t.body))) & (hu > PADDING_HU)
        org = out[k0:k1, rows, cols]  # a view: written in place
        aerated = hu < t.lung
        if walled_gas is not None:
            aerated &= ~(has(_GAS) & (hu < t.airway_in_lung))  # gas beside the lung base: lumen-dark air
        np.copyto(org, np.uint8(lung_r), where=has(_R_CORE) | (has(_R_BAND) & aerated))
        np.copyto(org, np.uint8(lung_l), where=has(_L_CORE) | (has(_L_BAND) & aerated))
        if airway is not None:
            limit = np.where(has(_NEAR_LUNG), np.float32(t.airway_in_lung), np.float32(t.airway_in_wall))
            np.copyto(org, np.uint8(airway_label), where=has(_AW_CORE) | (has(_AW_BAND) & (hu < limit)))
        if skeleton is not None:
            surface = slab.up(skeleton.surface_hu[kc])[rows, cols]
            bone = (has(_BONE_NEAR) & (hu >= surface)) | (has(_MARROW) & (hu >= t.marrow))
            np.copyto(org, np.uint8(bone_label), where=bone)
        np.copyto(org, np.uint8(0), where=~inside)
        np.copyto(org, np.uint8(BODY), where=inside & (org == 0))
        hist.add(org, hu)
    return out, hist
