"""The patient's body outline (External) on the coarse grid.

Tissue is everything denser than ``TISSUE_HU``. The table, blankets, pads and cables are thin
in the axial plane, so an in-plane opening removes them; what survives and looks like a patient
(mostly fat and muscle) is kept, then regrown by one voxel to get the skin back. Air enclosed by
the body in an axial slice (lungs, airway, bowel gas) is filled. A body cut by the edge of a
small field of view leaves lungs open to that edge: an air region touching exactly one image
edge and no corner is enclosed by the body and the edge, so it is filled too, while the air
around the patient always reaches a corner or two edges. Where the scanner pads the pixels
outside its reconstruction circle, the circle is that edge, but the rule above does not carry
over: a body wider than the circle leaves the air in front of it touching one arc of it, like a
lung the circle cuts, and two lungs joined by the bronchi touch two arcs, like the air around
the patient. What tells them apart there is the air itself: a region reaching the circle whose
air voxels are pure air (median below ``OUTSIDE_AIR_HU``) is outside, lung parenchyma is not.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from node.anatomy.grid import Coarse, component_sizes, grow, shrink

TISSUE_HU = -500.0  # half-way between air and fat/soft tissue: the partial-volume boundary
OPENING_MM = 6.0  # removes objects thinner than about 12 mm in the axial plane (tables, blankets)
PATIENT_TISSUE_HU = (-200.0, 200.0)  # fat and muscle
PATIENT_SOFT_FRACTION = 0.5  # a patient part is mostly fat and muscle; tables and pads are not
PATIENT_MIN_FRACTION = 0.01  # separate parts (an arm) kept when at least 1 % of the largest
OUTSIDE_AIR_HU = -975.0  # air around the patient is darker than aerated lung, even emphysematous lung


def body_tissue(coarse: Coarse) -> np.ndarray:
    """Patient tissue (no table, no air) on the coarse grid."""
    tissue = coarse.hu > TISSUE_HU
    rx, ry = coarse.radius(OPENING_MM)
    # A square opening is as good as a disk at removing plates, and fast (see grid.grow).
    opened = grow(shrink(tissue, rx, ry, 0, edge_inside=True), rx, ry, 0)
    labels, n = ndimage.label(opened, structure=ndimage.generate_binary_structure(3, 1))
    if n == 0:
        return np.zeros_like(tissue)
    sizes = component_sizes(labels, n)
    lo, hi = PATIENT_TISSUE_HU
    soft_voxels = np.bincount(labels[(coarse.hu > lo) & (coarse.hu < hi)], minlength=n + 1)[1:]
    soft = soft_voxels / np.maximum(sizes, 1)
    largest = int(np.argmax(sizes))
    keep = (sizes >= PATIENT_MIN_FRACTION * sizes[largest]) & (soft >= PATIENT_SOFT_FRACTION)
    keep[largest] = True
    kept = np.zeros(n + 1, bool)
    kept[1:] = keep
    patient = kept[labels]
    del labels
    # Opening rounds off the skin; one voxel of regrowth within tissue restores it. A chest wall
    # thinner than the opening (a child, a slim patient, coarse pixels) is opened through too:
    # tissue within the patient's outline (its convex hull, slice by slice) is the patient's, while
    # a table or pad it lies on stays outside the hull but for where they touch.
    return tissue & (grow(patient, 1, 1, 0) | convex_hulls(patient))


def convex_hulls(mask: np.ndarray) -> np.ndarray:
    """The convex hull of ``mask`` in each axial slice (K, J, I).

    The hull of a slice is that of each row's first and last pixel (a few hundred points, not the
    whole mask), and a convex polygon covers one interval per row (see ``_inside_hull``)."""
    out = np.zeros_like(mask)
    for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
        plane = mask[k]
        rows = np.nonzero(plane.any(axis=1))[0]
        # The first and last pixel of each row: the hull of the slice's pixels is theirs (every
        # other pixel lies between two of them), from a few hundred points instead of every pixel.
        first = plane[rows].argmax(axis=1)
        last = plane.shape[1] - 1 - plane[rows, ::-1].argmax(axis=1)
        points = np.concatenate([np.stack([rows, first], axis=1), np.stack([rows, last], axis=1)]).astype(float)
        try:
            hull = ConvexHull(points)
        except QhullError:  # collinear: the mask itself is its hull
            out[k] = plane
            continue
        out[k] = _inside_hull(hull.equations, rows[0], rows[-1] + 1, int(first.min()), int(last.max()) + 1,
                              plane.shape)
    return out


def _inside_hull(equations: np.ndarray, j0: int, j1: int, i0: int, i1: int, shape: tuple[int, int]) -> np.ndarray:
    """Pixels (j, i) of the box [j0, j1) x [i0, i1) inside every facet's half-plane a j + b i + c <= 0
    (with a little slack for the pixels on the hull itself). A convex polygon holds one run of each
    row: its ends come from the facets row by row (rows x facets), not from testing every pixel of
    the box against every facet (pixels x facets), which was most of the body outline's time."""
    a, b, c = equations.T
    jj = np.arange(j0, j1, dtype=float)[:, None]
    room = 1e-6 - c - a * jj  # (rows, facets): b i <= room
    right, left, level = b > 0, b < 0, b == 0
    hi = np.min(room[:, right] / b[right], axis=1, initial=np.inf)
    lo = np.max(room[:, left] / b[left], axis=1, initial=-np.inf)
    lo[~np.all(room[:, level] >= 0, axis=1)] = np.inf  # a row outside a facet parallel to the rows
    ii = np.arange(i0, i1, dtype=float)[None, :]
    out = np.zeros(shape, dtype=bool)
    out[j0:j1, i0:i1] = (ii >= lo[:, None]) & (ii <= hi[:, None])
    return out


