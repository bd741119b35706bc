"""Facts: attribute lookup by keyword/tag/private tag, derived attributes, persistence."""
from __future__ import annotations

import io
import json
import time
from datetime import datetime, timezone

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.rules.facts import SeriesFacts, StudyFacts, parse_time_of_day, to_number
from tests.test_rules_support import (AXIAL, CORONAL, SAGITTAL, ct_header, cr_header, facts, mr_header, roundtrip)


def test_lookup_by_keyword_tag_and_private_tag():
    f = facts(ct_header())
    assert f.get("Modality") == ("CT",)
    assert f.get("SliceThickness") == (1.6,)  # written '1.6000' in the file
    assert f.get("0018,0050") == f.get("(0018,0050)") == f.get("00180050") == (1.6,)
    assert f.get("0009,1001") == ("lung-protocol",)
    assert f.get("0009,1002") == (2.5,)  # private DS, converted like a standard one
    assert f.get("ImageType") == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert f.get("PixelSpacing") == (0.7, 0.8)
    assert f.get("PatientName") == ("PHANTOM^CHEST",)
    assert f.get("BodyPartExamined") == ("CHEST",)
    assert f.get("ContrastBolusAgent") == ()  # absent: no values, no exception


def test_unknown_name_raises_with_suggestion():
    with pytest.raises(ValueError, match="did you mean 'Modality'"):
        facts(ct_header()).get("Modalty")


def test_private_un_element_is_decoded_as_text():
    ds = ct_header()
    ds.add_new(0x00111001, "UN", b"ACME\\PROTO 7 ")
    f = facts(ds)
    assert f.get("0011,1001") == ("ACME", "PROTO 7")


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_invalid_ds_in_file_is_kept_as_text_not_an_error():
    ds = ct_header()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    broken = buf.getvalue().replace(b"1.6000", b"ab.cde")
    f = facts(pydicom.dcmread(io.BytesIO(broken), stop_before_pixels=True))
    assert f.get("SliceThickness") == ("ab.cde",)
    assert f.get("Modality") == ("CT",)


@pytest.mark.parametrize("iop, expected", [
    (AXIAL, "axial"),
    (CORONAL, "coronal"),
    (SAGITTAL, "sagittal"),
    (["1", "0", "0", "0", "0.9659", "-0.2588"], "axial"),  # 15 degree gantry tilt is still axial
    (["1", "0", "0", "0", "0.7071", "-0.7071"], "oblique"),  # 45 degrees
])
def test_orientation(iop, expected):
    assert facts(ct_header(ImageOrientationPatient=iop)).get("orientation") == (expected,)


def test_orientation_missing_without_iop():
    assert facts(cr_header()).get("orientation") == ()


def test_orientation_from_enhanced_shared_functional_groups():
    plane = Dataset()
    plane.ImageOrientationPatient = CORONAL
    shared = Dataset()
    shared.PlaneOrientationSequence = [plane]
    ds = ct_header(ImageOrientationPatient=None, ImagePositionPatient=None)
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.NumberOfFrames = "200"
    f = facts(roundtrip(ds), instance_count=1)
    assert f.get("orientation") == ("coronal",)
    assert f.get("is_volume") == (True,)  # one instance, 200 frames


@pytest.mark.parametrize("make, count, flag, expected", [
    (ct_header, 120, None, True),
    (ct_header, 1, None, False),  # a single slice is not a volume
    (ct_header, 120, False, False),  # the spine knows better (e.g. irregular spacing)
    (cr_header, 3, None, False),  # projection images have no plane geometry
    (lambda: ct_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), 3, None, False),
])
def test_is_volume(make, count, flag, expected):
    assert facts(make(), instance_count=count, is_volume=flag).get("is_volume") == (expected,)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("attrs, expected", [
    ({"PatientAge": "045Y"}, 45.0),
    ({"PatientAge": "006M"}, 0.5),
    ({"PatientAge": "026W"}, 26 / (365.25 / 7)),
    ({"PatientAge": None, "PatientBirthDate": "19800615", "StudyDate": "20250312"}, 44.0),
    ({"PatientAge": None, "PatientBirthDate": "19800312", "StudyDate": "20250312"}, 45.0),  # birthday
    ({"PatientAge": None, "PatientBirthDate": None}, None),
    ({"PatientAge": "45", "PatientBirthDate": None}, None),  # malformed age string, no birth date
])
def test_patient_age(attrs, expected):
    vals = facts(mr_header(**attrs)).get("patient_age")
    assert vals == (() if expected is None else (pytest.approx(expected),))


