"""Left and right lung on the coarse grid.

Aerated lung is the low-density region inside the body once the trachea and main bronchi are
taken out; bowel gas is told apart by its attenuation (pure air, where lung parenchyma is
-950..-600 HU). Lungs that touch at the anterior or posterior junction form one component: it
is eroded in-plane until it falls into two cores, and a marker watershed on the image splits it
along the brightest line between them (the pleura of the junction). Sides are decided in patient
coordinates (patient left is +x in LPS), never by image columns; a region that will not part is
cut at the body's midline. Each lung then takes in what it encloses (vessels, nodules).

Dense lung (consolidation: soft-tissue HU, no edge against the heart, the mediastinum or the
organs under the diaphragm) is recovered from two shape priors, never from its density alone.
Along the body, from the head down, a lung's footprint in one slice carries to the next: dense
tissue where the lung was one slice higher is lung again when it forms a region, not a thin
sliver, that reaches the chest wall (within ``CHEST_WALL_MM`` of the skeleton) and lies above the
lung base. The heart's or the liver's top, ringed by aerated lung, never reaches the chest wall.
The lung base is a smooth dome: a quadratic surface z = f(x, y) fitted, as a low quantile, to
where aerated lung rests on tissue; consolidation hides only the base beneath it, so the points
it lifts lie above the surface and the quantile fit passes under them.

Pleural effusion is left out of the lung, as the TG-263 lung organ at risk requires: free fluid
layers along the posterior chest wall and the lung surface meets it at a shallow angle, so from
one slice to the next the footprint carries only onto a sliver of it, never a region. This holds
while the fluid thickens by less than about ``2 * SLIVER_MM`` per slice; fluid under a lung base
that lies flatter than that (subpulmonic effusion on thick slices) would be taken as dense lung.
An effusion and a consolidation of the same density cannot be told apart where they meet.

Bowel gas against a lung base (the splenic flexure under a diaphragm thinner than a voxel) joins
the lung in the low-density mask. Pure-air pockets are judged by what surrounds them, two voxels
out: lung around a bulla or a bronchus, tissue around gas in the bowel, which touches the lung
along one side only. Walled pockets and their rim are taken out, and their air is never lung on
the source grid either. A pneumothorax walled mostly by the chest wall is left out the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.optimize import linprog

from node.anatomy.grid import Coarse, component_sizes, grow, shrink
from node.anatomy.junction import min_cut

LOW_HU = -400.0  # aerated lung is darker than this (block means)
GAS_MEDIAN_HU = -975.0  # a component whose median is darker is gas (bowel, air pockets), not lung
MIN_LUNG_ML = 15.0
MIN_LUNG_FRACTION = 0.02  # of the largest low-density component
MAIN_PIECE_FRACTION = 0.15  # a piece this big (of all lung) is a whole lung, not a fragment
MAX_SPLIT_EROSION = 8  # coarse voxels (~16 mm) of in-plane erosion tried to part touching lungs
CORE_SIDE_FRACTION = 0.9  # an eroded core is one lung's when this much of it lies on one side of the midline
JUNCTION_MARGIN_MM = 10.0  # marker voxels lie at least this far off the midline
SURELY_SIDE_MM = 30.0  # lung this far off the midline marks its side (junction lines lie nearer)
JUNCTION_BIAS_MM = 30.0  # a cut this far off the midline costs twice as much per voxel as one on it
PLEURA_HU = -200.0  # a cut through voxels this bright (the junction's pleura) costs least
FOUR = ndimage.generate_binary_structure(2, 1)
THICK_MM = 8.0  # non-lung regions thicker than 2x this (liver dome, heart) are never holes of the lung
DENSE_HU = (LOW_HU, 200.0)  # consolidated lung: non-aerated, below bone and dense contrast
CHEST_WALL_MM = 10.0  # a pleural surface lies this close to a rib or the spine
SLIVER_MM = 3.0  # carried regions thinner than about twice this are edge effects, not consolidation
BASE_QUANTILE = 0.15  # of the lung-base points the dome runs under (lifted points lie above it)
MIN_BASE_POINTS = 30  # columns where a lung rests on tissue: fewer and no dome is fitted
MAX_BASE_POINTS = 800  # per side: a strided subset is fitted beyond this (the programme grows fast)
GAS_POCKET_ML = 2.0  # pure-air regions this big inside the low-density mask are judged by their surroundings
GAS_LUNG_FRACTION = 0.5  # ... and are gas outside the lung when less of their surroundings is lung


@dataclass(frozen=True)
class Lungs:
    left: np.ndarray  # coarse masks
    right: np.ndarray
    parenchyma_hu: float  # median HU of aerated lung (block means)
    walled_gas: np.ndarray  # coarse voxels of gas pockets judged outside the lung, with their rim


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


def _walled_gas(coarse: Coarse, low: np.ndarray) -> np.ndarray:
    """The pure-air pockets of ``low`` that tissue, not lung, surrounds, with their rim.

    Bowel gas under a hemidiaphragm thinner than a voxel joins the lung base in the low-density
    mask. It is pure air, as is a bulla or a bronchus, but the lung surrounds those; a gas pocket
    is walled by tissue (bowel wall, abdominal organs) and touches the lung only along one side.
    The surroundings are read two voxels out, beyond the partial volume of the pocket's own edge.
    """
    gas = low & (coarse.hu < GAS_MEDIAN_HU)
    labels, n = ndimage.label(gas)
    walled = np.zeros_like(low)
    if n == 0:
        return walled
    sizes = component_sizes(labels, n)
    parenchyma = low & ~gas
    for lab, box in enumerate(ndimage.find_objects(labels), start=1):
        if sizes[lab - 1] * coarse.voxel_ml < GAS_POCKET_ML:
            continue
        box = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in box)
        pocket = labels[box] == lab
        near = grow(pocket)
        ring = grow(near) & ~near
        if parenchyma[box][ring].mean() < GAS_LUNG_FRACTION:
            walled[box] |= near
    return walled


def _split_touching(coarse: Coarse, piece: np.ndarray, midline_x: float) -> list[np.ndarray]:
    """Two lungs joined at a junction → [left, right] (or [piece] when it will not part).

    Markers: the piece eroded in-plane until it falls into two cores that lie on either side of
    the body's midline (a core that spans both sides, e.g. the lungs joined above the heart and
    parted below it, is not a lung). Without such cores, the piece's eroded voxels are. Only
    marker voxels well off the midline count. In each slice a region holding markers of both
    sides is parted by a minimal cut between them (``junction.min_cut``): the junction line,
    never by which blob is larger; a region with one side's markers is that side's, one without
    any goes by its centroid.
    """
    box = ndimage.find_objects(piece.astype(np.uint8))[0]
    sub = piece[box]
    x = np.stack([coarse.x_plane(k) for k in range(box[0].start, box[0].stop)])[:, box[1], box[2]]
    markers = None
    for r in range(1, MAX_SPLIT_EROSION + 1):
        cores, n = ndimage.label(shrink(sub, r, r, 0))
        if n < 2:
            continue
        sizes = component_sizes(cores, n)
        a, b = np.argsort(sizes)[::-1][:2] + 1
        if sizes[b - 1] < 0.1 * sizes.sum():
            continue
        side_a, side_b = (np.mean(x[cores == c] > midline_x) for c in (a, b))
        if min(max(side_a, side_b), 1 - min(side_a, side_b)) < CORE_SIDE_FRACTION:
            continue  # not one core per side
        left, right = (a, b) if side_a > side_b else (b, a)
        markers = (cores == left, cores == right)
        break
    if markers is None:
        inner = shrink(sub, 1, 1, 0)
        markers = (inner, inner)
    # Only well off the midline: where the lungs meet, the flood from each side runs at the same
    # pace through a junction without a neck, so the cut falls half-way between the markers.
    markers = np.where((markers[0] | (sub & (x > midline_x + SURELY_SIDE_MM))) & (x > midline_x + JUNCTION_MARGIN_MM),
                       1, 0) \
        + np.where((markers[1] | (sub & (x < midline_x - SURELY_SIDE_MM))) & (x < midline_x - JUNCTION_MARGIN_MM), 2, 0)
    if not (markers == 1).any() or not (markers == 2).any():
        return [piece]
    lung_hu = float(np.median(coarse.hu[box][sub]))
    left = np.zeros_like(sub)
    for k in range(sub.shape[0]):
        regions, n = ndimage.label(sub[k], structure=FOUR)
        for lab in range(1, n + 1):
            region = regions == lab
            a, b = (markers[k] == 1) & region, (markers[k] == 2) & region
            if a.any() and b.any():
                bias = 1.0 + np.abs(x[k] - midline_x) / JUNCTION_BIAS_MM
                left[k] |= min_cut(region, coarse.hu[box][k], a, b, lung_hu, PLEURA_HU, bias)
            elif a.any() or (not b.any() and x[k][region].mean() > midline_x):
                left[k] |= region
    out = []
    for part in (sub & left, sub & ~left):
        m = np.zeros_like(piece)
        m[box] = part
        out.append(m)
    return out


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


def _base_points(coarse: Coarse, lung: np.ndarray, external: np.ndarray) -> np.ndarray:
    """(n, 3) patient points where ``lung`` ends caudally on tissue inside the body (its base),
    one per in-plane column; the surface lies half-way between the two slices."""
    z = coarse.slice_z()
    up = np.argsort(z)  # caudal first
    columns = lung.any(axis=0)
    first = np.argmax(lung[up], axis=0)  # the lowest lung slice of each column, as a position in ``up``
    j, i = np.nonzero(columns & (first > 0))  # a lung in the scan's last slice may go on below it
    pos = first[j, i]
    k, below = up[pos], up[pos - 1]
    rests = external[below, j, i] & (coarse.hu[below, j, i] >= LOW_HU)
    k, below, j, i = k[rests], below[rests], j[rests], i[rests]
    points = coarse.geometry.index_to_patient(np.stack([k, j, i], axis=1).astype(float))
    points[:, 2] = (z[k] + z[below]) / 2
    return points


class LungBase:
    """The lung bases as smooth domes, z = f(x, y) in patient mm, one per side.

    Both hemidiaphragms share their shape front to back (the y terms) and the curvature across;
    each side has its own height and tilt across (x is mirrored about the midline). A lung whose
    base dense lung hides then takes the front-to-back shape from the other one.
    """

    def __init__(self, coefficients: np.ndarray, midline_x: float) -> None:
        self.c = coefficients
        self.midline_x = midline_x

    @staticmethod
    def terms(side: int, x: np.ndarray, y: np.ndarray, midline_x: float) -> np.ndarray:
        """Design columns (a_left, a_right, b_left, b_right, u^2, v, v^2, uv) for ``side`` (+1 left, -1 right)."""
        u, v = side * (x - midline_x) / 100.0, y / 100.0  # decimetres: a well-conditioned programme
        zero, one = np.zeros_like(u), np.ones_like(u)
        left = side > 0
        return np.stack([one if left else zero, zero if left else one, u if left else zero, zero if left else u,
                         u * u, v, v * v, u * v], axis=-1)

    def height(self, side: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.terms(side, x, y, self.midline_x) @ self.c

    @classmethod
    def fit(cls, points: dict[int, np.ndarray], midline_x: float) -> "LungBase | None":
        """Quantile regression (a linear programme) under all but BASE_QUANTILE of the base points of
        each side, the domes concave; None with too few points."""
        rows, z = [], []
        for side, p in points.items():
            p = p[::max(1, len(p) // MAX_BASE_POINTS)]
            rows.append(cls.terms(side, p[:, 0], p[:, 1], midline_x))
            z.append(p[:, 2])
        if sum(len(v) for v in z) < MIN_BASE_POINTS:
            return None
        design, z = np.concatenate(rows), np.concatenate(z)
        used = np.abs(design).sum(axis=0) > 0  # a side without points has no height of its own
        design = design[:, used]
        n, m = design.shape
        eye = sparse.identity(n, format="csr")
        a_eq = sparse.hstack([sparse.csr_matrix(design), eye, -eye], format="csr")
        cost = np.concatenate([np.zeros(m), np.full(n, BASE_QUANTILE), np.full(n, 1 - BASE_QUANTILE)])
        concave = {4: (None, 0.0), 6: (None, 0.0)}  # the u^2 and v^2 terms
        bounds = [concave.get(c, (None, None)) for c in np.nonzero(used)[0]] + [(0, None)] * (2 * n)
        result = linprog(cost, A_eq=a_eq, b_eq=z, bounds=bounds, method="highs")
        if not result.success:
            return None
        c = np.zeros(len(used))
        c[used] = result.x[:m]
        return cls(c, midline_x)


def _recover_dense(coarse: Coarse, aerated: np.ndarray, external: np.ndarray, chest_wall: np.ndarray,
                   base: LungBase, side: int) -> np.ndarray:
    """``aerated`` plus the dense lung the footprint carries to (see the module docstring)."""
    if not aerated.any():
        return aerated
    lo, hi = DENSE_HU
    rx, ry = coarse.radius(SLIVER_MM)
    z = coarse.slice_z()
    out = aerated.copy()
    above = None
    for k in np.argsort(-z):  # head first
        if above is not None:
            carried = above & ~aerated[k] & external[k] & (coarse.hu[k] >= lo) & (coarse.hu[k] < hi)
            if carried.any():
                x, y = coarse.patient_plane(k, 0), coarse.patient_plane(k, 1)
                carried &= base.height(side, x, y) < coarse.patient_plane(k, 2)
                carried = grow(shrink(carried[None], rx, ry, 0), rx, ry, 0)[0] & carried
                labels, n = ndimage.label(carried)
                if n:
                    at_wall = np.zeros(n + 1, bool)
                    at_wall[labels[carried & chest_wall[k]]] = True
                    at_wall[0] = False
                    out[k] |= at_wall[labels]
        above = out[k]
    return out


def _centroid_x(coarse: Coarse, mask: np.ndarray) -> float:
    k, j, i = (np.mean(a) for a in np.nonzero(mask))
    return float(coarse.geometry.index_to_patient([k, j, i])[0])


def segment_lungs(coarse: Coarse, external: np.ndarray, airway: np.ndarray | None, midline_x: float,
                  skeleton: np.ndarray) -> Lungs:
    """Left and right lung masks on the coarse grid (empty when the volume shows no lung);
    ``skeleton``: the coarse bone mask, where the chest wall is."""
    low = (coarse.hu < LOW_HU) & external
    if airway is not None:
        # The airway wall's partial-volume rim would bridge the two lungs through the mediastinum.
        low &= ~grow(airway)
    walled_gas = _walled_gas(coarse, low)
    lungs = _lung_components(coarse, low & ~walled_gas)
    hu = float(np.median(coarse.hu[lungs])) if lungs.any() else -850.0
    labels, n = ndimage.label(lungs)
    pieces = [labels == i for i in range(1, n + 1)]
    del labels
    total = float(lungs.sum())
    main = [p for p in pieces if p.sum() >= MAIN_PIECE_FRACTION * total]
    rest = [p for p in pieces if p.sum() < MAIN_PIECE_FRACTION * total]
    left = np.zeros_like(lungs)
    right = np.zeros_like(lungs)
    if len(main) == 1:
        parts = _split_touching(coarse, main[0], midline_x)
        if len(parts) == 2:  # [left, right], sides already decided
            left |= parts[0]
            right |= parts[1]
            main = []
    if not left.any() and len(main) >= 2:
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
    rx, ry = coarse.radius(CHEST_WALL_MM)
    chest_wall = grow(skeleton, rx, ry, 0)
    base = LungBase.fit({side: _base_points(coarse, m, external) for side, m in ((1, left), (-1, right)) if m.any()},
                        midline_x)
    if base is not None:  # without a lung base in view nothing bounds dense lung from below
        left = _recover_dense(coarse, left, external, chest_wall, base, 1)
        right = _recover_dense(coarse, right & ~left, external, chest_wall, base, -1)
    return Lungs(_fill(coarse, left), _fill(coarse, right & ~left), hu, walled_gas)
