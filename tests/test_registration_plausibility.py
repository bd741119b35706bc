"""Never a silently wrong registration: results that fail a plausibility check are refused, or
delivered with a QualityFlag; and a series of slices at different PixelSpacing is not one volume.

The overlap and the body masks cannot tell a wrong match (disjoint slabs start from aligned centres
of mass; a mirrored body is as symmetric as the true one): the match itself is measured, as the RMS
HU difference within the fixed mask after registration (CT-CT, ``engine.MATCH_REFUSE_RMS_HU``).
Measured on these pairs: true 8-56 HU, mirrored 196-254 HU, disjoint slabs 274-382 HU.
Small phantoms (4 mm pixels): a few seconds per registration.
"""
from __future__ import annotations

import numpy as np
import pytest

from node.handler_api import HandlerInput, HandlerRefusal, PriorStudy, get_handler
from node.phantom import generate_ct
from node.phantom.pairs import generate_breathing_followup, generate_head_ct_mr
from node.registration import RegistrationRefusal, ct_mask, register, working_volume
from node.registration import engine
from node.results import QualityFlag, SpatialRegistration
from node.volume import Geometry, GeometryError, SeriesData, Volume, load_series, sort_by_geometry

_SMALL = dict(rows=96, cols=96, slices=40, pixel_spacing=4.0, slice_thickness=5.0, nodules=0)
_SLAB = dict(_SMALL, slices=30, slice_thickness=4.0)


_made: dict = {}


def _ct(root, name, seed, **kw):
    """A chest CT phantom (made once per module and name)."""
    if (root, name) not in _made:
        _made[root, name] = load_series(generate_ct(root / name, seed=seed, **{**_SMALL, **kw}).series_files())
    return _made[root, name]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reg_plausible")


@pytest.fixture(scope="module")
def seed7(root):
    base = generate_ct(root / "b7", seed=7, **_SMALL)
    moved = generate_breathing_followup(base, root / "f7", breathing_mm=0.0, rotation_deg=(3.0, -2.0, 8.0),
                                        shift_mm=(-10.0, 8.0, -15.0))
    breathing = generate_breathing_followup(base, root / "f7b", breathing_mm=10.0, rotation_deg=(-2.0, 1.0, -5.0),
                                            shift_mm=(5.0, 12.0, 20.0))
    return load_series(base.series_files()), load_series(moved.series_files()), load_series(breathing.series_files())


@pytest.fixture(scope="module")
def seed4(root):
    base = generate_ct(root / "b4", seed=4, **{**_SMALL, "slice_thickness": 7.5})
    still = generate_breathing_followup(base, root / "f4", breathing_mm=0.0)
    return load_series(base.series_files()), load_series(still.series_files())


def _register(fixed: Volume, moving: Volume, mask: str = "body", **kw):
    """As the handler does: on the working grids, with masks made there."""
    fixed, moving = working_volume(fixed), working_volume(moving)
    masks = {} if mask == "none" else dict(fixed_mask=ct_mask(fixed, mask), moving_mask=ct_mask(moving, mask))
    return register(fixed, moving, "rigid", **masks, **kw)


def _mirrored(s: SeriesData) -> SeriesData:
    """The same headers, the pixels flipped left-right (a wrongly written or read series)."""
    return SeriesData(s.series_uid + ".9", s.modality, s.datasets,
                      Volume(s.volume.array[:, :, ::-1].copy(), s.volume.geometry))


# --- true registrations stay well below the thresholds, without a caution -------------------------

@pytest.mark.parametrize("case", ["shifted", "rotated", "breathing", "unmasked"])
def test_true_ct_ct_registrations_pass_without_a_caution(case, seed4, seed7):
    base7, moved7, breathing7 = seed7
    fixed, moving, mask = {"shifted": (seed4[1], seed4[0], "body"), "rotated": (moved7, base7, "body"),
                           "breathing": (breathing7, base7, "body"), "unmasked": (moved7, base7, "none")}[case]
    out = _register(fixed.volume, moving.volume, mask)
    # Measured 8.6, 8.0, 56 (10 mm of breathing left to a rigid result) and 8.5 HU.
    assert out.match_rms_hu is not None and out.match_rms_hu < 0.5 * engine.MATCH_REFUSE_RMS_HU, out.match_rms_hu
    assert out.cautions == () and out.warnings == ()


