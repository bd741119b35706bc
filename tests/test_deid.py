"""De-identification: every attribute of the PS3.15 Annex E table handled as the profile file says,
references of SEG/RTSTRUCT/SR kept consistent, stable pseudonyms, burned-in refusal, and the
de-identifying C-STORE destination (over DICOM TLS) delivering to a real DCMTK storescp."""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import re
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_description, dictionary_has_tag, dictionary_VR
from pydicom.dataset import Dataset

from node.config import ConfigError, DimseDestination, load_settings
from node.deid import Deidentifier, Refused, load_profile
from node.deid.profile import PROFILES_DIR
from node.deliver.destinations import DimseStoreDestination, Item
from node.encoders import encode_all
from node.phantom import generate_ct
from node.results import LabelMap, Measurement, MeasurementGroup, MeasurementReport
from node.tls.certs import make_dev_pki
from node.volume import load_series
from tests.encoder_sources import anatomy_labels, context, segment_table
from tests.iod import assert_valid_iod
from tests.test_tls import tls_storescp

KEY = bytes.fromhex("5f" * 32)
OPTIONS = ("retain-longitudinal-modified-dates", "retain-patient-characteristics", "clean-descriptors")


# -- the profile table itself ------------------------------------------------------------------

def table(name: str) -> list[tuple[str, str, str]]:
    """(tag, action, name) rows of a profile file, parsed here independently of node.deid."""
    rows = []
    for line in (PROFILES_DIR / f"{name}.tsv").read_text().splitlines():
        if line and not line.startswith(("#", "@")):
            tag, action, attr = line.split("\t")
            rows.append((tag, action, attr))
    return rows


def test_basic_table_is_the_standard_one():
    rows = table("basic")
    assert len(rows) == 460 and len({t for t, _, _ in rows}) == 460
    by_tag = {t: a for t, a, _ in rows}
    # Spot checks against PS3.15 Table E.1-1 (2024b), "Basic Prof." column.
    assert by_tag["(0010,0010)"] == "Z" and by_tag["(0010,0020)"] == "Z" and by_tag["(0010,0030)"] == "Z"
    assert by_tag["(0008,0050)"] == "Z" and by_tag["(0008,0090)"] == "Z" and by_tag["(0008,0020)"] == "Z"
    assert by_tag["(0020,000D)"] == "U" and by_tag["(0008,0018)"] == "U" and by_tag["(0008,1155)"] == "U"
    assert by_tag["(0008,0080)"] == "X/Z/D" and by_tag["(0010,1000)"] == "X" and by_tag["(0040,A730)"] == "D"
    assert by_tag["(0008,1140)"] == "X/Z/U*" and by_tag["(0008,103E)"] == "X" and by_tag["private"] == "X"
    assert by_tag["(50xx,xxxx)"] == "X" and by_tag["(60xx,3000)"] == "X"
    # Every named tag is the attribute the row says (catches transcription slips).
    for tag, _, name in rows:
        m = re.fullmatch(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)", tag)
        if m:
            t = int(m.group(1) + m.group(2), 16)
            assert dictionary_has_tag(t) and re.sub(r"\W", "", dictionary_description(t)).lower() == re.sub(r"\W", "", name).lower()
    options = {o: {t: a for t, a, _ in table(o)} for o in OPTIONS}
    assert options["retain-patient-characteristics"]["(0010,1010)"] == "K"  # Patient's Age
    assert options["retain-longitudinal-modified-dates"]["(0008,0020)"] == "C"  # Study Date
    assert options["clean-descriptors"]["(0008,103E)"] == "C"  # Series Description
    assert all(t in by_tag for o in options.values() for t in o)


# -- every attribute, as the profile says ------------------------------------------------------

def expected_actions(options: tuple[str, ...]) -> dict[str, str]:
    actions: dict[str, str] = {}
    for name in ("basic", *options):
        for tag, action, _ in table(name):
            actions[tag] = action.split("/")[-1].rstrip("*")  # the documented choice among X/Z/D...
    actions["(0010,0010)"] = actions["(0010,0020)"] = "P"  # the project pseudonym layer
    return actions


