"""TID 1500 SR: every value, unit, code and reference read back equals what the handler returned."""
from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from scipy import ndimage

from node.encoders import encode_all
from node.encoders.seg import encode_seg
from node.encoders.sr import KEY_SLICE_PREFIX, encode_measurement_sr, encode_text_sr
from node.encoders.sr_templates import TemplateError, load_template
from node.results import LabelMap, Measurement, MeasurementGroup, MeasurementReport, TextFinding
from tests.encoder_sources import anatomy_labels, context, ct_series, save_valid, segment_table


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return ct_series(tmp_path_factory.mktemp("src"))


def _labelmap(source) -> LabelMap:
    g = source.volume.geometry
    return LabelMap(source.series_uid, g, anatomy_labels(g.shape), segment_table(), description="CT anatomy")


def _report(source) -> MeasurementReport:
    return MeasurementReport(source.series_uid, "ct-anatomy", (
        MeasurementGroup("External", "external", (Measurement("volume", 23456.7, "ml"),), segment_label=1),
        MeasurementGroup("Lung_L", "lung_left", (
            Measurement("volume", 2345.25, "ml"),
            Measurement("hu_mean", -842.5, "[hnsf'U]"),
            Measurement("hu_sd", 61.0, "[hnsf'U]"),
        ), segment_label=4),
        MeasurementGroup("Lungs", "lungs", (Measurement("left_right_ratio", 0.91, "1"),)),
    ), title="CT anatomy measurements")


def _items(ds, code: str):
    return [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code]


