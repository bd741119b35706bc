"""Classical CT anatomy: body outline, lungs, airway and skeleton (the ``ct-anatomy`` handler).

``segment_anatomy`` runs the pieces in order: the working grid (``grid``), the body
(``body``), the trachea and main bronchi (``airway``), the lungs (``lungs``) and the bone
(``bone``) on it, then their outlines on the source grid (``outline``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from node.anatomy.airway import segment_airway
from node.anatomy.body import TISSUE_HU, external, trunk_x
from node.anatomy.bone import MARROW_HU, segment_bone
from node.anatomy.grid import SOFT_TISSUE_HU, coarsen
from node.anatomy.lungs import parenchyma_hu, segment_lungs
from node.anatomy.outline import BODY, Thresholds, outline
from node.volume import Volume

__all__ = ["EXTERNAL", "LUNG_L", "LUNG_R", "AIRWAY", "BONE", "Anatomy", "segment_anatomy", "body_outline"]

EXTERNAL = BODY  # body voxels of no other structure; the External is every labelled voxel
LUNG_L, LUNG_R, AIRWAY, BONE = 2, 3, 4, 5


@dataclass(frozen=True)
class StructureStats:
    voxels: int
    volume_ml: float
    hu_mean: float
    hu_sd: float


@dataclass(eq=False)
class Anatomy:
    """The label volume on the source grid and the statistics of each structure, keyed by label.

    ``labels`` is exclusive: LUNG_L, LUNG_R, AIRWAY, BONE, and EXTERNAL for the rest of the body;
    the body outline is ``labels > 0``, and ``stats[EXTERNAL]`` is about all of it.
    """

    labels: np.ndarray  # uint8
    stats: dict[int, StructureStats] = field(default_factory=dict)


def segment_anatomy(volume: Volume, working_mm: float = 2.0, airway: bool = True, bone: bool = True) -> Anatomy:
    """Segment ``volume`` (a CT in HU). Structures the volume does not show come back empty."""
    array, geometry = volume.array, volume.geometry
    coarse = coarsen(array, geometry, working_mm)
    ext = external(coarse)
    body_x = trunk_x(coarse, ext)
    midline_x = float(np.nanmedian(body_x)) if np.isfinite(body_x).any() else 0.0
    lung_hu = parenchyma_hu(coarse, ext)
    way = segment_airway(coarse, ext, body_x, lung_hu) if airway else None
    skeleton = segment_bone(coarse, ext)  # the lungs need the chest wall even when bone is not asked for
    lungs = segment_lungs(coarse, ext, way.mask if way else None, midline_x, skeleton.mask)
    skeleton = skeleton if bone else None
    lumen = way.lumen_hu if way else -1000.0
    t = Thresholds(
        body=TISSUE_HU,
        lung=(lungs.parenchyma_hu + SOFT_TISSUE_HU) / 2,
        airway_in_lung=(lumen + lungs.parenchyma_hu) / 2,
        airway_in_wall=(lumen + SOFT_TISSUE_HU) / 2,
        marrow=MARROW_HU,
    )
    labels, hist = outline(array, coarse, ext, (lungs.left, lungs.right), way.mask if way else None, skeleton,
                           (LUNG_L, LUNG_R, AIRWAY, BONE), t, lungs.walled_gas)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0

    def stats(of: tuple[int, ...]) -> StructureStats:
        n, mean, sd = hist.stats(of)
        return StructureStats(n, n * voxel_ml, mean, sd)

    result = {EXTERNAL: stats((BODY, LUNG_L, LUNG_R, AIRWAY, BONE))}
    for label in (LUNG_L, LUNG_R, AIRWAY, BONE):
        result[label] = stats((label,))
    return Anatomy(labels, result)


def body_outline(volume: Volume, working_mm: float = 2.0) -> np.ndarray:
    """The External alone (``segment_anatomy(volume).labels > 0``, voxel for voxel) without finding
    the lungs, airway and bone first: none of them moves the body's outline, and they are most of
    the work. Registration masks use it."""
    coarse = coarsen(volume.array, volume.geometry, working_mm)
    ext = external(coarse)
    none = np.zeros_like(ext)
    thresholds = Thresholds(body=TISSUE_HU, lung=0.0, airway_in_lung=0.0, airway_in_wall=0.0, marrow=MARROW_HU)
    labels, _ = outline(volume.array, coarse, ext, (none, none), None, None, (LUNG_L, LUNG_R, AIRWAY, BONE),
                        thresholds)
    return labels > 0
