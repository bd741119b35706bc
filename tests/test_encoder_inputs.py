"""What a handler's results and a source's header may hold, and what the encoders write of them.

Results are validated at creation (node.results): text bound for an LO or SH attribute holds one
value (no backslash), no control character, and fits the VR in characters and in UTF-8 bytes; a
free-text finding holds only the control characters UT allows; a resampled series is CT or MR.
Every string an encoder writes - segment names, descriptions, the rule's and handler's names,
quality warnings added afterwards - is in the character set the object declares. A source header
that breaks the standard (two patient names, a misspelt character set) still gives valid objects.
"""
from __future__ import annotations

import dataclasses
import typing
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.encoders import encode_all
from node.encoders.common import choose_charset
from node.encoders.warnings import mark_warnings
from node.jobs.quality import warning_findings
from node.results import (
    Code,
    ImageSeries,
    LabelMap,
    Measurement,
    MeasurementGroup,
    MeasurementReport,
    QualityFlag,
    QuantityMap,
    ResampledSeries,
    SeriesRef,
    SpatialRegistration,
    TextFinding,
    check_text,
    clip_text,
)
from node.volume import Geometry, Volume
from tests.encoder_sources import anatomy_labels, context, ct_series, save_valid, segment_table

ANAT = Code("91723000", "SCT", "Anatomical Structure")


def _source(tmp_path, seed: str, **kwargs):
    return ct_series(tmp_path / "src", rows=24, cols=24, slices=6, seed=seed, **kwargs)


def _written(out, tmp_path) -> list[pydicom.Dataset]:
    """Each object written, checked by dciodvfy (0 errors), and read back."""
    return [pydicom.dcmread(save_valid(ds, tmp_path / "out", f"{n}-{ds.Modality}.dcm")) for n, ds in enumerate(out)]


def _report(series, tracking_id: str = "Lung_L") -> MeasurementReport:
    return MeasurementReport(series.series_uid, "ct-anatomy", (
        MeasurementGroup(tracking_id, "lung_left", (Measurement("volume", 1500.0, "ml"),), segment_label=4),))


def _ref(series, modality: str | None = None) -> SeriesRef:
    return SeriesRef(series.series_uid, str(series.first.StudyInstanceUID), str(series.first.FrameOfReferenceUID),
                     modality or series.modality, tuple((str(d.SOPClassUID), str(d.SOPInstanceUID))
                                                        for d in series.datasets))


def _quantity_map(series) -> QuantityMap:
    g = series.volume.geometry
    grid = Geometry(shape=(2, 4, 4), origin=g.origin, spacing=(6.0, 6.0, 5.0), direction=g.direction)
    return QuantityMap(series.series_uid, grid, np.full(grid.shape, 0.25, np.float32),
                       Code("ENTROPY", "99HILUM", "Normalized predictive entropy"), Code("1", "UCUM", "no units"),
                       "Uncertainty", (0.0, 1.0))


# --- a resampled series is CT or MR --------------------------------------------------------------

@pytest.mark.parametrize("modality", ["PT", "NM"])
def test_a_pet_or_nm_series_is_refused_not_written_as_mr(tmp_path, modality):
    fixed, moving = _source(tmp_path / "f", "fixed"), _source(tmp_path / "m", "moving")
    with pytest.raises(ValueError, match=rf"ResampledSeries\.moving\.modality '{modality}'.*"
                                         r"PET/NM resampling is not supported yet"):
        ResampledSeries(fixed.series_uid, _ref(moving, modality), Volume(moving.volume.array.astype(np.float32),
                                                                        fixed.volume.geometry),
                        "PET on CT", (2.0, 4.0), "rigid")
    # The registration itself is modality-neutral and still made.
    SpatialRegistration(_ref(fixed), _ref(moving, modality), np.eye(4), "rigid")


def test_the_registration_handler_resamples_only_ct_and_mr():
    from handlers.registration import RegistrationParams

    for side in ("fixed_modality", "moving_modality"):
        assert set(typing.get_args(RegistrationParams.model_fields[side].annotation)) <= {"CT", "MR"}