def _field_edge(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the reconstructed ``field``'s edge pixels: beside padding or the image edge."""
    padded = np.pad(field, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.nonzero(field & ~interior)


def _outside_by_edges(labels: np.ndarray, n: int) -> np.ndarray:
    """Per label, whether it reaches two image edges or a corner (the air around the patient)."""
    edges = np.zeros(n + 1, np.int8)
    for edge in (labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]):
        edges[np.unique(edge)] += 1
    outside = edges >= 2
    outside[[labels[0, 0], labels[0, -1], labels[-1, 0], labels[-1, -1]]] = True
    return outside


def _outside_by_air(labels: np.ndarray, n: int, hu: np.ndarray, edge: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Per label, whether it reaches the field's edge holding pure air (the air around the patient)."""
    outside = np.zeros(n + 1, bool)
    touching = np.unique(labels[edge])
    touching = touching[touching > 0]
    if touching.size:
        air = np.where(hu < TISSUE_HU, labels, 0)  # its air, not a table or pad it holds
        outside[touching] = np.asarray(ndimage.median(hu, air, touching)) < OUTSIDE_AIR_HU
    return outside


def fill_enclosed_air(body: np.ndarray, field: np.ndarray | None = None, hu: np.ndarray | None = None) -> np.ndarray:
    """``body`` plus the air it encloses in each axial slice (see the module docstring); ``field``:
    the reconstructed pixels (J, I), all when None; ``hu``: the image, needed where some are not."""
    circle = field is not None and not field.all()
    edge = _field_edge(field) if circle else None
    out = body.copy()
    four = ndimage.generate_binary_structure(2, 1)  # background 4-connected: diagonal gaps stay closed
    for k in range(body.shape[0]):
        labels, n = ndimage.label(~body[k] & field if circle else ~body[k], structure=four)
        if n == 0:
            continue
        outside = _outside_by_air(labels, n, hu[k], edge) if circle else _outside_by_edges(labels, n)
        outside[0] = True  # label 0 is the body itself (and what lies outside the field)
        out[k] |= ~outside[labels]
    return out


def trunk_x(coarse: Coarse, external: np.ndarray) -> np.ndarray:
    """Per coarse slice, the patient x of the centre of its largest body region (the trunk or
    neck, not an arm beside it); NaN where the slice holds no body."""
    out = np.full(external.shape[0], np.nan)
    for k in np.nonzero(external.any(axis=(1, 2)))[0]:
        labels, n = ndimage.label(external[k])
        largest = labels == 1 + int(np.argmax(component_sizes(labels, n)))
        out[k] = float(coarse.x_plane(k)[largest].mean())
    return out


def external(coarse: Coarse) -> np.ndarray:
    """The body outline on the coarse grid, with the air it encloses."""
    return fill_enclosed_air(body_tissue(coarse), coarse.field, coarse.hu)
