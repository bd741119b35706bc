"""The registration library (node.registration) on phantom pairs with a known rigid motion.

The follow-up phantom moves the patient by a known rotation and shift (``changes.json``), so the
true mapping of every point is known: target registration error (TRE) is measured against it.
"""
from __future__ import annotations

import numpy as np
import pytest

from node.phantom import generate_ct, generate_followup
from node.registration import RegistrationRefusal, check_pair, ct_mask, register
from node.volume import load_series


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg_lib")
    base = generate_ct(root / "base", seed=3, rows=128, cols=128, slices=60, pixel_spacing=3.0,
                       slice_thickness=5.0, nodules=0)
    fu = generate_followup(base, root / "fu", new_nodules=0, rotation_deg=(2.0, -1.5, 4.0), shift_mm=(8.0, -5.0, 12.0))
    return load_series(fu.series_files()), load_series(base.series_files()), np.array(fu.changes["transform"]["matrix"])


def _landmarks(series, n=30):
    """``n`` points spread through the fixed patient's body (seeded)."""
    kji = np.argwhere(series.volume.array > -500)
    kji = kji[np.random.default_rng(0).choice(len(kji), n, replace=False)]
    return series.volume.geometry.index_to_patient(kji)


def test_rigid_ct_ct_with_body_masks_is_submillimetre(pair):
    fixed, moving, move = pair  # move: baseline (moving) → follow-up (fixed) patient coordinates
    out = register(fixed.volume, moving.volume, "rigid", metric="mean_squares",
                   fixed_mask=ct_mask(fixed.volume, "body"), moving_mask=ct_mask(moving.volume, "body"))
    pts = _landmarks(fixed)
    truth = (pts - move[:3, 3]) @ np.linalg.inv(move[:3, :3]).T
    tre = np.linalg.norm(out.fixed_to_moving(pts) - truth, axis=1)
    assert tre.mean() <= 1.0 and tre.max() <= 2.0, (tre.mean(), tre.max())
    # Both directions agree, and the DICOM-direction matrix is the truth's.
    assert np.allclose(out.moving_to_fixed(out.fixed_to_moving(pts)), pts, atol=1e-6)
    assert np.abs(out.matrix_moving_to_fixed[:3, :3] - move[:3, :3]).max() < 0.01
    assert out.overlap > 0.9 and out.jacobian is None


def test_resample_puts_the_moving_image_on_the_fixed_grid(pair):
    fixed, moving, _ = pair
    out = register(fixed.volume, moving.volume, "rigid", fixed_mask=ct_mask(fixed.volume, "body"),
                   moving_mask=ct_mask(moving.volume, "body"))
    warped = out.resample(moving.volume)
    assert warped.geometry == fixed.volume.geometry and warped.array.dtype == moving.volume.array.dtype
    body = ct_mask(fixed.volume, "body")
    before = np.abs(moving.volume.array.astype(float) - fixed.volume.array)[body].mean()
    after = np.abs(warped.array.astype(float) - fixed.volume.array)[body].mean()
    assert after < 0.5 * before, (before, after)


def test_resampling_a_slab_at_a_time_gives_the_whole_grid_values(pair, monkeypatch):
    """RegistrationOutcome.resample makes the output a few slices at a time (its memory): the
    values are those of one SimpleITK call over the whole grid, rounded as HU, float or labels."""
    import SimpleITK as sitk

    from node.registration import outcome as outcome_module
    from node.volume import Volume

    fixed, moving, _ = pair
    out = register(fixed.volume, moving.volume, "rigid", fixed_mask=ct_mask(fixed.volume, "body"),
                   moving_mask=ct_mask(moving.volume, "body"))

    def whole(volume, labels=False):
        src = volume.geometry.to_sitk(np.ascontiguousarray(volume.array))
        img = sitk.Resample(src, outcome_module.reference_image(fixed.volume.geometry), out.transform,
                            sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, float(volume.array.min()),
                            src.GetPixelID() if labels else sitk.sitkFloat32)
        return sitk.GetArrayFromImage(img)

    hu = moving.volume
    floats = Volume(hu.array.astype(np.float32) * 0.37, hu.geometry)
    labels = Volume((hu.array > -300).astype(np.uint8) + (hu.array > 300), hu.geometry)
    monkeypatch.setattr(outcome_module, "_SLAB", 7)  # 60 slices: eight slabs and a part
    assert np.array_equal(out.resample(hu).array,
                          np.clip(np.rint(whole(hu)), -32768, 32767).astype(hu.array.dtype))
    assert np.array_equal(out.resample(floats).array, whole(floats))
    got = out.resample(labels, labels=True).array
    assert got.dtype == np.uint8 and np.array_equal(got, whole(labels, labels=True))