def test_arrival_and_network_facts():
    f = facts(ct_header(), arrived_at=datetime(2025, 3, 15, 22, 5, 9))  # a Saturday night
    assert f.get("arrival_time") == ("22:05:09",)
    assert f.get("arrival_weekday") == ("Sat",)
    assert f.get("calling_ae") == ("CT_SCANNER_1",)
    assert f.get("called_ae") == ("HILUM",)
    assert f.get("source_ip") == ("10.1.2.3",)
    assert f.get("instance_count") == (120,)


def test_aware_arrival_time_is_node_local(monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        f = facts(ct_header(), arrived_at=datetime(2025, 1, 10, 17, 30, tzinfo=timezone.utc))
        assert f.get("arrival_time") == ("18:30:00",)  # CET is UTC+1 in January
    finally:
        monkeypatch.undo()
        time.tzset()


def test_json_roundtrip_keeps_every_lookup_and_no_pixels():
    ds = ct_header()
    ds.add_new(0x00131010, "OB", b"\x01" * 5000)  # a vendor blob: bulk data, not kept
    ds.add_new(0x00131011, "OB", b"\x02" * 10)
    f = facts(ds, is_volume=True)
    text = f.to_json()
    assert len(text) < 4000 and "AQEBAQEB" not in text  # the 5000-byte blob is not inlined
    g = SeriesFacts.from_json(text)
    for name in ("Modality", "SliceThickness", "0009,1001", "ImageType", "orientation", "is_volume",
                 "patient_age", "arrival_time", "arrival_weekday", "calling_ae", "instance_count", "0013,1011"):
        assert g.get(name) == f.get(name), name
    assert g.get("0013,1010") == ("(bulk data, not kept)",)  # exists, value not kept
    assert json.loads(text)["format"] == 1


def test_from_json_rejects_unknown_format():
    with pytest.raises(ValueError, match="unknown format"):
        SeriesFacts.from_json('{"format": 99}')


def test_pixel_data_is_not_kept():
    ds = ct_header()
    ds.BitsAllocated = 16
    ds.PixelData = b"\0" * 4096
    f = facts(ds)
    assert "7FE00010" not in f.header and "7FE00010" in f.omitted


def test_study_facts_union_and_counts():
    ct = facts(ct_header(), instance_count=120)
    mr = facts(mr_header(study=ct.study_uid), instance_count=176)
    st = StudyFacts([ct, mr])
    assert st.study_uid == ct.study_uid
    assert st.get("Modality") == ("CT", "MR")
    assert st.get("series_count") == (2,)
    assert st.get("instance_count") == (296,)
    assert st.get("PatientName") == ("PHANTOM^CHEST",)  # equal values appear once
    assert set(st.get("orientation")) == {"axial", "sagittal"}


@pytest.mark.parametrize("text, expected", [
    ("1.6000", 1.6), (" 2 ", 2.0), ("+1.5E+00", 1.5), ("abc", None), ("nan", None), ("", None),
])
def test_to_number(text, expected):
    assert to_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("18:00", 64800), ("07:30:15", 27015), ("183000", 66600), ("1830", 66600), ("183000.5", 66600.5),
    ("25:00", None), ("18h", None), ("1", None),
])
def test_parse_time_of_day(text, expected):
    assert parse_time_of_day(text) == expected