# --- text in a declared character set --------------------------------------------------------------

def test_a_non_ascii_segment_name_is_declared_in_seg_and_rtstruct(tmp_path):
    """The ROI names are the segments' TG-263 names (ASCII); the ROI descriptions and SEG segment
    labels are their names: a German name alone must switch the objects to a charset holding it."""
    series = _source(tmp_path, "roi-description")
    segments = segment_table()
    segments = (segments[0], dataclasses.replace(segments[1], name="Lungenflügel links"), segments[2])
    g = series.volume.geometry
    out = encode_all([LabelMap(series.series_uid, g, anatomy_labels(g.shape), segments)],
                     {series.series_uid: series}, context())
    seg, rt = _written(out, tmp_path)
    assert seg.SpecificCharacterSet == rt.SpecificCharacterSet == "ISO_IR 192"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Body", "Lungenflügel links", "Bone"]
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["External", "Lung_L", "Bone"]
    assert rt.StructureSetROISequence[1].ROIDescription == "Lungenflügel links"
    assert str(rt.PatientName) == str(series.first.PatientName)


def test_a_non_ascii_rule_name_is_declared_in_every_object(tmp_path):
    """Provenance names the rule (contribution description, algorithm parameters, structure set
    and derivation descriptions): the only non-ASCII text of the job."""
    series = _source(tmp_path, "rule-name")
    g = series.volume.geometry
    results = [
        LabelMap(series.series_uid, g, anatomy_labels(g.shape), segment_table()),
        _report(series),
        TextFinding("no finding", series.series_uid),
        ImageSeries(series.series_uid, "Key image", np.zeros((1, 16, 16), np.uint8)),
        ImageSeries(series.series_uid, "Cine", np.zeros((2, 16, 16), np.uint8), multiframe=True),
        _quantity_map(series),
    ]
    rule = "Lunge-Übersicht"
    out = _written(encode_all(results, {series.series_uid: series}, context(rule=rule)), tmp_path)
    assert [d.Modality for d in out] == ["SEG", "RTSTRUCT", "SR", "OT", "OT", "OT"]
    for ds in out:
        assert ds.SpecificCharacterSet == "ISO_IR 192", ds.Modality
        descriptions = [str(item.get("ContributionDescription", "")) for item in ds.ContributingEquipmentSequence]
        assert any(f"rule '{rule}'" in d for d in descriptions), ds.Modality
    rt, sc = out[1], out[3]
    assert rule in rt.StructureSetDescription and rule in sc.DerivationDescription


def test_non_ascii_frame_labels_and_descriptions_fit_their_vrs(tmp_path):
    """Frame labels are SH values (cut to 16 bytes, never inside a character, one per frame); a
    description the node shortens is shortened to 64 bytes."""
    series = _source(tmp_path, "labels")
    g = series.volume.geometry
    labels = ("Lungenflügel links", "Ωmega")
    description = "Übersicht" * 7  # 63 characters, 70 bytes: refused, so a shorter one
    with pytest.raises(ValueError, match="ImageSeries.description"):
        ImageSeries(series.series_uid, description, np.zeros((2, 16, 16), np.uint8))
    description = "Ü" * 32  # 64 bytes: fits LO, but not once "AI: " and " (SEG)" are added
    results = [ImageSeries(series.series_uid, "Übersicht", np.zeros((2, 16, 16), np.uint8), multiframe=True,
                           frame_labels=labels),
               LabelMap(series.series_uid, g, anatomy_labels(g.shape), segment_table(), description=description)]
    seg, rt, sc = _written(encode_all(results, {series.series_uid: series}, context()), tmp_path)
    assert list(sc.FrameLabelVector) == ["Lungenflügel li", "Ωmega"]
    assert int(sc.NumberOfFrames) == len(sc.FrameLabelVector)
    assert rt.StructureSetLabel == "Ü" * 8 and rt.StructureSetName == description
    for ds in (sc, seg, rt):
        assert len(ds.SeriesDescription.encode("utf-8")) <= 64 and ds.SeriesDescription.startswith("AI: Ü")