def test_ohif_structure_and_read_back(source, tmp_path):
    lm, report = _labelmap(source), _report(source)
    sources = {source.series_uid: source}
    seg, seg_ref = encode_seg(lm, sources, context(), series_number=9000)
    sr = encode_measurement_sr(report, sources, context(), series_number=9003, segs=[seg_ref])
    path = save_valid(sr, tmp_path)
    raw = pydicom.dcmread(path)

    # The OHIF measurement contract, checked on the raw content tree.
    assert raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert raw.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert raw.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (measurements,) = _items(raw, "126010")
    groups = _items(measurements, "125007")
    # A key-slice group (OHIF's outline) precedes each group about a segment; same tracking UID.
    expected_ids = [KEY_SLICE_PREFIX + "External", "External", KEY_SLICE_PREFIX + "Lung_L", "Lung_L", "Lungs"]
    assert [_items(g, "112039")[0].TextValue for g in groups] == expected_ids
    uids = [_items(g, "112040")[0].UID for g in groups]
    assert all(uids) and uids[0] == uids[1] and uids[2] == uids[3] and len(set(uids)) == 3

    template = load_template("ct-anatomy")
    doc = hd.sr.srread(path)
    volumetric = doc.content.get_volumetric_roi_measurement_groups()
    plain = [g for g in doc.content.get_image_measurement_groups()
             if not g.tracking_identifier.startswith(KEY_SLICE_PREFIX)]
    assert [g.tracking_identifier for g in volumetric] == ["External", "Lung_L"]
    assert [g.tracking_identifier for g in plain] == ["Lungs"]
    for got, expected in zip([*volumetric, *plain], report.groups):
        finding = template.finding(expected.finding)
        assert (got.finding_type.value, got.finding_type.scheme_designator) == (finding.type.value, "SCT")
        assert got.finding_category.value == finding.category.value
        if finding.site:
            assert got.finding_sites[0].value.value == finding.site.value
        values = got.get_measurements()
        assert len(values) == len(expected.measurements)
        for m, e in zip(values, expected.measurements):
            concept = template.measurement(e)
            assert m.value == pytest.approx(e.value, rel=1e-12)
            assert (m.unit.value, m.unit.scheme_designator) == (e.unit, "UCUM")
            assert (m.name.value, m.name.scheme_designator) == (concept.concept.value, concept.concept.scheme)
            if concept.derivation:
                assert m.derivation.value == concept.derivation.value
    # Groups about segments point at the SEG instance and segment, and share its tracking UIDs.
    for got, label in zip(volumetric, (1, 4)):
        ref = got.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [seg_ref.segment_numbers[label]]
        assert got.tracking_uid == seg_ref.tracking_uid(label)
    evidence = {i.ReferencedSOPInstanceUID for s in raw.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence and source.datasets[0].SOPInstanceUID in evidence
    assert raw.StudyInstanceUID == source.first.StudyInstanceUID
    assert raw.SeriesDescription == "AI: CT anatomy measurements (SR)"
    assert raw.PreliminaryFlag == "PRELIMINARY" and raw.VerificationFlag == "UNVERIFIED"
    assert any(e.Manufacturer == "Hilum" and "chest-ct-anatomy" in e.ContributionDescription
               for e in raw.ContributingEquipmentSequence)


def _key_slice_groups(raw) -> dict[str, Dataset]:
    (measurements,) = _items(raw, "126010")
    groups = {_items(g, "112039")[0].TextValue: g for g in _items(measurements, "125007")}
    return {k[len(KEY_SLICE_PREFIX):]: g for k, g in groups.items() if k.startswith(KEY_SLICE_PREFIX)}


def test_key_slice_outline_of_each_segment(source, tmp_path):
    """Each segment's largest slice: its outer outline, the area it encloses and the mean HU inside."""
    lm, report = _labelmap(source), _report(source)
    sources = {source.series_uid: source}
    _, seg_ref = encode_seg(lm, sources, context(), series_number=9000)
    raw = pydicom.dcmread(save_valid(encode_measurement_sr(report, sources, context(), series_number=9003,
                                                           segs=[seg_ref]), tmp_path))
    key_groups = _key_slice_groups(raw)
    assert set(key_groups) == {"External", "Lung_L"}  # "Lungs" has no segment: no outline
    row_mm, col_mm = (float(v) for v in source.first.PixelSpacing)
    for tracking_id, label in (("External", 1), ("Lung_L", 4)):
        group = key_groups[tracking_id]
        area, mean = _items(group, "42798000")[0], _items(group, "112031")[0]
        assert group.ContentSequence.index(area) < group.ContentSequence.index(mean)  # OHIF reads the first NUM
        # Both NUMs are inferred from the same closed polyline on one source image.
        scoords = [i for num in (area, mean) for i in num.ContentSequence if i.ValueType == "SCOORD"]
        assert len(scoords) == 2 and scoords[0].GraphicData == scoords[1].GraphicData
        scoord = scoords[0]
        assert scoord.RelationshipType == "INFERRED FROM" and scoord.GraphicType == "POLYLINE"
        points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
        assert np.array_equal(points[0], points[-1])
        sop = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        k = [str(ds.SOPInstanceUID) for ds in source.datasets].index(sop)
        mask = lm.labels == label
        per_slice = mask.sum(axis=(1, 2))
        assert per_slice[k] == per_slice.max(), f"{tracking_id}: slice {k} is not where the segment is largest"
        # The outline is the border of the slice's largest component: every vertex (SCOORD is
        # column\row, 0\0 the corner of the first pixel) lies between an inside and an outside pixel.
        components, _ = ndimage.label(mask[k])
        largest = components == np.bincount(components[components > 0]).argmax()
        rc = points[:-1, ::-1] - 0.5
        lo, hi = np.floor(rc).astype(int), np.ceil(rc).astype(int)
        padded = np.pad(largest, 1)
        assert all(padded[a[0] + 1, a[1] + 1] != padded[b[0] + 1, b[1] + 1] for a, b in zip(lo, hi))
        filled = ndimage.binary_fill_holes(largest)  # what the outline encloses
        x, y = points[:, 0] * col_mm, points[:, 1] * row_mm
        shoelace = 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]))
        assert area.MeasuredValueSequence[0].NumericValue == pytest.approx(shoelace, abs=0.005)
        assert shoelace == pytest.approx(filled.sum() * row_mm * col_mm, rel=0.03)
        hu = source.volume.array[k][filled].mean()
        assert mean.MeasuredValueSequence[0].NumericValue == pytest.approx(hu, abs=0.005)
        assert mean.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "[hnsf'U]"
    # The lung's slice holds two islands and a hole with bone in it: the outline is the ring's.
    assert ndimage.label(lm.labels[k] == 4)[1] == 2


def test_key_slice_groups_are_deterministic(source):
    lm, report = _labelmap(source), _report(source)
    sources = {source.series_uid: source}
    out = [encode_measurement_sr(report, sources, context(), series_number=9003,
                                 segs=[encode_seg(lm, sources, context(), series_number=9000)[1]])
           for _ in range(2)]
    assert out[0].ContentSequence == out[1].ContentSequence


def test_without_seg_groups_are_tid_1501(source, tmp_path):
    sr = encode_measurement_sr(_report(source), {source.series_uid: source}, context(), series_number=9003)
    doc = hd.sr.srread(save_valid(sr, tmp_path))
    groups = doc.content.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["External", "Lung_L", "Lungs"]