def test_refusals_name_the_problem(pair, phantom_mr, phantom_cr):
    fixed, moving, _ = pair
    mr = load_series(phantom_mr.series_files())
    with pytest.raises(RegistrationRefusal, match="different patients"):
        check_pair(fixed, mr)
    cr = load_series(phantom_cr.series_files())
    with pytest.raises(RegistrationRefusal, match="2-D image"):
        check_pair(fixed, cr)
    with pytest.raises(RegistrationRefusal, match="same series"):
        check_pair(fixed, fixed)
    # Same Frame of Reference claimed but no anatomy in common: refused, not "registered".
    far = type(moving.volume)(moving.volume.array, type(moving.volume.geometry)(
        shape=moving.volume.geometry.shape, origin=tuple(np.add(moving.volume.geometry.origin, (0, 0, 2000.0))),
        spacing=moving.volume.geometry.spacing, direction=moving.volume.geometry.direction))
    with pytest.raises(RegistrationRefusal, match="no overlap"):
        register(fixed.volume, far, "rigid", same_frame=True)


def test_localizer_is_refused(tmp_path):
    study = generate_ct(tmp_path / "loc", seed=5, rows=64, cols=64, slices=20, pixel_spacing=6.0,
                        slice_thickness=10.0, nodules=0, localizer=True)
    axial = load_series(study.series_files())
    scout = load_series(study.series_files(study.localizer_series_uid))
    with pytest.raises(RegistrationRefusal, match="localizer"):
        check_pair(axial, scout)


def test_masks_cover_the_body_or_the_lungs_and_leave_out_the_table(tmp_path):
    study = generate_ct(tmp_path / "m", seed=6, rows=96, cols=96, slices=40, pixel_spacing=4.0, slice_thickness=7.5,
                        nodules=0)
    vol = load_series(study.series_files()).volume
    truth, _ = study.label_volume()
    lungs_truth = np.isin(truth, (study.label("lung_left"), study.label("lung_right")))
    table = truth == study.label("table")
    body = ct_mask(vol, "body")
    lungs = ct_mask(vol, "lungs")
    # At 4 mm voxels the table touches the back over a voxel or two: most of it stays out.
    assert body[lungs_truth].mean() > 0.98 and body[table].mean() < 0.25
    assert lungs[lungs_truth].mean() > 0.98 and lungs.sum() < 0.8 * body.sum()
    assert ct_mask(vol, "none") is None
    with pytest.raises(ValueError, match="mask 'liver'"):
        ct_mask(vol, "liver")


def test_affine_recovers_a_rigid_motion_too(pair):
    fixed, moving, move = pair
    out = register(fixed.volume, moving.volume, "affine", fixed_mask=ct_mask(fixed.volume, "body"),
                   moving_mask=ct_mask(moving.volume, "body"))
    pts = _landmarks(fixed)
    truth = (pts - move[:3, 3]) @ np.linalg.inv(move[:3, :3]).T
    tre = np.linalg.norm(out.fixed_to_moving(pts) - truth, axis=1)
    assert out.method == "affine" and len(out.iterations) == 2
    assert tre.mean() <= 1.0 and tre.max() <= 2.0, (tre.mean(), tre.max())


def test_deformable_across_modalities_is_refused(pair):
    fixed, moving, _ = pair
    with pytest.raises(RegistrationRefusal, match="one modality"):
        register(fixed.volume, moving.volume, "deformable", metric="mattes")