GERMAN_FLAG = QualityFlag("slice_gap", "Lungenflügel links is absent on 2 slice(s)", structure="Lungenflügel links")


def _warning_objects(tmp_path, seed: str, flag: QualityFlag = GERMAN_FLAG, **source):
    """A job's objects with ``flag``'s warning, as the worker delivers them: the SR holds it as a
    finding (encoded), the others get it after encoding (``mark_warnings``)."""
    series = _source(tmp_path, seed, **source)
    g = series.volume.geometry
    results = [LabelMap(series.series_uid, g, anatomy_labels(g.shape), segment_table()),
               ImageSeries(series.series_uid, "MIP", np.zeros((1, 16, 16), np.uint8)),
               *warning_findings([flag], series.series_uid)]
    out = encode_all(results, {series.series_uid: series}, context())
    mark_warnings(out, [flag.text])
    return series, flag, out


def test_a_quality_warning_is_written_in_a_declared_charset(tmp_path):
    """The warning is added after encoding (node.jobs.worker): an object whose text was ASCII
    declares UTF-8 once the warning names the "Lungenflügel"."""
    series, flag, out = _warning_objects(tmp_path, "warning")
    seg, rt, sr, sc = _written(out, tmp_path)
    assert seg.SeriesDescription.startswith("AI WARNING: ")  # ASCII: the SEG keeps its charset
    assert rt.SpecificCharacterSet == sr.SpecificCharacterSet == sc.SpecificCharacterSet == "ISO_IR 192"
    assert flag.text in rt.StructureSetDescription and flag.text in sc.ImageComments
    assert flag.text in sr.ContentSequence[0].TextValue


def test_a_warning_beyond_the_sources_charset_switches_to_utf8(tmp_path):
    _, _, german = _warning_objects(tmp_path / "de", "warning-latin1", charset="ISO_IR 100",
                                    patient_name="Müller^Jürgen")
    assert {ds.get("SpecificCharacterSet") for ds in german} == {"ISO_IR 100"}  # German fits Latin-1
    flag = QualityFlag("low_confidence", "肺 outside the model's domain", kind="confidence")
    _, _, out = _warning_objects(tmp_path / "ja", "warning-latin1", flag, charset="ISO_IR 100",
                                 patient_name="Müller^Jürgen")
    written = _written(out, tmp_path)
    # The SEG carries only the count of warnings (and points at the SR): it keeps Latin-1.
    assert [ds.SpecificCharacterSet for ds in written] == ["ISO_IR 100", "ISO_IR 192", "ISO_IR 192", "ISO_IR 192"]
    for ds in written:
        assert str(ds.PatientName) == "Müller^Jürgen"
    assert "肺" in written[1].StructureSetDescription and "肺" in written[3].ImageComments


# --- results refuse text their attributes cannot hold ---------------------------------------------

def _segment(**changes):
    return dataclasses.replace(segment_table()[1], **changes)


def _labelmap(**changes):
    g = Geometry(shape=(2, 4, 4), origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0),
                 direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return LabelMap("1.2.3", g, np.zeros(g.shape, np.uint8), segment_table(), **changes)


def _images(**changes):
    kwargs = dict(source_series_uid="1.2.3", description="MIP", frames=np.zeros((2, 4, 4), np.uint8))
    return ImageSeries(**{**kwargs, **changes})


