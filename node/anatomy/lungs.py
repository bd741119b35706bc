"""Left and right lung on the coarse grid.

Aerated lung is the low-density region inside the body once the trachea and main bronchi are
taken out; bowel gas is told apart by its attenuation (pure air, where lung parenchyma is
-950..-600 HU). Lungs that touch at the anterior or posterior junction form one component: it
is eroded in-plane until it falls into two cores, and a marker watershed on the image splits it
along the brightest line between them (the pleura of the junction). Sides are decided in patient
coordinates (patient left is +x in LPS), never by image columns; a region that will not part is
cut at the body's midline. Each lung then takes in what it encloses (vessels, nodules).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from node.anatomy.grid import Coarse, component_sizes, grow, shrink

LOW_HU = -400.0  # aerated lung is darker than this (block means)
GAS_MEDIAN_HU = -975.0  # a component whose median is darker is gas (bowel, air pockets), not lung
MIN_LUNG_ML = 15.0
MIN_LUNG_FRACTION = 0.02  # of the largest low-density component
MAIN_PIECE_FRACTION = 0.15  # a piece this big (of all lung) is a whole lung, not a fragment
MAX_SPLIT_EROSION = 8  # coarse voxels (~16 mm) of in-plane erosion tried to part touching lungs
THICK_MM = 8.0  # non-lung regions thicker than 2x this (liver dome, heart) are never holes of the lung


@dataclass(frozen=True)
class Lungs:
    left: np.ndarray  # coarse masks
    right: np.ndarray
    parenchyma_hu: float  # median HU of aerated lung (block means)


def parenchyma_hu(coarse: Coarse, external: np.ndarray) -> float:
    """Median HU of the low-density voxels inside the body (lungs dominate them in a chest CT)."""
    values = coarse.hu[external & (coarse.hu < LOW_HU) & (coarse.hu > GAS_MEDIAN_HU)]
    return float(np.median(values)) if values.size else -850.0


def _lung_components(coarse: Coarse, low: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(low)
    if n == 0:
        return np.zeros_like(low)
    sizes = component_sizes(labels, n)
    big = 1 + np.nonzero((sizes * coarse.voxel_ml >= MIN_LUNG_ML) & (sizes >= MIN_LUNG_FRACTION * sizes.max()))[0]
    keep = np.zeros(n + 1, bool)
    for lab in big:
        keep[lab] = np.median(coarse.hu[labels == lab]) > GAS_MEDIAN_HU
    return keep[labels]


def _split_touching(coarse: Coarse, piece: np.ndarray) -> list[np.ndarray]:
    """Two lungs joined at a junction → the two lungs (or [piece] when it will not part)."""
    box = ndimage.find_objects(piece.astype(np.uint8))[0]
    sub = piece[box]
    for r in range(1, MAX_SPLIT_EROSION + 1):
        cores, n = ndimage.label(shrink(sub, r, r, 0))
        if n < 2:
            continue
        sizes = component_sizes(cores, n)
        a, b = np.argsort(sizes)[::-1][:2] + 1
        if sizes[b - 1] < 0.1 * sizes.sum():
            continue
        markers = np.where(cores == a, 1, 0) + np.where(cores == b, 2, 0)
        image = sitk.GetImageFromArray(np.ascontiguousarray(coarse.hu[box]))
        marker_img = sitk.GetImageFromArray(markers.astype(np.uint8))
        split = sitk.GetArrayFromImage(
            sitk.MorphologicalWatershedFromMarkers(image, marker_img, markWatershedLine=False, fullyConnected=True))
        out = []
        for value in (1, 2):
            m = np.zeros_like(piece)
            m[box] = sub & (split == value)
            out.append(m)
        return out
    return [piece]


def _fill(coarse: Coarse, lung: np.ndarray) -> np.ndarray:
    """``lung`` with what it encloses: in 3-D (nodules), and slice by slice where the enclosed
    region is thin (vessels, bronchi), but not the diaphragm dome that a lung base rings in an
    axial slice."""
    if not lung.any():
        return lung
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in ndimage.find_objects(lung.astype(np.uint8))[0])
    sub = np.pad(lung[box], 1)  # the padding is outside: regions reaching it are not enclosed
    labels, n = ndimage.label(~sub)
    enclosed = np.ones(n + 1, bool)
    enclosed[0] = False
    enclosed[np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(),
                                       labels[:, :, [0, -1]].ravel()]))] = False
    sub |= enclosed[labels]
    rx, ry = coarse.radius(THICK_MM)
    rz = max(1, int(round(THICK_MM / coarse.geometry.spacing[2])))
    thick = grow(shrink(~sub, rx, ry, rz, edge_inside=True), rx, ry, rz)
    four = ndimage.generate_binary_structure(2, 1)
    for k in range(1, sub.shape[0] - 1):
        labels, n = ndimage.label(~sub[k], structure=four)
        hole = np.ones(n + 1, bool)
        hole[0] = False
        hole[labels[0, :]] = hole[labels[:, 0]] = hole[labels[-1, :]] = hole[labels[:, -1]] = False
        hole[labels[thick[k]]] = False
        sub[k] |= hole[labels]
    out = np.zeros_like(lung)
    out[box] = sub[1:-1, 1:-1, 1:-1]
    return out


def _centroid_x(coarse: Coarse, mask: np.ndarray) -> float:
    k, j, i = (np.mean(a) for a in np.nonzero(mask))
    return float(coarse.geometry.index_to_patient([k, j, i])[0])


def segment_lungs(coarse: Coarse, external: np.ndarray, airway: np.ndarray | None, midline_x: float) -> Lungs:
    """Left and right lung masks on the coarse grid (empty when the volume shows no lung)."""
    low = (coarse.hu < LOW_HU) & external
    if airway is not None:
        # The airway wall's partial-volume rim would bridge the two lungs through the mediastinum.
        low &= ~grow(airway)
    lungs = _lung_components(coarse, low)
    hu = float(np.median(coarse.hu[lungs])) if lungs.any() else -850.0
    labels, n = ndimage.label(lungs)
    pieces = [labels == i for i in range(1, n + 1)]
    del labels
    total = float(lungs.sum())
    main = [p for p in pieces if p.sum() >= MAIN_PIECE_FRACTION * total]
    rest = [p for p in pieces if p.sum() < MAIN_PIECE_FRACTION * total]
    if len(main) == 1:
        main = _split_touching(coarse, main[0])
    left = np.zeros_like(lungs)
    right = np.zeros_like(lungs)
    if len(main) >= 2:
        main.sort(key=lambda p: -int(p.sum()))
        xa, xb = _centroid_x(coarse, main[0]), _centroid_x(coarse, main[1])
        split_x = (xa + xb) / 2
        rest += main[2:]
        (left if xa > xb else right)[...] |= main[0]
        (left if xb > xa else right)[...] |= main[1]
    else:
        split_x = midline_x
        if main:  # one lung region that would not part: cut it at the body's midline
            x = np.stack([coarse.x_plane(k) for k in range(coarse.hu.shape[0])])
            left |= main[0] & (x > midline_x)
            right |= main[0] & (x <= midline_x)
    for p in rest:
        (left if _centroid_x(coarse, p) > split_x else right)[...] |= p
    return Lungs(_fill(coarse, left), _fill(coarse, right), hu)
