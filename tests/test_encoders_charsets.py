"""Imperfect sources: odd character sets, missing Type 2 attributes, an enhanced multi-frame CT.

Every object the encoders make from them must validate and carry the patient's name unchanged.
"""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from node.encoders import encode_all
from node.results import (
    ImageSeries,
    LabelMap,
    Measurement,
    MeasurementGroup,
    MeasurementReport,
    TextFinding,
)
from node.volume import load_series
from tests.encoder_sources import anatomy_labels, context, ct_series, save_valid, segment_table, write_enhanced_ct

CHARSETS = {
    "latin1": ("ISO_IR 100", "Müller^Jürgen"),
    "utf8": ("ISO_IR 192", "Wang^XiaoDong=王^小東"),
    "jis": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
}
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _results(series):
    g = series.volume.geometry
    return [
        LabelMap(series.series_uid, g, anatomy_labels(g.shape), segment_table(), description="Anatomie (Lunge)"),
        MeasurementReport(series.series_uid, "ct-anatomy", (
            MeasurementGroup("Lung_L", "lung_left", (Measurement("volume", 1500.0, "ml"),), segment_label=4),)),
        TextFinding("Keine Infiltrate, unauffällig.", series.series_uid),
        ImageSeries(series.series_uid, "MIP", np.zeros((2, 16, 16), dtype=np.uint8), multiframe=True),
        ImageSeries(series.series_uid, "Key image", np.zeros((1, 16, 16, 3), dtype=np.uint8)),
    ]


@pytest.mark.parametrize("name", sorted(CHARSETS))
def test_character_sets_are_kept(tmp_path, name):
    charset, patient = CHARSETS[name]
    series = ct_series(tmp_path / "src", charset=charset, patient_name=patient, seed=name)
    out = encode_all(_results(series), {series.series_uid: series}, context())
    assert [d.Modality for d in out] == ["SEG", "RTSTRUCT", "SR", "OT", "OT"]
    for ds in out:
        r = pydicom.dcmread(save_valid(ds, tmp_path / "out", f"{ds.SOPInstanceUID}.dcm"))
        assert str(r.PatientName) == patient, ds.Modality
        if name == "latin1":  # the German text fits Latin-1: the source's charset stays
            assert r.SpecificCharacterSet == charset
        else:
            assert r.SpecificCharacterSet in (charset, "ISO_IR 192")


def test_text_beyond_the_source_charset_switches_to_utf8(tmp_path):
    series = ct_series(tmp_path / "src", charset="ISO_IR 100", patient_name="Müller^Jürgen", seed="mix")
    texts = [TextFinding("Befund: 肺結節なし", series.series_uid)]
    (ds,) = encode_all(texts, {series.series_uid: series}, context())
    r = pydicom.dcmread(save_valid(ds, tmp_path))
    assert r.SpecificCharacterSet == "ISO_IR 192"
    assert str(r.PatientName) == "Müller^Jürgen" and r.ContentSequence[0].TextValue == texts[0].text


def test_missing_type2_attributes_are_added_empty(tmp_path):
    series = ct_series(tmp_path / "src", drop=TYPE2, seed="bare")
    assert not any(k in series.first for k in TYPE2)
    out = encode_all(_results(series), {series.series_uid: series}, context())
    for ds in out:
        r = pydicom.dcmread(save_valid(ds, tmp_path / "out", f"{ds.SOPInstanceUID}.dcm"))
        for keyword in TYPE2:
            assert keyword in r and not r[keyword].value, (ds.Modality, keyword)
        assert r.StudyInstanceUID == series.first.StudyInstanceUID
    assert not any(k in series.first for k in TYPE2)  # the source header is untouched


def test_enhanced_multiframe_source(tmp_path):
    series = load_series([write_enhanced_ct(tmp_path / "src")])
    assert series.volume is None and int(series.first.NumberOfFrames) == 4
    sources = {series.series_uid: series}
    report = MeasurementReport(series.series_uid, "ct-anatomy", (
        MeasurementGroup("Lungs", "lungs", (Measurement("left_right_ratio", 1.02, "1"),)),))
    images = ImageSeries(series.series_uid, "Render", np.full((2, 16, 16), 7, dtype=np.uint8))
    out = encode_all([report, images, TextFinding("Enhanced CT read.", series.series_uid)], sources, context())
    assert [d.Modality for d in out] == ["SR", "OT", "OT"]
    for ds in out:
        r = pydicom.dcmread(save_valid(ds, tmp_path / "out", f"{ds.SOPInstanceUID}.dcm"))
        assert r.StudyInstanceUID == series.first.StudyInstanceUID and r.PatientName == series.first.PatientName
    from node.volume import Geometry

    g = Geometry(shape=(4, 32, 32), origin=(0, 0, 0), spacing=(1, 1, 1), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    lm = LabelMap(series.series_uid, g, np.zeros(g.shape, dtype=np.uint8), segment_table())
    with pytest.raises(ValueError, match="multi-frame"):
        encode_all([lm], sources, context())
