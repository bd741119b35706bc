"""Slab projections and MPR: objects land where the patient geometry says, for any acquisition."""
from __future__ import annotations

import math

import numpy as np
import pytest

from node.render.aligned import align_to_patient_axes, is_patient_aligned
from node.render.orientation import PLANES, direction_label, edge_labels
from node.render.phantom import CHEST, centred_geometry, chest_phantom, sample_phantom, sphere_phantom
from node.render.projections import plane_view_array, slab_stack, to_square_pixels
from node.volume import Geometry, Volume

SPHERE = np.array([23.0, -17.0, 11.0])  # off-centre along every axis, so any flip shows
CENTRE = (5.0, -3.0, 2.0)


def _rot(axis: str, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]), "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


_OBLIQUE = _rot("z", 25) @ _rot("x", 10)
# (row direction, column direction, slice normal or None for row x col)
ACQUISITIONS = {
    "axial head-first": ((1, 0, 0), (0, 1, 0), None),
    "axial feet-first": ((-1, 0, 0), (0, 1, 0), None),  # FFS: IOP [-1,0,0,0,1,0], normal (0,0,-1)
    "slices reversed": ((1, 0, 0), (0, 1, 0), (0, 0, -1)),  # left-handed grid, normal (0,0,-1)
    "sagittal": ((0, 1, 0), (0, 0, -1), None),
    "coronal": ((1, 0, 0), (0, 0, -1), None),
    "oblique": (tuple(_OBLIQUE[:, 0]), tuple(_OBLIQUE[:, 1]), None),
}


def sphere_volume(acq: str, shape=(36, 60, 72), spacing=(1.25, 1.5, 2.5)) -> Volume:
    row, col, normal = ACQUISITIONS[acq]
    g = centred_geometry(shape, spacing, row, col, normal, CENTRE)
    return sample_phantom(g, sphere_phantom(SPHERE, 9.0))