def test_text_findings_join_the_report(source, tmp_path):
    lm, report = _labelmap(source), _report(source)
    texts = [TextFinding("No focal consolidation.", source.series_uid),
             TextFinding("Lungs symmetric.", source.series_uid)]
    out = encode_all([texts[0], report, lm, texts[1]], {source.series_uid: source}, context())
    assert [d.Modality for d in out] == ["SEG", "RTSTRUCT", "SR"]
    raw = pydicom.dcmread(save_valid(out[2], tmp_path))
    (container,) = _items(raw, "C0034375")
    assert [i.TextValue for i in container.ContentSequence] == [t.text for t in texts]
    assert all(i.ConceptNameCodeSequence[0].CodeValue == "121071" for i in container.ContentSequence)


def test_text_only_sr(source, tmp_path):
    texts = [TextFinding("Motion artefacts; study of limited value.", source.series_uid)]
    raw = pydicom.dcmread(save_valid(encode_text_sr(texts, {source.series_uid: source}, context(),
                                                    series_number=9004), tmp_path))
    assert raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert [i.TextValue for i in raw.ContentSequence] == [texts[0].text]
    assert raw.SeriesDescription == "AI: ct-anatomy findings (SR)"


def test_qualitative_evaluations_come_from_the_template(source, tmp_path, monkeypatch):
    directory = tmp_path / "templates"
    directory.mkdir()
    (directory / "nodules.yaml").write_text("""
findings:
  nodule: {type: {scheme: SCT, value: "27925004", meaning: Nodule}}
measurements:
  diameter: {concept: {scheme: SCT, value: "81827009", meaning: Diameter}, unit: mm}
qualitative:
  concepts:
    shape: {scheme: SCT, value: "300842002", meaning: Shape}
  values:
    smooth: {scheme: SCT, value: "82280004", meaning: Smooth}
""")
    from node.encoders import sr_templates

    report = MeasurementReport(source.series_uid, "nodules", (
        MeasurementGroup("Nodule 1", "nodule", (Measurement("diameter", 7.5, "mm"),),
                         qualitative=(("shape", "smooth"),)),))
    monkeypatch.setattr(sr_templates, "TEMPLATE_DIR", directory)
    sr = encode_measurement_sr(report, {source.series_uid: source}, context(), series_number=9003)
    doc = hd.sr.srread(save_valid(sr, tmp_path))
    (group,) = doc.content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name.value, evaluation.value.value) == ("300842002", "82280004")
    assert group.get_measurements()[0].value == 7.5


def test_unmapped_names_fail_with_file_and_key(source):
    sources = {source.series_uid: source}
    unknown = MeasurementReport(source.series_uid, "ct-anatomy", (
        MeasurementGroup("Lung_L", "lung_left", (Measurement("sphericity", 0.8, "1"),)),))
    with pytest.raises(TemplateError, match=r"ct-anatomy\.yaml.*measurements.*'sphericity'"):
        encode_measurement_sr(unknown, sources, context(), series_number=9003)
    wrong_unit = MeasurementReport(source.series_uid, "ct-anatomy", (
        MeasurementGroup("Lung_L", "lung_left", (Measurement("volume", 2.3, "l"),)),))
    with pytest.raises(TemplateError, match=r"measurements\.volume is in 'ml'.*'l'"):
        encode_measurement_sr(wrong_unit, sources, context(), series_number=9003)
    bad_finding = MeasurementReport(source.series_uid, "ct-anatomy", (
        MeasurementGroup("Spleen", "spleen", (Measurement("volume", 200, "ml"),)),))
    with pytest.raises(TemplateError, match=r"findings.*'spleen'"):
        encode_measurement_sr(bad_finding, sources, context(), series_number=9003)
    missing = MeasurementReport(source.series_uid, "no-such-handler", _report(source).groups)
    with pytest.raises(TemplateError, match="does not exist"):
        encode_measurement_sr(missing, sources, context(), series_number=9003)


def test_ambiguous_segment_reference_is_refused(source):
    sources = {source.series_uid: source}
    lm = _labelmap(source)
    refs = [encode_seg(lm, sources, context(), series_number=n)[1] for n in (9000, 9001)]
    with pytest.raises(ValueError, match="segment_label 1 is defined by 2 label maps"):
        encode_measurement_sr(_report(source), sources, context(), series_number=9003, segs=refs)