def test_true_mr_ct_registration_is_not_flagged(tmp_path):
    """MR-CT (mutual information) has no absolute match scale: no RMS; the z-extents agree."""
    ct, mr = generate_head_ct_mr(tmp_path / "head", ct_pixel_mm=3.0, mr_pixel_mm=3.5)
    out = register(load_series(ct.series_files()).volume, load_series(mr.series_files()).volume, "rigid",
                   metric="mattes")
    assert out.match_rms_hu is None and out.cautions == ()


# --- wrong matches are refused --------------------------------------------------------------------

@pytest.mark.parametrize("seed, upper, lower", [(11, 60.0, -110.0), (5, 80.0, -60.0)])
def test_slabs_without_shared_anatomy_are_refused(root, seed, upper, lower):
    """Upper chest and abdomen of one patient, different Frames of Reference: the old code delivered
    them 112 mm / 52 mm apart (overlap 53 % / 28 %, above the 25 % refusal); RMS 382 / 274 HU."""
    up = _ct(root, f"up{seed}", seed, z_center_mm=upper, **_SLAB)
    lo = _ct(root, f"lo{seed}", seed, z_center_mm=lower, **_SLAB)
    with pytest.raises(RegistrationRefusal, match="do not match after registration"):
        _register(lo.volume, up.volume)


@pytest.mark.parametrize("case", ["same frame", "other frame", "lung masks"])
def test_mirrored_moving_image_is_refused(case, seed4, seed7):
    """Overlap 100 % and symmetric masks, yet the heart lies where the right lung was: 196-254 HU."""
    if case == "same frame":
        out = dict(fixed=seed4[0].volume, moving=_mirrored(seed4[0]).volume, mask="body", same_frame=True)
    else:
        out = dict(fixed=seed7[1].volume, moving=_mirrored(seed7[0]).volume,
                   mask="lungs" if case == "lung masks" else "body")
    with pytest.raises(RegistrationRefusal, match="mirrored"):
        _register(**out)


def test_the_handler_refuses_a_mirrored_prior_and_disjoint_slabs_naming_why(root, seed4):
    """As the handler refuses folded fields: the job's error says why, nothing is delivered."""
    handler = get_handler("registration")({"pair": "prior"})
    base = seed4[0]
    with pytest.raises(HandlerRefusal, match=r"registration: the images do not match .* HU"):
        handler.run(HandlerInput(base.first.StudyInstanceUID, [base],
                                 priors=[PriorStudy("1.2.3.4", None, [_mirrored(base)])]), lambda f, m: None)
    up = _ct(root, "up11", 11, z_center_mm=60.0, **_SLAB)
    lo = _ct(root, "lo11", 11, z_center_mm=-110.0, **_SLAB)
    assert up.first.FrameOfReferenceUID != lo.first.FrameOfReferenceUID
    with pytest.raises(HandlerRefusal, match="different anatomy"):
        handler.run(HandlerInput(lo.first.StudyInstanceUID, [lo],
                                 priors=[PriorStudy(up.first.StudyInstanceUID, None, [up])]), lambda f, m: None)


# --- borderline: delivered with a visible QualityFlag ---------------------------------------------

def test_little_shared_z_extent_is_delivered_with_a_quality_flag(root):
    """Two scans of one patient, 160 mm long, 100 mm apart in z (different Frames of Reference):
    registered correctly (they match, 26 HU), but only 36 % of the z-extent is shared: flagged."""
    a = _ct(root, "pa", 8, z_center_mm=0.0, slice_thickness=4.0)
    b = _ct(root, "pb", 8, z_center_mm=100.0, slice_thickness=4.0)
    assert a.first.FrameOfReferenceUID != b.first.FrameOfReferenceUID
    handler = get_handler("registration")({"pair": "prior", "checkerboard_slices": 0})
    results = handler.run(HandlerInput(a.first.StudyInstanceUID, [a],
                                       priors=[PriorStudy(b.first.StudyInstanceUID, None, [b])]), lambda f, m: None)
    flags = [r for r in results if isinstance(r, QualityFlag)]
    assert [f.check for f in flags] == ["registration_z_extent"], flags
    assert "z-extent" in flags[0].reason
    reg = next(r for r in results if isinstance(r, SpatialRegistration))
    assert np.abs(reg.matrix[:3, 3]).max() < 2.0  # the same patient coordinates: identity found