def patient_bounds(g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """LPS min/max over the voxel centres of the grid's 8 corners (independent of the code under test)."""
    nk, nj, ni = g.shape
    corners = [g.index_to_patient((k, j, i)) for k in (0, nk - 1) for j in (0, nj - 1) for i in (0, ni - 1)]
    return np.min(corners, axis=0), np.max(corners, axis=0)


def bright_centroid(image: np.ndarray, threshold: float) -> tuple[float, float]:
    rr, cc = np.nonzero(image > threshold)
    assert len(rr), "object not visible"
    return float(rr.mean()), float(cc.mean())


def test_direction_labels_follow_lps():
    assert [direction_label(v) for v in np.eye(3)] == ["L", "P", "H"]
    assert [direction_label(-v) for v in np.eye(3)] == ["R", "A", "F"]
    assert direction_label((0.8, 0.6, 0.0)) == "LP"
    assert direction_label((-0.2, 0.0, 1.0)) == "H"  # 11 degrees off: no second letter
    with pytest.raises(ValueError, match="non-zero"):
        direction_label((0, 0, 0))


def test_radiological_convention_labels():
    # Axial: patient right on image left, anterior on top; coronal: head on top, right on left;
    # sagittal: head on top, anterior on image left.
    def labels(plane):
        return edge_labels(PLANES[plane].right, PLANES[plane].down)

    assert labels("axial") == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert labels("coronal") == {"left": "R", "right": "L", "top": "H", "bottom": "F"}
    assert labels("sagittal") == {"left": "A", "right": "P", "top": "H", "bottom": "F"}


@pytest.mark.parametrize("acq", list(ACQUISITIONS))
def test_alignment_preserves_patient_positions(acq):
    vol = sphere_volume(acq)
    aligned = align_to_patient_axes(vol)
    assert is_patient_aligned(aligned.geometry)
    # The voxel nearest the sphere centre is inside the sphere and far voxels are not.
    k, j, i = np.round(aligned.geometry.patient_to_index(SPHERE)).astype(int)
    assert aligned.array[k, j, i] == 1000
    lo, hi = patient_bounds(vol.geometry)
    if acq != "oblique":  # exact transpose/flip: same voxels, same extent
        assert sorted(aligned.array.shape) == sorted(vol.array.shape)
        assert np.count_nonzero(aligned.array) == np.count_nonzero(vol.array)
        np.testing.assert_allclose(aligned.geometry.origin, lo, atol=1e-6)
        far = aligned.geometry.index_to_patient(np.asarray(aligned.array.shape) - 1)
        np.testing.assert_allclose(far, hi, atol=1e-6)
    else:
        np.testing.assert_allclose(aligned.geometry.origin, lo, atol=1e-6)
        # Sphere volume survives linear resampling within a few percent.
        v_true = 4 / 3 * math.pi * 9.0**3
        v_orig = np.count_nonzero(vol.array > 500) * np.prod(vol.geometry.spacing)
        v_new = np.count_nonzero(aligned.array > 500) * np.prod(aligned.geometry.spacing)
        assert abs(v_orig - v_true) / v_true < 0.1 and abs(v_new - v_true) / v_true < 0.1


@pytest.mark.parametrize("acq", list(ACQUISITIONS))
def test_sphere_lands_at_expected_pixel_in_all_mips(acq):
    vol = sphere_volume(acq)
    aligned = align_to_patient_axes(vol)
    lo, hi = patient_bounds(aligned.geometry)
    x0, y0, z0 = SPHERE
    # Expected (row, col) in mm from the top-left pixel, per the display convention:
    # axial rows run A->P (+y), cols R->L (+x); coronal rows H->F, cols R->L; sagittal rows H->F, cols A->P.
    expected_mm = {
        "axial": (y0 - lo[1], x0 - lo[0]),
        "coronal": (hi[2] - z0, x0 - lo[0]),
        "sagittal": (hi[2] - z0, y0 - lo[1]),
    }
    stack_coord = {"axial": z0, "coronal": y0, "sagittal": x0}
    for plane, (er, ec) in expected_mm.items():
        stack = to_square_pixels(slab_stack(aligned, plane, "max", 20.0))
        ps = stack.pixel_spacing_mm[0]
        assert stack.pixel_spacing_mm[0] == stack.pixel_spacing_mm[1]
        # Slabs reach the sphere exactly where their reported positions say they do.
        gap = np.abs(stack.positions_mm - stack_coord[plane]) - stack.thickness_mm / 2
        peaks = stack.images.reshape(len(stack.images), -1).max(axis=1)
        assert np.all(peaks[gap > 9.0 + 1.5] == 0) and np.all(peaks[gap < 9.0 - 1.5] > 500)
        best = int(np.argmin(np.abs(stack.positions_mm - stack_coord[plane])))
        r, c = bright_centroid(stack.images[best], 500)
        assert abs(r - er / ps) < 0.75 and abs(c - ec / ps) < 0.75, (plane, (r, c), (er / ps, ec / ps))
        # top_left_mm: the LPS point of pixel (0, 0) of image 0
        expected_tl = {
            "axial": (lo[0], lo[1], stack.positions_mm[0]),
            "coronal": (lo[0], stack.positions_mm[0], hi[2]),
            "sagittal": (stack.positions_mm[0], lo[1], hi[2]),
        }[plane]
        np.testing.assert_allclose(stack.top_left_mm, expected_tl, atol=1e-6)


def test_stacks_order_and_cover_the_volume():
    g = centred_geometry((30, 40, 50), (1.0, 1.0, 2.0), (1, 0, 0), (0, 1, 0))
    vol = Volume(np.zeros(g.shape, np.int16), g)
    aligned = align_to_patient_axes(vol)
    ax = slab_stack(aligned, "axial", "max", 10.0)
    # 60 mm of slices (30 x 2 mm) in 10 mm slabs: 6 contiguous slabs from head to feet.
    assert len(ax.images) == 6 and ax.thickness_mm == 10.0
    assert np.all(np.diff(ax.positions_mm) < 0)
    np.testing.assert_allclose(-np.diff(ax.positions_mm), 10.0)
    # 50 columns of 1 mm in 7 mm slabs: 7 slabs plus one aligned to the end covers the rest.
    sag = slab_stack(aligned, "sagittal", "mean", 7.0)
    assert len(sag.images) == 8 and np.all(np.diff(sag.positions_mm) > 0)
    assert sag.positions_mm[-1] == pytest.approx(aligned.geometry.index_to_patient((0, 0, 49))[0] - 3.0)
    cor = slab_stack(aligned, "coronal", "max", 4.0, spacing_mm=2.0)  # overlapping slabs
    assert len(cor.images) == 19


def test_minip_shows_the_airway():
    g = centred_geometry((60, 90, 120), (2.5, 2.5, 5.0), (1, 0, 0), (0, 1, 0))
    vol = sample_phantom(g, chest_phantom)
    aligned = align_to_patient_axes(vol)
    trachea_y = CHEST["trachea"][0][1]
    # A 30 mm coronal slab centred on the trachea: the 18 mm tube fills only part of it.
    for mode in ("min", "max", "mean"):
        stack = slab_stack(aligned, "coronal", mode, 30.0, spacing_mm=30.0)
        k = int(np.argmin(np.abs(stack.positions_mm - trachea_y)))
        img = stack.images[k]
        lo, hi = patient_bounds(aligned.geometry)
        ps_r, ps_c = stack.pixel_spacing_mm

        def px(x, z):
            return int(round((hi[2] - z) / ps_r)), int(round((x - lo[0]) / ps_c))

        trachea, mediastinum = img[px(0.0, 100.0)], img[px(22.0, 100.0)]
        bronchus = img[px(-27.5, 20.0)]  # midway along the right main bronchus
        parenchyma = img[px(-85.0, -40.0)]
        if mode == "min":
            assert trachea < -950 and bronchus < -950, "MinIP must show the air column"
            assert mediastinum > -100 and parenchyma == pytest.approx(-850, abs=30)
        elif mode == "max":  # a MIP of the same slab hides the airway behind soft tissue
            assert trachea > -100
        else:
            assert -950 < trachea < -100


def test_plane_view_array_needs_aligned_volume():
    vol = sphere_volume("sagittal")
    with pytest.raises(ValueError, match="patient-aligned"):
        plane_view_array(vol, "axial")
    with pytest.raises(ValueError, match="unknown plane"):
        plane_view_array(align_to_patient_axes(vol), "oblique")
    with pytest.raises(ValueError, match="projection mode"):
        slab_stack(align_to_patient_axes(vol), "axial", "median", 5.0)
    with pytest.raises(ValueError, match="thickness_mm"):
        slab_stack(align_to_patient_axes(vol), "axial", "max", 0.0)
    with pytest.raises(ValueError, match="spacing_mm"):
        slab_stack(align_to_patient_axes(vol), "axial", "max", 5.0, spacing_mm=float("inf"))


def test_square_pixels_keep_positions_and_cap_size():
    g = centred_geometry((40, 30, 50), (0.5, 1.0, 3.0), (1, 0, 0), (0, 1, 0))
    aligned = align_to_patient_axes(Volume(np.zeros(g.shape, np.float32), g))
    cor = slab_stack(aligned, "coronal", "max", 5.0)  # rows 3 mm (z), cols 0.5 mm (x)
    assert cor.pixel_spacing_mm == (3.0, 0.5)
    # a bright row of voxels at one z shows up at the same mm position after resampling
    cor.images[:, 10, :] = 1000
    sq = to_square_pixels(cor)
    assert sq.pixel_spacing_mm == (0.5, 0.5) and sq.images.shape[1:] == (40 * 6 - 5, 50)
    assert int(np.argmax(sq.images[0, :, 0])) == 60
    capped = to_square_pixels(cor, max_side=100)
    assert max(capped.images.shape[1:]) <= 100 and capped.pixel_spacing_mm[0] == capped.pixel_spacing_mm[1]