REFUSED = {
    "segment name backslash": (lambda: _segment(name="Lung\\left"), r"Segment\.name holds a backslash"),
    "segment name newline": (lambda: _segment(name="Body\nx"), r"Segment\.name holds control characters"),
    "segment name 66 bytes": (lambda: _segment(name="Ä" * 33), r"Segment\.name is 66 bytes in UTF-8"),
    "label map description backslash": (lambda: _labelmap(description="CT\\anatomy"),
                                        r"LabelMap\.description holds a backslash"),
    "label map description tab": (lambda: _labelmap(description="CT\tanatomy"),
                                  r"LabelMap\.description holds control characters"),
    "label map description 80 bytes": (lambda: _labelmap(description="Ü" * 40),
                                       r"LabelMap\.description is 80 bytes"),
    "image description backslash": (lambda: _images(description="M\\IP"), r"ImageSeries\.description holds a backslash"),
    "frame label backslash": (lambda: _images(frame_labels=("a\\b", "c")),
                              r"ImageSeries\.frame_labels\[0\] holds a backslash"),
    "frame label NUL": (lambda: _images(frame_labels=("a", "c\x00")), r"ImageSeries\.frame_labels\[1\] holds control"),
    "code meaning 65 characters": (lambda: Code("38266002", "SCT", "Entire body " + "x" * 53),
                                   r"Code\.meaning must be at most 64 characters"),
    "code meaning backslash": (lambda: Code("38266002", "SCT", "Entire\\body"), r"Code\.meaning holds a backslash"),
    "code meaning 80 bytes": (lambda: Code("38266002", "SCT", "ö" * 40), r"Code\.meaning is 80 bytes"),
    "report title backslash": (lambda: MeasurementReport("1.2.3", "ct-anatomy", (
        MeasurementGroup("Lung_L", "lung_left", (Measurement("volume", 1.0, "ml"),)),), title="A\\B"),
        r"MeasurementReport\.title holds a backslash"),
    "text finding NUL": (lambda: TextFinding("a\x00b", "1.2.3"), r"TextFinding\.text holds control characters"),
    "text finding bell": (lambda: TextFinding("ring\x07", "1.2.3"), r"TextFinding\.text holds control characters"),
    "text finding DEL": (lambda: TextFinding("x\x7f", "1.2.3"), r"TextFinding\.text holds control characters"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_results_refuse_text_their_attributes_cannot_hold(case):
    make, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        make()


def test_results_take_text_that_fits():
    assert _segment(name="Ä" * 32).name == "Ä" * 32  # 64 bytes
    assert _segment(name="x" * 64).name == "x" * 64
    assert Code("1", "99X", "x" * 64).meaning == "x" * 64
    assert Code("1", "99X", "Lungenflügel links").meaning == "Lungenflügel links"
    with pytest.raises(ValueError, match=r"Code\.meaning is 65 bytes"):
        Code("1", "99X", "Lungenflügel " + "x" * 51)  # 64 characters, 65 bytes
    assert TextFinding("line one\r\nline two\ttab\fpage", "1.2.3")
    assert _images(frame_labels=("", "azimuth 337.5 deg")).frame_labels[1] == "azimuth 337.5 deg"
    check_text("日本語" * 7, "x")  # 63 bytes
    with pytest.raises(ValueError, match="x is 66 bytes"):
        check_text("日本語" * 7 + "x" * 3, "x")
    with pytest.raises(ValueError, match=r"y must be at most 16 characters \(SH\)"):
        check_text("x" * 17, "y", "SH")


def test_clip_text_cuts_by_characters_and_bytes_never_inside_a_character():
    assert clip_text("x" * 70, 64) == "x" * 64
    assert clip_text("Ä" * 40, 64) == "Ä" * 32
    assert clip_text("abcÄ", 4) == "abc"
    assert clip_text("Lungenflügel links", 16) == "Lungenflügel li"
    assert clip_text("日本語", 64) == "日本語"
    assert clip_text("日本語", 7) == "日本"


# --- sources that break the standard ----------------------------------------------------------------

def test_a_multi_valued_patient_name_is_written_as_its_first_value(tmp_path):
    series = _source(tmp_path, "two-names", patient_name="DOE^JOHN\\SMITH^J")
    assert series.first["PatientName"].VM == 2
    g = series.volume.geometry
    results = [
        LabelMap(series.series_uid, g, anatomy_labels(g.shape), segment_table()),
        _report(series),
        ImageSeries(series.series_uid, "Key image", np.zeros((1, 16, 16), np.uint8)),
        ImageSeries(series.series_uid, "Cine", np.zeros((2, 16, 16), np.uint8), multiframe=True),
        _quantity_map(series),
    ]
    sources = {series.series_uid: series}
    out = encode_all(results, sources, context()) + encode_all([TextFinding("text only", series.series_uid)],
                                                               sources, context(job_key="job-43"))
    written = _written(out, tmp_path)
    assert [d.Modality for d in written] == ["SEG", "RTSTRUCT", "SR", "OT", "OT", "OT", "SR"]
    for ds in written:
        assert ds["PatientName"].VM == 1 and str(ds.PatientName) == "DOE^JOHN", ds.Modality
    assert series.first["PatientName"].VM == 2  # the source header is untouched


@pytest.mark.parametrize("charset, patient, declared", [
    ("ISO IR 100", "Müller^Jürgen", "ISO_IR 100"),  # pydicom: "assuming 'ISO_IR 100'"
    ("ISO IR 192", "Ωmega^Test", "ISO_IR 192"),
    (["ISO_IR 100", "ISO_IR 192"], "Müller^Jürgen", "ISO_IR 100"),  # UTF-8 takes no code extensions
])
def test_a_misspelt_source_charset_is_declared_as_pydicom_decoded_it(tmp_path, charset, patient, declared):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the source's term, as it should
        series = _source(tmp_path, "misspelt", charset=charset, patient_name=patient)
        g = series.volume.geometry
        results = [LabelMap(series.series_uid, g, anatomy_labels(g.shape), segment_table()),
                   TextFinding("Keine Infiltrate.", series.series_uid),
                   ImageSeries(series.series_uid, "MIP", np.zeros((1, 16, 16), np.uint8))]
        out = encode_all(results, {series.series_uid: series}, context())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # writing the objects: no "Incorrect value for Specific Character Set"
        written = _written(out, tmp_path)
    for ds in written:
        assert ds.SpecificCharacterSet == declared, ds.Modality
        assert str(ds.PatientName) == patient, ds.Modality


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("source, texts, chosen", [
    ("ISO IR 100", ["Müller"], "ISO_IR 100"),
    ("latin_1", ["Müller"], "ISO_IR 100"),  # a Python codec name, as pydicom takes it
    ("ISO_IR 100", ["肺"], "ISO_IR 192"),
    (["", "ISO_2022_IR_87"], ["山田"], ["", "ISO 2022 IR 87"]),
    (["ISO_IR 192", "ISO 2022 IR 87"], ["x"], "ISO_IR 192"),
    (None, ["plain"], None),
    ("", ["plain"], None),
])
def test_choose_charset_declares_valid_terms(source, texts, chosen):
    src = Dataset()
    if source is not None:
        src.SpecificCharacterSet = source
    result = choose_charset(src, texts, None)
    assert (list(result) if isinstance(result, list) else result) == chosen


def test_choose_charset_covers_the_jobs_names():
    src = Dataset()
    src.SpecificCharacterSet = "ISO_IR 100"
    assert choose_charset(src, ["plain"], context()) == "ISO_IR 100"
    assert choose_charset(src, ["plain"], context(rule="Lunge-Übersicht")) == "ISO_IR 100"
    assert choose_charset(src, ["plain"], context(handler="肺-anatomy")) == "ISO_IR 192"


def test_a_handler_describing_its_result_by_an_odd_source_description_still_delivers(tmp_path):
    """Handlers name their results after the source's series description: a long one in another
    script, or one holding a tab, becomes one valid LO value (safe_text), not a failed job."""
    from handlers.overview import Overview
    from node.handler_api import HandlerInput
    from node.results import safe_text

    series = ct_series(tmp_path / "ct", rows=32, cols=32, slices=4, seed="odd-description")
    for odd in ("胸部CT 肺野条件 冠状断 再構成 造影後 薄層 " * 3, "AX\tTHIN 1mm"):
        series.first.SeriesDescription = odd
        (image,) = Overview().run(HandlerInput("1.2.3", [series]), lambda f, m: None)
        assert image.description == safe_text(f"AI: overview {odd}")
        assert "\t" not in image.description and len(image.description.encode("utf-8")) <= 64
    assert safe_text("a\\b\x00c" + "é" * 40) == "a b c" + "é" * 29  # 64 bytes: "a b c" + 29 x 2