def test_a_poor_match_below_the_refusal_is_a_caution(seed7, monkeypatch):
    """Between MATCH_FLAG_RMS_HU and MATCH_REFUSE_RMS_HU: delivered, with a caution (the handler's
    QualityFlag). The breathing pair (56 HU) against a flag threshold lowered to 30 HU."""
    base, _, breathing = seed7
    monkeypatch.setattr(engine, "MATCH_FLAG_RMS_HU", 30.0)
    out = _register(breathing.volume, base.volume)
    assert [c[0] for c in out.cautions] == ["registration_match"] and "match poorly" in out.cautions[0][1]


def test_z_share_is_measured_in_the_fixed_space():
    g = lambda z0, n: Geometry(shape=(n, 8, 8), origin=(0.0, 0.0, z0), spacing=(2.0, 2.0, 2.0),  # noqa: E731
                               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    shift = lambda dz: np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, dz], [0, 0, 0, 1.0]])  # noqa: E731
    # fixed z 0..98, moving z 0..58 carried to fixed z 40..98 by fixed->moving z - 40: all shared.
    assert engine._z_share(g(0.0, 50), g(0.0, 30), shift(-40.0)) == pytest.approx(1.0)
    # carried to z 80..138: 18 of the shorter 58 mm shared.
    assert engine._z_share(g(0.0, 50), g(0.0, 30), shift(-80.0)) == pytest.approx(18 / 58)
    assert engine._z_share(g(0.0, 50), g(0.0, 30), shift(-200.0)) == 0.0


# --- a series of slices at different PixelSpacing -------------------------------------------------

@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    return generate_ct(tmp_path_factory.mktemp("ps") / "ct", seed=5, rows=48, cols=40, slices=12, pixel_spacing=6.0,
                       slice_thickness=8.0, nodules=0)


def _respaced(study, tmp_path, spacing: float, recentre: bool):
    """The upper half of the slices given ``spacing`` (a reconstruction of another field of view with
    the same matrix): at the same corner, or recentred (the corner moves, as a scanner writes it)."""
    import pydicom

    z = lambda ds: float(ds.ImagePositionPatient[2])  # noqa: E731
    middle = np.median([z(pydicom.dcmread(q, stop_before_pixels=True)) for q in study.series_files()])
    files = []
    for i, p in enumerate(sorted(study.series_files())):
        ds = pydicom.dcmread(p)
        if z(ds) > middle:
            old = float(ds.PixelSpacing[0])
            ds.PixelSpacing = [spacing, spacing]
            if recentre:
                ipp = [float(v) for v in ds.ImagePositionPatient]
                ds.ImagePositionPatient = [ipp[0] + (old - spacing) * (int(ds.Columns) - 1) / 2,
                                           ipp[1] + (old - spacing) * (int(ds.Rows) - 1) / 2, ipp[2]]
        files.append(tmp_path / f"{i}.dcm")
        ds.save_as(files[-1])
    return files


@pytest.mark.parametrize("recentre", [False, True])
def test_slices_at_different_pixel_spacing_are_not_one_volume(small_ct, tmp_path, recentre):
    """Same corner: stacked at the first slice's spacing before (ct-anatomy +48 % lungs); recentred:
    refused as 'sheared (gantry tilt)'. Now both name the PixelSpacing."""
    import pydicom

    files = _respaced(small_ct, tmp_path, 5.0, recentre)
    s = load_series(files)
    assert s.volume is None and "different PixelSpacing" in s.volume_error, s.volume_error
    with pytest.raises(GeometryError, match=r"different PixelSpacing: 6\\6 mm and 5\\5 mm"):
        sort_by_geometry([pydicom.dcmread(f, stop_before_pixels=True) for f in files])


def test_pixel_spacing_float_noise_is_still_one_volume(small_ct, tmp_path):
    s = load_series(_respaced(small_ct, tmp_path, 6.0 * (1 + 1e-6), False))
    assert s.volume is not None and s.volume.geometry.spacing[:2] == pytest.approx((6.0, 6.0))