def sample(vr: str, n: int):
    if vr == "SQ":
        item = Dataset()
        item.ReferencedSOPInstanceUID = f"1.2.826.0.1.999.{n}.1"
        item.CodeMeaning = "DOE finding"
        return [item]
    return {"UI": f"1.2.826.0.1.999.{n}", "DA": "20240102", "TM": "101500", "DT": "20240102101500",
            "PN": "DOE^JOHN", "AS": "045Y", "CS": "SECRET", "AE": "SECRETAE", "UR": "http://doe.example",
            "IS": "7", "DS": "7.5", "US": 7, "SS": 7, "UL": 7, "SL": 7, "UV": 7, "SV": 7, "FL": 7.5, "FD": 7.5,
            "AT": 0x00100010}.get(vr, b"\x01\x02\x03\x04\x05\x06\x07\x08" if vr.startswith("O") or vr == "UN"
                                  else f"DOE note {n}")


def uid_pseudonym(uid: str) -> str:
    return "2.25." + str(int.from_bytes(hmac.new(KEY, f"uid\x1f{uid}".encode(), hashlib.sha256).digest()[:16], "big"))


def full_dataset(actions: dict[str, str]) -> tuple[Dataset, dict[int, object]]:
    ds = Dataset()
    originals: dict[int, object] = {}
    for n, tag in enumerate(sorted(actions)):
        m = re.fullmatch(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)", tag)
        if not m or m.group(1) in ("0000", "0002"):  # command and file meta groups are not dataset content
            continue
        t = int(m.group(1) + m.group(2), 16)
        vr = dictionary_VR(t).split(" or ")[0]
        value = sample(vr, n)
        ds.add_new(t, vr, value)
        originals[t] = copy.deepcopy(value)  # apply() works in place
    ds.PatientName, ds.PatientID = "DOE^JOHN", "PAT-001"
    ds.add_new(0x00090010, "LO", "ACME")  # private creator and a private attribute
    ds.add_new(0x00091001, "LO", "DOE secret")
    ds.add_new(0x50003000, "OB", b"\x00\x01")  # curve data, overlay data and comments (repeating groups)
    ds.add_new(0x60003000, "OW", b"\x00\x01")
    ds.add_new(0x60004000, "LT", "DOE overlay")
    ds.Modality, ds.Manufacturer = "CT", "Synthetic"  # not listed: kept
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.add_new(0x00200242, "UI", "1.2.826.0.1.777")  # SOP Instance UID of Concatenation Source: unlisted UID
    return ds, originals


@pytest.mark.parametrize("options", [(), OPTIONS[:1], OPTIONS[1:2], OPTIONS[2:], OPTIONS],
                         ids=["basic", "dates", "patient", "descriptors", "all-options"])
def test_every_listed_attribute_is_handled_as_the_profile_says(options):
    actions = expected_actions(options)
    ds, originals = full_dataset(actions)
    out = Deidentifier(load_profile("basic", list(options)), KEY).apply(ds)
    pseudonym = "PSN-" + hmac.new(KEY, b"patient\x1fPAT-001", hashlib.sha256).hexdigest()[:20].upper()
    shifts = set()
    checked = 0
    for tag, action in actions.items():
        m = re.fullmatch(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)", tag)
        if not m or m.group(1) in ("0000", "0002"):
            continue
        t = int(m.group(1) + m.group(2), 16)
        original, vr = originals.get(t), dictionary_VR(t).split(" or ")[0]
        where = f"{tag} {dictionary_description(t)} ({action})"
        if action == "X":
            assert t not in out, where
        elif action == "Z":
            assert t in out and (len(out[t].value) == 0 if vr == "SQ" else out[t].value in (None, "", b"")), where
        elif action == "K":
            assert out[t].value == original, where
        elif action == "P":
            assert str(out[t].value) == pseudonym, where
        elif vr == "SQ":  # D, U, C on a sequence: kept, its items de-identified
            (item,) = out[t].value
            assert item.ReferencedSOPInstanceUID == uid_pseudonym(original[0].ReferencedSOPInstanceUID), where
        elif action == "U" or (action == "D" and vr == "UI"):
            assert out[t].value == uid_pseudonym(original), where
        elif action == "D":
            assert out[t].value not in (None, "", b"") and out[t].value != original, where
        elif action == "C" and vr in ("DA", "DT"):
            shifted = dt.datetime.strptime(str(out[t].value)[:8], "%Y%m%d")
            shifts.add((dt.datetime.strptime(original[:8], "%Y%m%d") - shifted).days)
            assert str(out[t].value)[8:] == original[8:], where  # the time of a DT is kept
        elif action == "C" and vr == "TM":
            assert out[t].value == original, where
        elif action == "C":
            text = str(out[t].value)
            assert text and "DOE" not in text.upper() and "JOHN" not in text.upper(), where
        else:
            raise AssertionError(f"untested action for {where}")
        checked += 1
    assert checked >= 450
    if "retain-longitudinal-modified-dates" in options:
        assert len(shifts) == 1 and 1 <= shifts.pop() <= 3650  # one shift for the whole patient
    # Outside the table: private and repeating-group attributes removed, the rest kept, UIDs mapped.
    assert all(t not in out for t in (0x00090010, 0x00091001, 0x50003000, 0x60003000, 0x60004000))
    assert out.Modality == "CT" and out.Manufacturer == "Synthetic" and out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert out[0x00200242].value == uid_pseudonym("1.2.826.0.1.777")
    # How it was de-identified, in the output (PS3.15 E.1.1, CID 7050 codes).
    assert out.PatientIdentityRemoved == "YES"
    codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    code_of = {"retain-longitudinal-modified-dates": "113107", "retain-patient-characteristics": "113108",
               "clean-descriptors": "113105"}
    assert codes == ["113100", *(code_of[o] for o in options)]
    assert out.LongitudinalTemporalInformationModified == ("MODIFIED" if OPTIONS[0] in options else "REMOVED")
    out.save_as(BytesIO(), implicit_vr=False, little_endian=True)  # still encodable


