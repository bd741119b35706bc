"""The registration handler end to end into DICOM: objects valid for their IOD (dciodvfy), the
Spatial Registration applied by an independent reader (pydicom + NumPy, no Hilum code), refusals."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError

from node.encoders import EncodeContext, encode_all
from node.handler_api import HandlerInput, HandlerRefusal, PriorStudy, get_handler
from node.phantom import generate_ct
from node.phantom.pairs import REGISTRATION_TRUTH, generate_breathing_followup, generate_head_ct_mr
from node.registration import register
from node.results import DeformableRegistration, ResultSet, SeriesRef
from node.volume import Geometry, load_series
from tests.iod import assert_valid_iod

SRO = "1.2.840.10008.5.1.4.1.1.66.1"
DSRO = "1.2.840.10008.5.1.4.1.1.66.3"


def _ctx(name: str) -> EncodeContext:
    return EncodeContext(job_key=f"test-{name}", rule="test", handler="registration", handler_version="1.0.0")


def _write(datasets, tmp_path) -> list:
    paths = []
    for ds in datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg_dicom_head")
    ct, mr = generate_head_ct_mr(root / "pair")
    return root, load_series(ct.series_files()), load_series(mr.series_files())


@pytest.fixture(scope="module")
def mr_on_ct(head):
    root, ct, mr = head
    handler = get_handler("registration")({"pair": "study", "fixed_modality": "CT", "moving_modality": "MR",
                                           "fixed_mask": "none", "moving_mask": "none"})
    results = handler.run(HandlerInput(ct.first.StudyInstanceUID, [ct, mr]), lambda f, m: None)
    ResultSet(results)
    datasets = encode_all(results, {ct.series_uid: ct, mr.series_uid: mr}, _ctx("mr-ct"))
    out = root / "out"
    out.mkdir()
    return datasets, _write(datasets, out)


def test_mr_on_ct_objects_are_valid(mr_on_ct, head):
    _, ct, mr = head
    datasets, paths = mr_on_ct
    by_class = {}
    for ds, path in zip(datasets, paths):
        by_class.setdefault(str(ds.SOPClassUID), []).append((ds, path))
    assert set(by_class) >= {SRO, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"}
    for sop_class, items in by_class.items():
        for ds, path in items[:2] + items[-1:]:
            assert_valid_iod(path)
    resampled = [ds for ds, _ in by_class["1.2.840.10008.5.1.4.1.1.4"]]
    assert len(resampled) == len(ct.datasets)
    sro = by_class[SRO][0][0]
    for ds in resampled:
        assert ds.FrameOfReferenceUID == ct.first.FrameOfReferenceUID
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == sro.SOPInstanceUID
        mr_uids = {d.SOPInstanceUID for d in mr.datasets}
        assert ds.SourceImageSequence and all(i.ReferencedSOPInstanceUID in mr_uids for i in ds.SourceImageSequence)
    # Same grid as the CT, slice for slice.
    assert np.allclose([[float(v) for v in d.ImagePositionPatient] for d in resampled],
                       [[float(v) for v in d.ImagePositionPatient] for d in ct.datasets], atol=1e-3)


def test_resampled_images_share_no_element_a_later_step_changes(head, tmp_path):
    """The resampled images are made from parts built once for the series (node/encoders/resampled.py):
    marked with a quality warning as a worker marks a delivered-with-warning job, each image gets
    its warning once, and each written image reads back as itself."""
    from node.encoders.warnings import mark_warnings
    from node.encoders.fastwrite import presize_sequences

    _, ct, mr = head
    handler = get_handler("registration")({"pair": "study", "fixed_modality": "CT", "moving_modality": "MR",
                                           "fixed_mask": "none", "moving_mask": "none"})
    results = handler.run(HandlerInput(ct.first.StudyInstanceUID, [ct, mr]), lambda f, m: None)
    images = [ds for ds in encode_all(results, {ct.series_uid: ct, mr.series_uid: mr}, _ctx("shared"))
              if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"]
    assert len(images) == len(ct.datasets) > 2
    description = str(images[0].SeriesDescription)
    mark_warnings(images, ["a check failed"])
    for ds in images:
        presize_sequences(ds)  # as the worker writes them
    for k, path in enumerate(_write(images, tmp_path)):
        back = pydicom.dcmread(path)
        assert back.SeriesDescription == f"AI WARNING: {description.removeprefix('AI: ')}"[:64]
        assert back.InstanceNumber == k + 1 and back.SOPInstanceUID == images[k].SOPInstanceUID
        assert back.PatientID == ct.first.PatientID and back.StudyInstanceUID == ct.first.StudyInstanceUID
        assert len(back.ContributingEquipmentSequence) == 1
        assert [float(v) for v in back.ImagePositionPatient] == pytest.approx(
            [float(v) for v in ct.datasets[k].ImagePositionPatient], abs=1e-3)


def test_independent_reader_applies_the_spatial_registration(mr_on_ct, head):
    root, ct, mr = head
    datasets, _ = mr_on_ct
    sro = next(ds for ds in datasets if ds.SOPClassUID == SRO)
    truth = json.loads((root / "pair" / REGISTRATION_TRUTH).read_text())
    fixed_pts = np.array([p["fixed_mm"] for p in truth["landmarks"]])
    moving_pts = np.array([p["moving_mm"] for p in truth["landmarks"]])
    # The reader: find the MR's Frame of Reference in the Registration Sequence, apply its matrix.
    item = next(i for i in sro.RegistrationSequence if i.FrameOfReferenceUID == mr.first.FrameOfReferenceUID)
    m = np.array([float(v) for v in item.MatrixRegistrationSequence[0].MatrixSequence[0]
                  .FrameOfReferenceTransformationMatrix]).reshape(4, 4)
    mapped = moving_pts @ m[:3, :3].T + m[:3, 3]
    hilum = register(ct.volume, mr.volume, "rigid", metric="mattes").moving_to_fixed(moving_pts)
    assert np.abs(mapped - hilum).max() <= 0.1
    assert np.linalg.norm(mapped - fixed_pts, axis=1).mean() <= 2.0
    identity = next(i for i in sro.RegistrationSequence if i.FrameOfReferenceUID == ct.first.FrameOfReferenceUID)
    assert np.allclose([float(v) for v in identity.MatrixRegistrationSequence[0].MatrixSequence[0]
                        .FrameOfReferenceTransformationMatrix], np.eye(4).ravel())


def test_sr_reports_the_metric(mr_on_ct):
    datasets, _ = mr_on_ct
    sr = next(ds for ds in datasets if ds.Modality == "SR")
    text = " ".join(str(e.value) for e in sr.iterall() if e.keyword in ("CodeMeaning", "TextValue"))
    assert "Final registration metric value" in text and "rigid registration of MR" in text


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg_dicom_chest")
    base = generate_ct(root / "base", seed=4, rows=96, cols=96, slices=40, pixel_spacing=4.0, slice_thickness=7.5,
                       nodules=0)
    fu = generate_breathing_followup(base, root / "fu", breathing_mm=0.0)
    return root, load_series(fu.series_files()), PriorStudy(base.study_uid, None, [load_series(base.series_files())])


def test_prior_ct_rigid_objects_are_valid_and_reference_the_prior_study(chest, tmp_path):
    _, current, prior = chest
    handler = get_handler("registration")({"pair": "prior"})
    results = handler.run(HandlerInput(current.first.StudyInstanceUID, [current], priors=[prior]), lambda f, m: None)
    datasets = encode_all(results, {current.series_uid: current}, _ctx("prior"))
    paths = _write(datasets, tmp_path)
    sro = next(ds for ds in datasets if ds.SOPClassUID == SRO)
    assert sro.StudiesContainingOtherReferencedInstancesSequence[0].StudyInstanceUID == prior.study_uid
    for ds, path in zip(datasets, paths):
        if ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.2" or ds.InstanceNumber in (1, len(current.datasets)):
            assert_valid_iod(path)
    # Without landmarks the SR reports the residual distance between the body surfaces, in mm: the
    # pair only moved rigidly, so what is left is about a voxel (4 mm here) at most.
    sr = next(ds for ds in datasets if ds.Modality == "SR")
    values = {}
    for e in sr.iterall():
        if e.keyword == "MeasuredValueSequence" and e.value:
            item = e.value[0]
            values.setdefault(item.MeasurementUnitsCodeSequence[0].CodeValue, []).append(float(item.NumericValue))
    text = " ".join(str(e.value) for e in sr.iterall() if e.keyword == "CodeMeaning")
    assert "Mean mask surface distance after registration" in text
    assert "95th percentile mask surface distance after registration" in text
    assert len(values.get("mm", [])) == 2, values
    mean, p95 = values["mm"]
    assert 0.0 <= mean <= 2.0 and mean <= p95 <= 4.5, values


def test_without_a_prior_the_handler_refuses_and_says_why(chest):
    _, current, _ = chest
    handler = get_handler("registration")({"pair": "prior"})
    with pytest.raises(HandlerRefusal, match="no prior study"):
        handler.run(HandlerInput(current.first.StudyInstanceUID, [current], priors_note="source timed out"),
                    lambda f, m: None)


def test_params_are_validated_naming_the_field():
    cls = get_handler("registration")
    with pytest.raises(ValidationError, match="fixed_mask"):
        cls({"pair": "study", "fixed_modality": "MR", "moving_modality": "CT", "fixed_mask": "body"})
    with pytest.raises(ValidationError, match="deformable"):
        cls({"pair": "study", "moving_modality": "MR", "moving_mask": "none", "method": "deformable"})
    with pytest.raises(ValidationError, match="extra"):
        cls({"pairs": "prior"})


def test_deformable_registration_object_is_valid_and_readable(chest, tmp_path):
    _, current, prior = chest
    g = current.volume.geometry
    grid = Geometry(shape=(6, 8, 8), origin=g.origin, spacing=(g.spacing[0] * 12, g.spacing[1] * 12, g.spacing[2] * 6),
                    direction=g.direction)
    vectors = np.random.default_rng(0).normal(0, 2, (*grid.shape, 3)).astype(np.float32)
    pre = np.eye(4)
    pre[:3, 3] = (3.0, -2.0, 5.0)
    ref = lambda s: SeriesRef(s.series_uid, str(s.first.StudyInstanceUID), str(s.first.FrameOfReferenceUID), s.modality,
                              tuple((str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in s.datasets))
    reg = DeformableRegistration(ref(current), ref(prior.series[0]), pre, grid, vectors)
    ds = encode_all([reg], {current.series_uid: current}, _ctx("dreg"))[0]
    path = _write([ds], tmp_path)[0]
    assert_valid_iod(path)
    back = pydicom.dcmread(path)
    item = back.DeformableRegistrationSequence[0]
    assert item.SourceFrameOfReferenceUID == prior.series[0].first.FrameOfReferenceUID
    g_item = item.DeformableRegistrationGridSequence[0]
    data = np.frombuffer(g_item.VectorGridData, "<f4").reshape(*[int(v) for v in g_item.GridDimensions][::-1], 3)
    assert np.array_equal(data, vectors)


def test_deformation_grid_convention_read_per_the_standard(chest, tmp_path):
    """A known rotation + translation and a known displacement field, linear in space (so trilinear
    interpolation is exact), encoded and read back by the PS3.3 C.20.3.1 reader (pydicom + NumPy):
    every point maps to matrix^-1 (p + u(p)) in the moving Frame of Reference, Hilum's convention."""
    from tests.dreg_reader import map_registered_to_source

    _, current, prior = chest
    g = current.volume.geometry
    grid = Geometry(shape=(5, 7, 6), origin=g.origin, spacing=(g.spacing[0] * 20, g.spacing[1] * 16,
                                                               g.spacing[2] * 12), direction=g.direction)
    a = np.array([[0.02, -0.01, 0.03], [0.0, 0.015, -0.02], [0.01, 0.02, 0.025]])
    b = np.array([1.5, -2.0, 4.0])

    def u(points):
        return (points - np.asarray(g.origin)) @ a.T + b

    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    centres = grid.index_to_patient(np.stack([k, j, i], axis=-1).reshape(-1, 3)).reshape(*grid.shape, 3)
    vectors = u(centres.reshape(-1, 3)).reshape(*grid.shape, 3).astype(np.float32)
    c, s = np.cos(np.radians(7.0)), np.sin(np.radians(7.0))
    matrix = np.eye(4)  # moving → fixed: a rotation about z and a shift
    matrix[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    matrix[:3, 3] = (12.0, -8.0, 20.0)
    ref = lambda s_: SeriesRef(s_.series_uid, str(s_.first.StudyInstanceUID), str(s_.first.FrameOfReferenceUID),
                               s_.modality, tuple((str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in s_.datasets))
    reg = DeformableRegistration(ref(current), ref(prior.series[0]), matrix, grid, vectors)
    path = _write(encode_all([reg], {current.series_uid: current}, _ctx("dreg-convention")), tmp_path)[0]
    assert_valid_iod(path)
    rng = np.random.default_rng(1)
    inside = grid.index_to_patient(rng.uniform(0, 1, (50, 3)) * (np.asarray(grid.shape) - 1))
    expected = (inside + u(inside)) @ np.linalg.inv(matrix)[:3, :3].T + np.linalg.inv(matrix)[:3, 3]
    mapped = map_registered_to_source(path, str(prior.series[0].first.FrameOfReferenceUID), inside)
    assert np.abs(mapped - expected).max() <= 1e-3


def test_finer_than_the_working_grid_registers_there_and_delivers_at_full_size(tmp_path):
    """1.2 mm pixels: the handler registers on the ~2 mm working grid (blocks of 2x2 pixels) and
    makes its masks there, yet the resampled series is on the CT's own grid, the Spatial
    Registration maps the truth's landmarks within 1 mm when applied by hand, and the SR's residual
    (the body surfaces, no landmarks reach a handler) is small for a pair that only moved rigidly."""
    base = generate_ct(tmp_path / "base", seed=5, rows=320, cols=320, slices=36, pixel_spacing=1.2,
                       slice_thickness=7.5, nodules=0)
    fu = generate_breathing_followup(base, tmp_path / "fu", breathing_mm=0.0, rotation_deg=(1.0, -1.0, 4.0),
                                     shift_mm=(6.0, -5.0, 9.0))
    current, prior_series = load_series(fu.series_files()), load_series(base.series_files())
    prior = PriorStudy(base.study_uid, None, [prior_series])
    results = get_handler("registration")({"pair": "prior"}).run(
        HandlerInput(current.first.StudyInstanceUID, [current], priors=[prior]), lambda f, m: None)
    resampled = next(r for r in results if type(r).__name__ == "ResampledSeries")
    assert resampled.volume.geometry == current.volume.geometry
    datasets = encode_all(results, {current.series_uid: current}, _ctx("fine"))
    paths = _write(datasets, tmp_path)
    sro = next(ds for ds in datasets if ds.SOPClassUID == SRO)
    assert_valid_iod(paths[datasets.index(sro)])
    item = next(i for i in sro.RegistrationSequence if i.FrameOfReferenceUID == prior_series.first.FrameOfReferenceUID)
    m = np.array([float(v) for v in item.MatrixRegistrationSequence[0].MatrixSequence[0]
                  .FrameOfReferenceTransformationMatrix]).reshape(4, 4)
    truth = json.loads((fu.root / REGISTRATION_TRUTH).read_text())["landmarks"]
    fixed_pts, moving_pts = (np.array([p[k] for p in truth]) for k in ("fixed_mm", "moving_mm"))
    tre = np.linalg.norm(moving_pts @ m[:3, :3].T + m[:3, 3] - fixed_pts, axis=1)
    assert tre.mean() <= 1.0 and tre.max() <= 2.0, (tre.mean(), tre.max())
    sr = next(ds for ds in datasets if ds.Modality == "SR")
    mm = [float(e.value[0].NumericValue) for e in sr.iterall() if e.keyword == "MeasuredValueSequence" and e.value
          and e.value[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm"]
    assert len(mm) == 2 and mm[0] <= 1.5 and mm[0] <= mm[1] <= 4.0, mm
    text = " ".join(str(e.value) for e in sr.iterall() if e.keyword == "TextValue")
    assert "residual distance between the body mask surfaces" in text