def test_single_image_segmentation_is_referenced(tmp_path):
    series = ct_series(tmp_path / "one", slices=1, seed="single")
    from node.volume import Geometry

    ds = series.first
    geometry = Geometry(shape=(1, 64, 64), origin=tuple(float(v) for v in ds.ImagePositionPatient),
                        spacing=(0.8, 0.8, 2.5), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels = np.zeros((1, 64, 64), dtype=np.uint8)
    labels[0, 20:30, 20:40] = 4
    lm = LabelMap(series.series_uid, geometry, labels, segment_table())
    sources = {series.series_uid: series}
    seg, ref = encode_seg(lm, sources, context(), series_number=9000)
    report = MeasurementReport(series.series_uid, "ct-anatomy", (
        MeasurementGroup("Lung_L", "lung_left", (Measurement("volume", 1.6, "ml"),), segment_label=4),))
    sr = encode_measurement_sr(report, sources, context(), series_number=9003, segs=[ref])
    doc = hd.sr.srread(save_valid(sr, tmp_path))
    (group,) = doc.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert group.get_measurements()[0].value == pytest.approx(1.6)


def test_pixels_per_slice_counts_every_label_on_every_slice():
    """The key slices and a SEG's present segments come from these counts: the few-label path (a
    count per label and plane) and the many-label one (bincounts) agree with a direct count."""
    import numpy as np

    from node.encoders.common import count_per_slice, pixels_per_slice
    from tests.encoder_sources import context

    rng = np.random.default_rng(3)
    for top in (2, 6, 17, 40):
        labels = rng.integers(0, top, size=(7, 19, 23), dtype=np.uint8)
        counts = count_per_slice(labels)
        assert set(counts) == set(range(1, top))
        for v, per_slice in counts.items():
            assert per_slice.tolist() == [(plane == v).sum() for plane in labels], (top, v)
    flags = rng.random((4, 5, 6)) < 0.3
    assert count_per_slice(flags)[1].tolist() == flags.sum(axis=(1, 2)).tolist()
    # Counted once per job: a second encoder of the same job reads the first one's counts.
    ctx = context()
    assert pixels_per_slice(labels, ctx) is pixels_per_slice(labels, ctx)
    assert pixels_per_slice(labels.copy(), ctx) is not pixels_per_slice(labels, ctx)


def test_references_point_into_the_label_map_seg_and_the_body_seg(source, tmp_path):
    """seg_format "labelmap": the organs' groups reference the Label Map SEG, the External's the
    binary SEG of the body; each by the segment number it has there, with its tracking UID, and
    both SEGs are in the evidence. The key-slice outline of the External is the whole body."""
    import dataclasses

    body, lung, bone = segment_table()
    g = source.volume.geometry
    lm = LabelMap(source.series_uid, g, anatomy_labels(g.shape), (dataclasses.replace(body, includes=(4, 9)), lung, bone),
                  description="CT anatomy", encodings=("SEG",), seg_format="labelmap")
    organs_seg, body_seg, sr = encode_all([lm, _report(source)], {source.series_uid: source}, context())
    assert (organs_seg.SOPClassUID, body_seg.SOPClassUID) == ("1.2.840.10008.5.1.4.1.1.66.7",
                                                              "1.2.840.10008.5.1.4.1.1.66.4")
    path = save_valid(sr, tmp_path)  # dciodvfy: no errors (its Label Map SEG gap aside: tests/iod.py)
    doc = hd.sr.srread(path)
    refs = {g.tracking_identifier: g for g in doc.content.get_volumetric_roi_measurement_groups()}
    assert refs["External"].referenced_segment.referenced_sop_instance_uid == body_seg.SOPInstanceUID
    assert refs["External"].referenced_segment.referenced_segment_numbers == [1]
    assert refs["External"].tracking_uid == body_seg.SegmentSequence[0].TrackingUID
    assert refs["Lung_L"].referenced_segment.referenced_sop_instance_uid == organs_seg.SOPInstanceUID
    assert refs["Lung_L"].referenced_segment.referenced_sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.7"
    lung_item = next(s for s in organs_seg.SegmentSequence if s.SegmentLabel == lung.name)
    assert refs["Lung_L"].referenced_segment.referenced_segment_numbers == [int(lung_item.SegmentNumber)]
    assert refs["Lung_L"].tracking_uid == lung_item.TrackingUID
    raw = pydicom.dcmread(path)
    evidence = {i.ReferencedSOPInstanceUID for s in raw.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert {organs_seg.SOPInstanceUID, body_seg.SOPInstanceUID} <= evidence