def test_surface_distance_between_masks_is_in_millimetres():
    """Concentric spheres of radius 20 and 23 mm on an anisotropic grid: every surface point is 3 mm
    from the other surface (up to half a voxel of quantisation); identical masks read 0."""
    from node.registration import surface_distance
    from node.volume import Geometry

    geom = Geometry(shape=(40, 64, 64), origin=(-64.0, -64.0, -50.0), spacing=(2.0, 2.0, 2.5),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in geom.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    r = np.linalg.norm(geom.index_to_patient(kji), axis=1).reshape(geom.shape)
    small, large = r <= 20.0, r <= 23.0
    d = surface_distance(small, large, geom)
    assert 2.5 <= d.mean_mm <= 3.5 and d.p95_mm <= 4.5, d
    same = surface_distance(small, small, geom)
    assert same.mean_mm == 0.0 and same.p95_mm == 0.0
    assert surface_distance(small, np.zeros_like(small), geom) is None


def test_working_grid_keeps_patient_coordinates():
    """Block means of a field linear in patient space equal the field at each block's centre, so the
    working grid (origin at the first block's centre) puts every value where it was; the partial
    blocks at the far edge are dropped; already-coarse volumes and masks come back as they were."""
    from node.registration import working_mask, working_volume
    from node.volume import Geometry, Volume

    c, s = np.cos(0.3), np.sin(0.3)
    geom = Geometry(shape=(41, 70, 65), origin=(-30.0, 12.0, 80.0), spacing=(0.7, 0.7, 1.0),
                    direction=(c, 0, s, 0, 1, 0, -s, 0, c))
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in geom.shape], indexing="ij"), axis=-1)
    xyz = geom.index_to_patient(kji)
    field = xyz @ np.array([1.0, -2.0, 3.0]) + 5.0
    work = working_volume(Volume(field.astype(np.float32), geom))
    assert work.geometry.shape == (20, 23, 21) and np.allclose(work.geometry.spacing, (2.1, 2.1, 2.0))
    centres = work.geometry.index_to_patient(np.stack(np.meshgrid(*[np.arange(n) for n in work.geometry.shape],
                                                                  indexing="ij"), axis=-1))
    assert np.abs(work.array - (centres @ np.array([1.0, -2.0, 3.0]) + 5.0)).max() < 1e-3
    assert working_volume(work) is work
    # Masks: a block is in when at least half of it is.
    half = xyz[..., 0] < np.median(xyz[..., 0])
    coarse = working_mask(half, geom)
    assert coarse.shape == work.geometry.shape
    x, middle = centres[..., 0], np.median(xyz[..., 0])
    assert coarse[x < middle - 2].all() and not coarse[x > middle + 2].any()
    assert np.array_equal(working_mask(coarse, work.geometry), coarse)


def test_a_mask_given_by_its_box_carries_over_like_the_whole_mask():
    """working_mask(sub, geom, box=...) (a lung's box, not a byte per voxel of the whole volume) is
    working_mask of the whole mask, for boxes at every offset against the blocks, at the edges, and
    past the partial blocks the working grid drops; a mask that does not fill its box is refused."""
    from node.registration import working_mask
    from node.volume import Geometry

    geom = Geometry(shape=(43, 70, 65), origin=(0.0, 0.0, 0.0), spacing=(0.7, 0.7, 1.0),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    rng = np.random.default_rng(3)
    whole = rng.random(geom.shape) < 0.5
    boxes = [(slice(0, 43), slice(0, 70), slice(0, 65)), (slice(5, 20), slice(7, 40), slice(1, 64)),
             (slice(1, 2), slice(3, 4), slice(5, 6)), (slice(40, 43), slice(66, 70), slice(0, 65)),
             (slice(0, 1), slice(0, 70), slice(63, 65))]
    boxes += [tuple(slice(a, a + int(rng.integers(1, n - a + 1))) for a, n in
                    zip((int(rng.integers(0, n)) for n in geom.shape), geom.shape)) for _ in range(20)]
    for box in boxes:
        mask = np.zeros(geom.shape, bool)
        mask[box] = whole[box]
        assert np.array_equal(working_mask(whole[box], geom, box=box), working_mask(mask, geom)), box
    coarse_geom = Geometry(shape=(20, 23, 21), origin=(0.0, 0.0, 0.0), spacing=(2.1, 2.1, 2.0),
                           direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    box = (slice(2, 9), slice(0, 23), slice(4, 5))
    mask = np.zeros(coarse_geom.shape, bool)
    mask[box] = True
    assert np.array_equal(working_mask(np.ones((7, 23, 1), bool), coarse_geom, box=box), mask)
    with pytest.raises(ValueError, match="box"):
        working_mask(np.ones((3, 3, 3), bool), geom, box=(slice(0, 4), slice(0, 3), slice(0, 3)))


def test_the_demons_finest_level_is_a_checked_choice(pair):
    """A caller may stop the demons at a coarser finest level (nodule follow-up does, for speed);
    a level that is not finer than the one before it, or below 1 mm, is refused naming the field."""
    fixed, moving, _ = pair
    for bad in (4.0, 0.5):
        with pytest.raises(ValueError, match="finest_mm"):
            register(fixed.volume, moving.volume, "deformable", finest_mm=bad)
