"""The ``renders`` handler: what a rule gets by default, where the sphere lands, refusals."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from handlers.renders import Renders
from node.handler_api import HandlerInput, HandlerRefusal, get_handler
from node.render.aligned import align_to_patient_axes
from node.render.font import text_mask
from node.render.phantom import centred_geometry, sample_phantom
from node.results import ImageSeries, ResultSet
from node.volume import SeriesData
from tests.test_render_annotate import find
from tests.test_render_projections import ACQUISITIONS, SPHERE, patient_bounds, sphere_volume

UID = "1.2.826.0.1.3680043.8.498.4242"


def series(acq: str = "axial head-first", modality: str = "CT") -> SeriesData:
    return SeriesData(series_uid=UID, modality=modality, datasets=[], volume=sphere_volume(acq))


def run(params: dict | None, s: SeriesData) -> list[ImageSeries]:
    seen = []
    out = Renders(params).run(HandlerInput("1.2.3", [s]), lambda f, msg: seen.append(f))
    assert seen and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)
    return out


def test_registered_with_its_scope():
    h = get_handler("renders")
    assert h is Renders and h.modalities == frozenset({"CT", "MR"}) and h.needs_volume
    with pytest.raises(HandlerRefusal, match="accepts CT, MR"):
        Renders().check(HandlerInput("1", [series(modality="PT")]))
    with pytest.raises(HandlerRefusal, match="regular 3-D volume: sheared"):
        Renders().check(HandlerInput("1", [SeriesData(UID, "CT", [], None, volume_error="sheared")]))


def test_default_set_for_a_feet_first_ct():
    s = series("axial feet-first")
    out = run(None, s)
    ResultSet(out)  # the node's own check of a handler's result list
    assert [r.description for r in out] == [
        "MIP axial 10 mm", "MIP coronal 10 mm", "MIP sagittal 10 mm", "MinIP coronal 10 mm",
        "MPR coronal 3 mm", "MPR sagittal 3 mm", "VR bone 24x15 deg",
    ]
    for r in out:
        assert r.source_series_uid == UID and r.burned_in_annotation
        assert r.pixel_spacing_mm[0] == r.pixel_spacing_mm[1] > 0
        assert len(r.frame_labels) == len(r.frames)
    vr = out[-1]
    assert vr.multiframe and vr.rgb and vr.frames.shape == (24, 512, 512, 3)
    assert vr.frame_labels[:3] == ("azimuth 0 deg", "azimuth 15 deg", "azimuth 30 deg")
    assert all(not r.multiframe and not r.rgb for r in out[:-1])

    # Sphere in the axial MIP where the patient geometry puts it (display convention: A up, R left).
    axial = out[0]
    lo, _ = patient_bounds(align_to_patient_axes(s.volume).geometry)
    ps = axial.pixel_spacing_mm[0]
    er, ec = (SPHERE[1] - lo[1]) / ps, (SPHERE[0] - lo[0]) / ps
    k = int(np.argmin([abs(float(lbl.split()[1]) - SPHERE[2]) for lbl in axial.frame_labels]))
    img = axial.frames[k].astype(int)
    rr, cc = np.nonzero(img[int(er) - 12:int(er) + 12, int(ec) - 12:int(ec) + 12] > 200)
    assert len(rr) > 20
    assert abs(rr.mean() + int(er) - 12 - er) < 0.75 and abs(cc.mean() + int(ec) - 12 - ec) < 0.75
    # Orientation labels burned in: R on the left half, L on the right half, A on top, P below.
    frame = axial.frames[k]
    half = frame.shape[1] // 2
    assert all(c < half for _, c in find(frame, text_mask("R", 1))) and find(frame, text_mask("R", 1))
    assert all(c > half for _, c in find(frame, text_mask("L", 1))) and find(frame, text_mask("L", 1))
    (ra, _), (rp, _) = find(frame, text_mask("A", 1))[0], find(frame, text_mask("P", 1))[0]
    assert ra < frame.shape[0] // 4 and rp > 3 * frame.shape[0] // 4


@pytest.mark.parametrize("acq", ["axial head-first", "axial feet-first", "sagittal", "oblique"])
def test_same_patient_same_pictures_whatever_the_acquisition(acq):
    """The coronal MIP shows the sphere at one patient position however the slices were taken."""
    out = run({"mip": [{"plane": "coronal", "thickness_mm": 40}], "minip": [], "mpr": [], "vr": []}, series(acq))
    (cor,) = out
    lo, hi = patient_bounds(align_to_patient_axes(series(acq).volume).geometry)
    ps = cor.pixel_spacing_mm[0]
    er, ec = (hi[2] - SPHERE[2]) / ps, (SPHERE[0] - lo[0]) / ps
    best = int(np.argmax([np.count_nonzero(f > 200) for f in cor.frames]))
    rr, cc = np.nonzero(cor.frames[best][int(er) - 12:int(er) + 12, int(ec) - 12:int(ec) + 12] > 200)
    assert abs(rr.mean() + int(er) - 12 - er) < 1.0 and abs(cc.mean() + int(ec) - 12 - ec) < 1.0


def test_mr_uses_data_windows_and_refuses_hounsfield_settings():
    g = centred_geometry((24, 40, 40), (2.0, 2.0, 3.0), *ACQUISITIONS["axial head-first"][:2])
    mr = SeriesData(UID, "MR", [], sample_phantom(g, lambda xyz: 200 + 300 * (np.sum(xyz**2, -1) < 100), np.float32))
    out = run({"mip": [{"plane": "axial"}], "minip": [], "mpr": [], "vr": [{"frames": 2, "size": 64}]}, mr)
    assert [r.description for r in out] == ["MIP axial 10 mm", "VR mr 2x15 deg"]
    assert out[0].frames.max() == 255 and out[1].frames.max() > 40
    with pytest.raises(HandlerRefusal, match=r"mip\[0\]\.window.*only fits CT"):
        run({"mip": [{"plane": "axial", "window": "lung"}], "minip": [], "mpr": [], "vr": []}, mr)
    with pytest.raises(HandlerRefusal, match=r"vr\[0\]\.preset 'bone'"):
        run({"mip": [], "minip": [], "mpr": [], "vr": [{"preset": "bone", "frames": 1}]}, mr)
    with pytest.raises(HandlerRefusal, match=r"vr\[0\]\.preset 'mr' is for MR"):
        run({"mip": [], "minip": [], "mpr": [], "vr": [{"preset": "mr", "frames": 1}]}, series())


def test_explicit_window_and_slab_spacing():
    minip = {"plane": "axial", "thickness_mm": 5, "spacing_mm": 20, "window": {"center": 0, "width": 100}}
    out = run({"mip": [], "mpr": [], "vr": [], "minip": [minip]}, series())
    (m,) = out
    assert m.description == "MinIP axial 5 mm"
    zs = [float(lbl.split()[1]) for lbl in m.frame_labels]
    np.testing.assert_allclose(-np.diff(zs)[:-1], 20.0)
    # background 0 HU is the window centre: mid grey where no sphere and no annotation
    assert np.median(m.frames) in (127, 128)


def test_params_are_validated_with_field_names():
    with pytest.raises(ValidationError, match=r"mip\.0\.plane"):
        Renders({"mip": [{"plane": "oblique"}]})
    with pytest.raises(ValidationError, match=r"minip\.0\.thickness_mm"):
        Renders({"minip": [{"plane": "axial", "thickness_mm": -1}]})
    with pytest.raises(ValidationError, match=r"vr\.0\.frames"):
        Renders({"vr": [{"frames": 0}]})
    with pytest.raises(ValidationError, match="colour"):
        Renders({"colour": "red"})
    with pytest.raises(ValidationError, match=r"mpr\.0\.window"):
        Renders({"mpr": [{"plane": "coronal", "window": "purple"}]})
    with pytest.raises(HandlerRefusal, match="asks for no output"):
        run({"mip": [], "minip": [], "mpr": [], "vr": []}, series())


def test_secondary_captures_are_valid_and_in_the_source_study(tmp_path):
    from node.encoders.sc import encode_sc
    from tests.encoder_sources import context, ct_series, save_valid

    src = ct_series(tmp_path / "src", rows=48, cols=48, slices=16)
    params = {"mip": [{"plane": "axial"}], "minip": [{"plane": "coronal"}],
              "mpr": [{"plane": "sagittal", "spacing_mm": 6}], "vr": [{"frames": 3, "size": 64}]}
    out = Renders(params).run(HandlerInput(str(src.first.StudyInstanceUID), [src]), lambda f, m: None)
    ctx = context(handler="renders", handler_version=Renders.version, model_name=None, model_version=None)
    expected = ["AI: MIP axial 10 mm (SC)", "AI: MinIP coronal 10 mm (SC)", "AI: MPR sagittal 6 mm (SC)",
                "AI: VR bone 3x15 deg (SC)"]
    for n, (images, description) in enumerate(zip(out, expected)):
        datasets = encode_sc(images, {src.series_uid: src}, ctx, series_number=9000 + n)
        assert len(datasets) == (1 if images.multiframe else len(images.frames))
        for i, ds in enumerate(datasets):
            save_valid(ds, tmp_path / "sc", f"{n}-{i}.dcm")  # dciodvfy: zero errors
            assert ds.StudyInstanceUID == src.first.StudyInstanceUID
            assert ds.SeriesDescription == description
            assert [float(v) for v in ds.PixelSpacing] == pytest.approx(images.pixel_spacing_mm)
        if images.multiframe:
            assert int(datasets[0].NumberOfFrames) == 3 and datasets[0].PhotometricInterpretation == "RGB"