# -- results stay linked to their images --------------------------------------------------------

@pytest.fixture(scope="module")
def phantom_with_results(tmp_path_factory):
    """A small phantom CT and a SEG, an RTSTRUCT and a TID 1500 SR encoded for it by node/encoders."""
    ct = generate_ct(tmp_path_factory.mktemp("ct") / "study", seed=5, rows=64, cols=64, slices=12,
                     pixel_spacing=6.0, slice_thickness=10.0)
    series = load_series(ct.series_files())
    g = series.volume.geometry
    lm = LabelMap(series.series_uid, g, anatomy_labels(g.shape), segment_table(), description="CT anatomy",
                  encodings=("SEG", "RTSTRUCT"))
    report = MeasurementReport(series.series_uid, "ct-anatomy", (
        MeasurementGroup("Lung_L", "lung_left", (Measurement("volume", 2345.25, "ml"),), segment_label=4),),
        title="CT anatomy measurements")
    results = encode_all([lm, report], {series.series_uid: series}, context())
    return ct, series, results, lm


def _uids(ds: Dataset) -> set[str]:
    found: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            found.update(str(v) for v in (elem.value if elem.VM > 1 else [elem.value]))
    return found


def test_results_reference_the_deidentified_images(phantom_with_results, tmp_path):
    ct, series, results, lm = phantom_with_results
    deid = Deidentifier(load_profile("basic", ["retain-longitudinal-modified-dates"]), KEY)
    images = [deid.apply(pydicom.dcmread(f)) for f in ct.series_files()]
    outputs = {r.Modality: deid.apply(pydicom.dcmread(_saved(r, tmp_path / "in"))) for r in results}
    seg, rt, sr = outputs["SEG"], outputs["RTSTRUCT"], outputs["SR"]
    image_uids = {d.SOPInstanceUID for d in images}
    original_uids = {str(pydicom.dcmread(f).SOPInstanceUID) for f in ct.series_files()}
    assert not image_uids & original_uids
    (study,), (for_uid,), (patient,) = ({d.StudyInstanceUID for d in images}, {d.FrameOfReferenceUID for d in images},
                                        {d.PatientID for d in images})
    for out in outputs.values():
        assert out.StudyInstanceUID == study and out.PatientID == patient
        leaked = _uids(out) & (original_uids | {series.series_uid, str(series.first.StudyInstanceUID)})
        assert not leaked, f"{out.Modality} still carries original UIDs {leaked}"
    # SEG: series, per-frame source images and frame of reference point at the de-identified CT.
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == images[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == for_uid
    frame_sources = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                     for f in seg.PerFrameFunctionalGroupsSequence}
    assert frame_sources and frame_sources <= image_uids
    # ...so highdicom decodes it on the de-identified images to exactly the original labels.
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    deid_uid = {str(d.SOPInstanceUID): uid_pseudonym(str(d.SOPInstanceUID)) for d in series.datasets}
    stack = hd.seg.segread(seg_path).get_pixels_by_source_instance(
        source_sop_instance_uids=[deid_uid[str(d.SOPInstanceUID)] for d in series.datasets],
        segment_numbers=[1, 2, 3], combine_segments=False)
    labels = np.zeros(stack.shape[:3], dtype=lm.labels.dtype)
    for i, segment in enumerate(lm.segments):
        labels[stack[..., i] > 0] = segment.label
    assert np.array_equal(labels, lm.labels)
    # RTSTRUCT: contour images and frame of reference.
    contour_images = {ci.ReferencedSOPInstanceUID for roi in rt.ROIContourSequence for c in roi.ContourSequence
                      for ci in c.ContourImageSequence}
    assert contour_images and contour_images <= image_uids
    assert rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == for_uid
    assert {r.ReferencedFrameOfReferenceUID for r in rt.StructureSetROISequence} == {for_uid}
    # SR: the image library and the segment reference point at the de-identified CT and SEG.
    sr_refs = {e.value for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert seg.SOPInstanceUID in sr_refs and sr_refs <= image_uids | {seg.SOPInstanceUID}
    for out in (*images[:2], seg, rt, sr):
        assert_valid_iod(_saved(out, tmp_path / "out"))


def _saved(ds: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# -- pseudonyms ---------------------------------------------------------------------------------

def _patient_ds(patient_id: str, study_date: str) -> Dataset:
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.StudyDate = patient_id, "DOE^JOHN", study_date
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    return ds


def test_same_patient_same_pseudonym_every_time(tmp_path):
    key_file = tmp_path / "project.key"
    key_file.write_text(KEY.hex())
    key_file.chmod(0o600)
    profile = ["retain-longitudinal-modified-dates"]
    cfg = load_settings(destinations={"x": {"ae_title": "X", "host": "h", "port": 104, "deidentify": {
        "options": profile, "project_key_file": str(key_file)}}}).destinations["x"].deidentify
    from node.deid import from_config

    site_a, site_b = from_config(cfg), from_config(cfg)  # two sites, or two runs, with the project key
    first = site_a.apply(_patient_ds("PAT-001", "20240102"))
    followup = site_b.apply(_patient_ds("PAT-001", "20240402"))
    other = site_a.apply(_patient_ds("PAT-002", "20240102"))
    assert first.PatientID == followup.PatientID == first.PatientName != other.PatientID
    assert first.PatientID.startswith("PSN-") and "PAT-001" not in first.PatientID
    days = lambda d: dt.datetime.strptime(d.StudyDate, "%Y%m%d")  # noqa: E731
    assert (days(followup) - days(first)).days == 91  # the interval between the studies survives
    assert first.StudyDate != "20240102"
    other_project = Deidentifier(load_profile("basic", profile), b"\x01" * 32).apply(_patient_ds("PAT-001", "20240102"))
    assert other_project.PatientID != first.PatientID  # another project key: unlinkable
    uid = "1.2.826.0.1.3680043.2.1125.1"
    assert site_a.pseudonyms.uid(uid) == site_b.pseudonyms.uid(uid) != uid
    assert site_a.pseudonyms.uid("1.2.840.10008.1.4.1.1") == "1.2.840.10008.1.4.1.1"  # a well-known frame


# -- burned-in annotation ----------------------------------------------------------------------

def _image(modality: str, sop_class: str = "1.2.840.10008.5.1.4.1.1.2", burned: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.SOPClassUID, ds.SOPInstanceUID = modality, sop_class, pydicom.uid.generate_uid()
    ds.PatientID, ds.PixelData = "P", b"\x00\x00"
    if burned is not None:
        ds.BurnedInAnnotation = burned
    return ds


def test_burned_in_annotation_is_refused_unless_allowed():
    deid = Deidentifier(load_profile(), KEY)
    with pytest.raises(Refused, match="BurnedInAnnotation is YES"):
        deid.apply(_image("CT", burned="YES"))
    with pytest.raises(Refused, match="ultrasound"):
        deid.apply(_image("US", "1.2.840.10008.5.1.4.1.1.6.1", burned="NO"))
    with pytest.raises(Refused, match="secondary capture"):
        deid.apply(_image("OT", "1.2.840.10008.5.1.4.1.1.7", burned="NO"))
    assert deid.apply(_image("CT", burned="NO")).PatientIdentityRemoved == "YES"
    assert deid.apply(_image("CT")).PatientIdentityRemoved == "YES"
    allowing = Deidentifier(load_profile(), KEY, frozenset({"SC"}))
    assert allowing.apply(_image("OT", "1.2.840.10008.5.1.4.1.1.7", burned="YES")).PatientIdentityRemoved == "YES"
    with pytest.raises(Refused):
        allowing.apply(_image("US", "1.2.840.10008.5.1.4.1.1.6.1"))
    no_pixels = _image("SR", "1.2.840.10008.5.1.4.1.1.88.34")
    del no_pixels.PixelData
    assert deid.apply(no_pixels).PatientIdentityRemoved == "YES"


def test_clean_descriptors_scrub_identifying_words():
    ds = _patient_ds("PAT-001", "20240102")
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.SeriesDescription = "Chest DOE pat-001 St Elsewhere Hospital follow-up"
    ds.StudyDescription = "CT CHEST"
    out = Deidentifier(load_profile("basic", ["clean-descriptors"]), KEY).apply(ds)
    assert out.SeriesDescription == "Chest *** *** *** follow-up" and out.StudyDescription == "CT CHEST"
    assert "InstitutionName" in out and out.InstitutionName == "ANONYMIZED"  # X/Z/D: D


# -- configuration and the destination --------------------------------------------------------

def test_configuration_errors_name_the_field(tmp_path):
    key_file = tmp_path / "k"
    key_file.write_text(KEY.hex())
    key_file.chmod(0o600)
    dest = {"ae_title": "X", "host": "h", "port": 104}
    with pytest.raises(ConfigError, match=r"destinations\.x\.deidentify\.profile: .*neither a built-in profile"):
        load_settings(destinations={"x": {**dest, "deidentify": {"profile": "nope", "project_key_file": str(key_file)}}})
    with pytest.raises(ConfigError, match=r"destinations\.x\.deidentify\.project_key_file: .*does not exist"):
        load_settings(destinations={"x": {**dest, "deidentify": {"project_key_file": str(tmp_path / "none")}}})
    key_file.chmod(0o644)
    cfg = load_settings(destinations={"x": {**dest, "deidentify": {"project_key_file": str(key_file)}}})
    from node.deliver.destinations import build_destinations

    with pytest.raises(ValueError, match=r"destinations\.x\.deidentify\.project_key_file: .*readable by group"):
        build_destinations(None, cfg.destinations, "HILUM")


def test_deidentifying_tls_destination_delivers_to_storescp(phantom_with_results, tmp_path):
    ct, series, results, _ = phantom_with_results
    pki = make_dev_pki(tmp_path / "pki", cn="localhost")
    key_file = tmp_path / "project.key"
    key_file.write_text(KEY.hex())
    key_file.chmod(0o600)
    files = ct.series_files()[:3]
    burned = tmp_path / "burned.dcm"
    b = pydicom.dcmread(files[0])
    b.SOPInstanceUID = b.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    b.BurnedInAnnotation = "YES"
    b.save_as(burned, enforce_file_format=True)
    items = [Item(str(pydicom.dcmread(f).SOPInstanceUID), str(f), "original") for f in [*files, burned]]
    with tls_storescp(tmp_path / "central", pki, ae_title="CENTRAL") as port:
        dest = DimseStoreDestination(DimseDestination(
            ae_title="CENTRAL", host="localhost", port=port, calling_ae_title="SITE_A",
            tls={"ca": pki["ca"], "cert": pki["server"], "key": pki["server_key"]},
            deidentify={"project_key_file": key_file}), "HILUM")
        assert dest.deidentifies
        sent = dest.send(items)
    assert sent == {it.sop_uid for it in items[:3]}  # the burned-in one is held back
    # ... and failed at once with the profile's reason (the peer never saw it: not a retry's matter)
    assert list(sent.refused) == [items[3].sop_uid]
    assert sent.refused[items[3].sop_uid].startswith("not sent: de-identification refused it: ")
    assert "BurnedInAnnotation is YES" in sent.refused[items[3].sop_uid]
    received = [pydicom.dcmread(p) for p in (tmp_path / "central").iterdir()]
    assert len(received) == 3
    by_new = {uid_pseudonym(str(pydicom.dcmread(f).SOPInstanceUID)): f for f in files}
    assert {ds.SOPInstanceUID for ds in received} == set(by_new)
    for ds in received:
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID.startswith("PSN-")
        assert str(ds.PatientName) == ds.PatientID != str(series.first.PatientID) and not ds.get("PatientBirthDate")
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(by_new[ds.SOPInstanceUID]).pixel_array)


@pytest.mark.slow
def test_multi_centre_export_between_two_hilum_nodes(phantom_with_results, tmp_path):
    """Site node → 'hilum' destination (TLS + de-identification) → central node with mutual TLS and
    the site's AE bound to its certificate; both audit trails tell the story."""
    import textwrap

    from node.audit import ChainedLog, search
    from node.keyfile import read_key
    from node.store.index import Index
    from tests.nodeproc import free_port, running_node, storescu, wait_for

    ct, series, _, _ = phantom_with_results
    pki = make_dev_pki(tmp_path / "pki", cn="localhost", client_cn="site-a")
    key_file = tmp_path / "project.key"
    key_file.write_text(KEY.hex())
    key_file.chmod(0o600)
    tls_port = free_port()
    (tmp_path / "central-rules").mkdir()
    site_rules = tmp_path / "site-rules"
    site_rules.mkdir()
    (site_rules / "export.yaml").write_text(textwrap.dedent("""\
        - name: to-central
          match: {Modality: CT}
          destinations: [central]
        """))
    central_cfg = {"dicom_tls": {"port": tls_port, "cert": str(pki["server"]), "key": str(pki["server_key"]),
                                 "ca": str(pki["ca"]), "bind_ae_to_cert": {"SITE_A": "site-a"}},
                   "audit": {"key_file": str(tmp_path / "keys" / "central.key")}}
    site_cfg = {"destinations": {"central": {
        "type": "hilum", "ae_title": "HILUM", "host": "127.0.0.1", "port": tls_port, "calling_ae_title": "SITE_A",
        "tls": {"ca": str(pki["ca"]), "cert": str(pki["client"]), "key": str(pki["client_key"])},
        "deidentify": {"options": ["retain-longitudinal-modified-dates"], "project_key_file": str(key_file)}}},
        "audit": {"key_file": str(tmp_path / "keys" / "site.key")}}
    study = uid_pseudonym(str(series.first.StudyInstanceUID))
    with running_node(tmp_path / "central", tmp_path / "central-rules", **central_cfg) as central, \
            running_node(tmp_path / "site", site_rules, **site_cfg) as site:
        assert storescu(site.dicom_port, ct.series_files()).returncode == 0
        got = wait_for(lambda: central.study(study).get("instances_received") == len(ct.series_files())
                       and central.study(study), 90, "the de-identified study at the central node", interval=0.5)
        assert got["patient_id"].startswith("PSN-")
    index = Index(tmp_path / "central" / "index.db")
    (row,) = index.series_of_study(study)
    assert row["calling_ae"] == "SITE_A"  # the central node records the sending site
    assert all(str(series.first.PatientID) not in (r["patient_id"] or "") for r in [index.study(study)])
    central_log = ChainedLog(tmp_path / "central" / "audit" / "audit.jsonl",
                             read_key(tmp_path / "keys" / "central.key", "audit.key_file"))
    assocs = search(central_log.entries(), event="association", user="SITE_A")
    assert assocs and all(e["tls_identity"] == "site-a" and e["outcome"] == 0 for e in assocs)
    site_log = ChainedLog(tmp_path / "site" / "audit" / "audit.jsonl",
                          read_key(tmp_path / "keys" / "site.key", "audit.key_file"))
    exports = search(site_log.entries(), event="delivery", study_uid=str(series.first.StudyInstanceUID))
    central_exports = [e for e in exports if e["destination"] == "central"]
    assert central_exports and all(e["event_id"]["code"] == "110106" for e in central_exports)  # Export
    # Each instance exported once; an attempt the peer refused is audited with its outcome and retried.
    assert sum(e["objects"] for e in central_exports if e["outcome"] == 0) == len(ct.series_files())
