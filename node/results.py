"""Typed handler results.

Handlers compute; the node does DICOM. A handler returns instances of the classes below and
never builds a DICOM object itself. Like highdicom's constructors, each class validates its
arguments when it is created, so a wrong result cannot reach an encoder: a mis-shaped label
map, a unit that is not UCUM, an unknown segment label all raise ``ValueError`` naming the field.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from node.volume import Geometry

__all__ = [
    "Code",
    "Segment",
    "LabelMap",
    "SEG_FORMATS",
    "Measurement",
    "MeasurementGroup",
    "MeasurementReport",
    "ImageSeries",
    "TextFinding",
    "QualityFlag",
    "QUALITY_KINDS",
    "Result",
    "SCT",
    "SeriesRef",
    "SpatialRegistration",
    "DeformableRegistration",
    "ResampledSeries",
    "QuantityMap",
    "check_text",
    "clip_text",
]

SCT = "SCT"
_UCUM_SIMPLE = re.compile(r"^[A-Za-z0-9%\[\]{}/.*^\-]+$")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

# The value lengths of the string VRs a result's text lands in (PS3.5 6.2), in characters; dciodvfy
# counts the encoded bytes, so a value must fit in both, in UTF-8 (ISO_IR 192, what the encoders
# switch to for text the source's character set cannot hold).
TEXT_LIMITS = {"LO": 64, "SH": 16}
# Control characters UT/ST/LT text may hold (PS3.5 6.1.3; ESC only inside ISO 2022 encoded bytes,
# never in a decoded Python string).
_TEXT_CONTROLS = frozenset("\r\n\t\f")


def _controls(value: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    return sorted({ch for ch in value if unicodedata.category(ch) == "Cc" and ch not in allowed})


def check_text(value: object, what: str, vr: str = "LO", *, required: bool = True) -> None:
    """Raise ``ValueError`` naming ``what`` unless ``value`` is one valid DICOM ``vr`` (LO or SH) value.

    One value: no backslash (DICOM's value separator: "a\\b" would be two values, or shift the
    values of a multi-valued attribute such as Frame Label Vector) and no control character (LO and
    SH allow none). At most 64 (LO) or 16 (SH) characters, and as many bytes in UTF-8: a value in
    another script is written in UTF-8 and must still fit the VR's length."""
    limit = TEXT_LIMITS[vr]
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    if required and not value.strip():
        raise ValueError(f"{what} is empty")
    if "\\" in value:
        raise ValueError(f"{what} holds a backslash, which DICOM reads as a value separator ({vr}): {value!r}")
    bad = _controls(value)
    if bad:
        raise ValueError(f"{what} holds control characters {bad!r}, which {vr} does not allow: {value!r}")
    if len(value) > limit:
        raise ValueError(f"{what} must be at most {limit} characters ({vr}), got {len(value)}: {value!r}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not encodable text (a lone surrogate): {value!r}") from None
    if size > limit:
        raise ValueError(f"{what} is {size} bytes in UTF-8, more than {vr} holds ({limit}): {value!r}")


def safe_text(text: str, limit: int = 64) -> str:
    """Text made from what a source holds (its series description) as one valid LO/SH value: a
    backslash or control character becomes a space, then ``clip_text``. Handlers building a
    description from the source use this, so an odd source string never fails their result."""
    cleaned = "".join(" " if ch == "\\" or unicodedata.category(ch) == "Cc" else ch for ch in text)
    return clip_text(cleaned, limit)


def clip_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters and ``limit`` UTF-8 bytes, never inside a
    character: where the node shortens a value to its VR's length (a series description to 64),
    the bytes dciodvfy counts must fit too."""
    text = text[:limit]
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


@dataclass(frozen=True)
class Code:
    """A coded concept (value, scheme designator, meaning), e.g. Code("39607008", "SCT", "Lung")."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("value", "scheme", "meaning"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"Code.{name} must be a non-empty string, got {v!r}")
        if len(self.value) > 64:
            raise ValueError(f"Code.value longer than 64 characters: {self.value!r}")
        check_text(self.value, "Code.value")
        check_text(self.meaning, "Code.meaning")  # Code Meaning is LO


# RT ROI Interpreted Types (PS3.3 C.8.8.8) a handler may ask for.
SEG_FORMATS = ("binary", "labelmap")  # LabelMap.seg_format
RT_ROI_TYPES = frozenset(
    {"EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "BOLUS", "AVOIDANCE",
     "ORGAN", "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY", "SUPPORT",
     "FIXATION", "DOSE_REGION", "CONTROL"}
)


@dataclass(frozen=True)
class Segment:
    """One labelled structure of a label map."""

    label: int  # value in the label array (1..255)
    name: str  # human-readable, used as SegmentLabel
    category: Code  # SNOMED-CT segmented property category
    type: Code  # SNOMED-CT segmented property type
    tg263: str | None = None  # AAPM TG-263 structure name for RTSTRUCT, e.g. "Lung_L"
    color: tuple[int, int, int] = (255, 0, 0)
    rt_roi_type: str = "ORGAN"
    # Labels of other segments this one also covers: a label map cannot overlap, so an External
    # that contains the organs holds its own label plus theirs (``LabelMap.region``).
    includes: tuple[int, ...] = ()
    # The finding's Tracking UID when it continues one from an earlier study (a follow-up keeps a
    # lesion's identity); None: the encoder derives one from the job.
    tracking_uid: str | None = None

    def __post_init__(self) -> None:
        if self.tracking_uid is not None and not (len(self.tracking_uid) <= 64 and _UID.fullmatch(self.tracking_uid)):
            raise ValueError(f"Segment.tracking_uid {self.tracking_uid!r} is not a DICOM UID")
        if not isinstance(self.label, int) or not 1 <= self.label <= 255:
            raise ValueError(f"Segment.label must be an int in 1..255, got {self.label!r}")
        if not self.name or len(self.name) > 64:
            raise ValueError(f"Segment.name must be 1..64 characters, got {self.name!r}")
        check_text(self.name, "Segment.name")  # Segment Label (LO)
        if len(self.color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.color):
            raise ValueError(f"Segment.color must be three ints 0..255, got {self.color!r}")
        if self.rt_roi_type not in RT_ROI_TYPES:
            raise ValueError(f"Segment.rt_roi_type {self.rt_roi_type!r} is not an RT ROI Interpreted Type")
        if self.tg263 is not None and not re.fullmatch(r"[A-Za-z0-9_^\-~]{1,16}", self.tg263):
            raise ValueError(f"Segment.tg263 {self.tg263!r} is not a TG-263 style name (<=16 chars)")
        if not isinstance(self.includes, tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 255 for v in self.includes):
            raise ValueError(f"Segment.includes must be a tuple of labels (ints 1..255), got {self.includes!r}")
        if self.label in self.includes or len(set(self.includes)) != len(self.includes):
            raise ValueError(f"Segment.includes {self.includes!r} repeats a label or holds the segment's own "
                             f"({self.label})")


def _unknown_values(labels: np.ndarray, known: set[int]) -> list[int]:
    """Values of ``labels`` other than 0 that are not in ``known``. For labels numbered 1..n, the
    usual case, one pass for the maximum and one per gap below it: np.unique sorts or hashes the
    whole volume (0.4 CPU s at 512x512x300, on the way to every result)."""
    if labels.dtype.kind in "ub" and labels.size:
        top = int(labels.max())
        gaps = [v for v in range(1, top + 1) if v not in known]
        if len(gaps) <= 8:
            return [v for v in gaps if np.any(labels == v)]
    return sorted(set(np.unique(labels).tolist()) - {0} - known)


@dataclass(frozen=True, eq=False)
class LabelMap:
    """A label volume on exactly the source series' voxel grid.

    ``labels`` is (slices, rows, columns), slices in the order of the source geometry
    (``Volume.geometry``), values 0 (background) or a ``Segment.label``.
    """

    source_series_uid: str
    geometry: Geometry
    labels: np.ndarray
    segments: tuple[Segment, ...]
    description: str = "Segmentation"
    # Which encodings the handler wants; the rule may narrow it.
    encodings: tuple[str, ...] = ("SEG", "RTSTRUCT")
    # Fractional (probability) maps: optional (segments, slices, rows, cols) float in [0, 1].
    fractions: np.ndarray | None = None
    # How the SEG carries the labels (SEG_FORMATS): "binary", one bit-packed frame per segment and
    # slice, which every SEG reader takes; or "labelmap", the exclusive segments as one Label Map
    # Segmentation (a label per pixel, lossless JPEG-LS frames: a fraction of the size and time)
    # plus a binary SEG of the segments that include others (an External around the organs).
    seg_format: str = "binary"

    def __post_init__(self) -> None:
        if not isinstance(self.labels, np.ndarray) or self.labels.ndim != 3:
            raise ValueError("LabelMap.labels must be a 3-D numpy array (slices, rows, columns)")
        if self.labels.shape != self.geometry.shape:
            raise ValueError(
                f"LabelMap.labels shape {self.labels.shape} differs from the source grid {self.geometry.shape}"
            )
        check_text(self.description, "LabelMap.description")
        if not self.segments:
            raise ValueError("LabelMap.segments is empty")
        seen = [s.label for s in self.segments]
        if len(set(seen)) != len(seen):
            raise ValueError(f"LabelMap.segments has duplicate labels: {seen}")
        if len({s.name for s in self.segments}) != len(self.segments):
            raise ValueError("LabelMap.segments has duplicate names")
        for s in self.segments:
            missing = set(s.includes) - set(seen)
            if missing:
                raise ValueError(f"LabelMap.segments: {s.name!r} includes labels without a segment: {sorted(missing)}")
            nested = [lab for lab in s.includes if self.segment(lab).includes]
            if nested:
                raise ValueError(f"LabelMap.segments: {s.name!r} includes segments that include others: {nested}")
        unknown = _unknown_values(self.labels, set(seen))
        if unknown:
            raise ValueError(f"LabelMap.labels holds values without a segment: {sorted(unknown)}")
        bad = set(self.encodings) - {"SEG", "RTSTRUCT"}
        if bad:
            raise ValueError(f"LabelMap.encodings has unknown entries {sorted(bad)}")
        if self.seg_format not in SEG_FORMATS:
            raise ValueError(f"LabelMap.seg_format must be one of {list(SEG_FORMATS)}, got {self.seg_format!r}")
        if self.fractions is not None:
            f = self.fractions
            if f.shape != (len(self.segments), *self.labels.shape):
                raise ValueError("LabelMap.fractions must be (segments, slices, rows, columns)")
            if np.nanmin(f) < 0 or np.nanmax(f) > 1:
                raise ValueError("LabelMap.fractions must lie in [0, 1]")
        # Freeze the array: the encoders and the node may share it across threads.
        self.labels.setflags(write=False)

    def segment(self, label: int) -> Segment:
        for s in self.segments:
            if s.label == label:
                return s
        raise KeyError(label)

    @property
    def overlapping(self) -> bool:
        """Whether some segment covers others' labels (its region is more than its own label)."""
        return any(s.includes for s in self.segments)

    def region(self, label: int) -> np.ndarray:
        """Boolean mask of segment ``label``: its own label value plus those it ``includes``."""
        s = self.segment(label)
        return np.isin(self.labels, (s.label, *s.includes)) if s.includes else self.labels == s.label


@dataclass(frozen=True)
class Measurement:
    """One numeric measurement. ``name`` is looked up in the handler's SR template."""

    name: str
    value: float
    unit: str  # UCUM, e.g. "ml", "mm", "mm3", "[hnsf'U]", "1"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Measurement.name is empty")
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool) or not math.isfinite(self.value):
            raise ValueError(f"Measurement {self.name!r}: value must be a finite number, got {self.value!r}")
        if not self.unit or not (_UCUM_SIMPLE.match(self.unit) or self.unit == "[hnsf'U]"):
            raise ValueError(f"Measurement {self.name!r}: unit {self.unit!r} is not a UCUM code")


@dataclass(frozen=True)
class MeasurementGroup:
    """Measurements of one finding (a structure or a lesion), TID 1411/1410 style."""

    tracking_id: str  # human-readable tracking identifier, e.g. "Lung_L"
    finding: str  # template key of the finding (e.g. "lung_left")
    measurements: tuple[Measurement, ...]
    segment_label: int | None = None  # references a Segment of a LabelMap in the same result set
    qualitative: tuple[tuple[str, str], ...] = ()  # (template key of concept, template key of value)
    # Tracking UID continued from an earlier study (a group without a segment, e.g. a resolved
    # lesion); a group with a segment takes its segment's.
    tracking_uid: str | None = None

    def __post_init__(self) -> None:
        if self.tracking_uid is not None and not (len(self.tracking_uid) <= 64 and _UID.fullmatch(self.tracking_uid)):
            raise ValueError(f"MeasurementGroup.tracking_uid {self.tracking_uid!r} is not a DICOM UID")
        if not self.tracking_id or len(self.tracking_id) > 64:
            raise ValueError(f"MeasurementGroup.tracking_id must be 1..64 characters, got {self.tracking_id!r}")
        check_text(self.tracking_id, "MeasurementGroup.tracking_id")
        if not self.measurements and not self.qualitative:
            raise ValueError(f"MeasurementGroup {self.tracking_id!r} has nothing to report")


@dataclass(frozen=True)
class MeasurementReport:
    """A TID 1500 measurement report; ``template`` names a file in ``sr_templates/``."""

    source_series_uid: str
    template: str
    groups: tuple[MeasurementGroup, ...]
    title: str = "Imaging Measurement Report"

    def __post_init__(self) -> None:
        check_text(self.title, "MeasurementReport.title")  # the series description
        if not self.groups:
            raise ValueError("MeasurementReport.groups is empty")
        ids = [g.tracking_id for g in self.groups]
        if len(set(ids)) != len(ids):
            raise ValueError(f"MeasurementReport has duplicate tracking ids: {ids}")


@dataclass(frozen=True, eq=False)
class ImageSeries:
    """Rendered images for a Secondary Capture series.

    ``frames`` is (n, rows, cols) uint8 monochrome or (n, rows, cols, 3) uint8 RGB.
    ``multiframe`` stores one multi-frame instance (cine); otherwise one instance per frame.
    """

    source_series_uid: str
    description: str
    frames: np.ndarray
    burned_in_annotation: bool = True
    multiframe: bool = False
    pixel_spacing_mm: tuple[float, float] | None = None  # nominal, for scale information
    frame_labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8:
            raise ValueError("ImageSeries.frames must be a uint8 numpy array")
        if not (f.ndim == 3 or (f.ndim == 4 and f.shape[-1] == 3)):
            raise ValueError(f"ImageSeries.frames must be (n, rows, cols) or (n, rows, cols, 3), got {f.shape}")
        if f.shape[0] < 1:
            raise ValueError("ImageSeries.frames holds no frame")
        if not self.description or len(self.description) > 64:
            raise ValueError(f"ImageSeries.description must be 1..64 characters, got {self.description!r}")
        check_text(self.description, "ImageSeries.description")
        if self.frame_labels and len(self.frame_labels) != f.shape[0]:
            raise ValueError("ImageSeries.frame_labels must have one entry per frame")
        # Each label is one value of the Frame Label Vector (SH, cut to 16 there) or an image's comment.
        for n, label in enumerate(self.frame_labels):
            check_text(label, f"ImageSeries.frame_labels[{n}]", required=False)

    @property
    def rgb(self) -> bool:
        return self.frames.ndim == 4


@dataclass(frozen=True)
class TextFinding:
    """A free-text finding, reported in the SR."""

    text: str
    source_series_uid: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("TextFinding.text is empty")
        # A TEXT content item's value is UT: of the control characters only CR, LF, TAB and FF
        # (and ESC, which only ISO 2022 encoded bytes hold).
        bad = _controls(self.text, _TEXT_CONTROLS)
        if bad:
            raise ValueError(f"TextFinding.text holds control characters {bad!r}; UT text allows only CR, LF, "
                             f"TAB and FF: {self.text!r}")
        try:
            self.text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"TextFinding.text is not encodable text (a lone surrogate): {self.text!r}") from None


# What a quality flag is about: the output failed a plausibility check, the input lies outside the
# domain the method was validated on, or the method's own confidence is below its threshold.
# "coverage": the result is right for what was scanned, but the scan holds only part of what it
# measures (a lung cut by the scan range): never grounds to refuse, always delivered with the warning.
QUALITY_KINDS = frozenset({"plausibility", "domain", "confidence", "coverage"})


@dataclass(frozen=True)
class QualityFlag:
    """A check the result (or its input) failed. Not encoded by itself: the node reads the flags and,
    by the rule's ``on_quality_failure``, refuses the job (default) or delivers with the warning
    written into every object (SR text finding, SEG/RTSTRUCT/SC descriptions) and the console.

    ``check`` is a stable identifier (``lung_slice_gap``), ``reason`` a sentence naming what was found
    and the threshold it broke, ``structure`` the segment or finding concerned, if any.
    """

    check: str
    reason: str
    kind: str = "plausibility"
    structure: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", self.check or ""):
            raise ValueError(f"QualityFlag.check must be a lower-case identifier, got {self.check!r}")
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError("QualityFlag.reason is empty")
        if self.kind not in QUALITY_KINDS:
            raise ValueError(f"QualityFlag.kind must be one of {sorted(QUALITY_KINDS)}, got {self.kind!r}")

    @property
    def text(self) -> str:
        """One line for people: '<kind> check <check> failed [for <structure>]: <reason>'."""
        about = f" for {self.structure}" if self.structure else ""
        return f"{self.kind} check {self.check} failed{about}: {self.reason}"


Result = LabelMap | MeasurementReport | ImageSeries | TextFinding


@dataclass
class ResultSet:
    """What one handler run returned, checked as a whole (references between results)."""

    items: list = field(default_factory=list)

    def __post_init__(self) -> None:
        labels = {s.label for r in self.items if isinstance(r, LabelMap) for s in r.segments}
        for r in self.items:
            if not isinstance(r, (LabelMap, MeasurementReport, ImageSeries, TextFinding, QualityFlag,
                                  *REGISTRATION_RESULTS, QuantityMap)):
                raise TypeError(f"handler returned {type(r).__name__}, not a node.results type")
            if isinstance(r, MeasurementReport):
                for g in r.groups:
                    if g.segment_label is not None and g.segment_label not in labels:
                        raise ValueError(
                            f"MeasurementGroup {g.tracking_id!r} references segment {g.segment_label} "
                            "that no LabelMap in the result defines"
                        )

    @property
    def flags(self) -> list[QualityFlag]:
        return [r for r in self.items if isinstance(r, QualityFlag)]

    @property
    def outputs(self) -> list:
        """What the encoders turn into DICOM (everything but the quality flags)."""
        return [r for r in self.items if not isinstance(r, QualityFlag)]


# --- Registration results (issue 18: spatial registration, deformable registration, resampled series) ---
# Kept as one block so that other additions to this module merge without touching it.

REGISTRATION_METHODS = ("rigid", "affine", "deformable")


def _uid_ok(value: str) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", value) is not None


def _check_matrix(matrix: np.ndarray, what: str, rigid: bool) -> None:
    m = np.asarray(matrix, dtype=float)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"{what} must be a finite 4x4 matrix")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise ValueError(f"{what}: last row must be 0 0 0 1 (a homogeneous transform)")
    a = m[:3, :3]
    if abs(np.linalg.det(a)) < 1e-6:
        raise ValueError(f"{what} is singular")
    if rigid and (not np.allclose(a @ a.T, np.eye(3), atol=1e-4) or np.linalg.det(a) < 0):
        raise ValueError(f"{what} is not a rigid transform (rotation and translation only)")


@dataclass(frozen=True)
class SeriesRef:
    """A series a registration result points at; it may be a prior outside the job's study, so the
    result carries what a reference needs instead of leaving the encoder to look it up."""

    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    instances: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID), in geometric order

    def __post_init__(self) -> None:
        for name in ("series_uid", "study_uid", "frame_of_reference_uid"):
            if not _uid_ok(getattr(self, name)):
                raise ValueError(f"SeriesRef.{name} {getattr(self, name)!r} is not a UID")
        if not self.instances or not all(len(i) == 2 and _uid_ok(i[0]) and _uid_ok(i[1]) for i in self.instances):
            raise ValueError("SeriesRef.instances must be non-empty (SOP Class UID, SOP Instance UID) pairs")
        if not self.modality:
            raise ValueError("SeriesRef.modality is empty")


@dataclass(frozen=True, eq=False)
class SpatialRegistration:
    """A rigid or affine registration: ``matrix`` maps the moving series' Frame of Reference into
    the fixed one's (PS3.3 C.20.2: Frame of Reference Transformation Matrix)."""

    fixed: SeriesRef
    moving: SeriesRef
    matrix: np.ndarray
    method: str  # rigid | affine
    description: str = "Registration"

    def __post_init__(self) -> None:
        if self.method not in ("rigid", "affine"):
            raise ValueError(f"SpatialRegistration.method {self.method!r} must be rigid or affine "
                             "(a deformable one is a DeformableRegistration)")
        _check_matrix(self.matrix, "SpatialRegistration.matrix", self.method == "rigid")
        if not self.description or len(self.description) > 64:
            raise ValueError("SpatialRegistration.description must be 1..64 characters")
        check_text(self.description, "SpatialRegistration.description")


@dataclass(frozen=True, eq=False)
class DeformableRegistration:
    """A deformable registration of ``moving`` onto ``fixed`` (PS3.3 C.20.3).

    ``matrix`` (4x4) maps the moving Frame of Reference into the fixed one (the rigid/affine
    part, as in ``SpatialRegistration``); ``vectors`` (slices, rows, cols, 3) mm on ``grid`` (a
    grid in the fixed Frame of Reference) is the deformation: the content at a fixed point g came
    from ``matrix^-1 (g + v(g))`` in the moving series.
    """

    fixed: SeriesRef
    moving: SeriesRef
    matrix: np.ndarray
    grid: Geometry
    vectors: np.ndarray
    description: str = "Deformable registration"

    def __post_init__(self) -> None:
        _check_matrix(self.matrix, "DeformableRegistration.matrix", False)
        v = self.vectors
        if not isinstance(v, np.ndarray) or v.shape != (*self.grid.shape, 3):
            raise ValueError(f"DeformableRegistration.vectors must be {(*self.grid.shape, 3)}, "
                             f"got {getattr(v, 'shape', None)}")
        if not np.all(np.isfinite(v)):
            raise ValueError("DeformableRegistration.vectors holds non-finite values")
        if not self.description or len(self.description) > 64:
            raise ValueError("DeformableRegistration.description must be 1..64 characters")
        check_text(self.description, "DeformableRegistration.description")


@dataclass(frozen=True, eq=False)
class ResampledSeries:
    """The moving series resampled onto the fixed series' grid: a derived image series in the fixed
    Frame of Reference, so any viewer can show it side by side with, or fused over, the fixed one.

    ``source_series_uid`` is the fixed series (in the job's study: patient, study and Frame of
    Reference come from it); ``moving`` is where the pixels came from. ``volume`` holds the values
    in the moving modality's units (HU for CT), on exactly the fixed grid.
    """

    source_series_uid: str
    moving: SeriesRef
    volume: "Volume"
    description: str
    window: tuple[float, float]  # (centre, width) for display
    method: str  # the registration it comes from: rigid | affine | deformable
    # Per fixed slice, the indices (into moving.instances) of the moving images it draws on;
    # empty: every slice names all of them.
    source_slices: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        from node.volume import Volume

        if not isinstance(self.volume, Volume):
            raise ValueError("ResampledSeries.volume must be a node.volume.Volume")
        # The series is written as CT or MR Image Storage (node/encoders/resampled.py): a PET or NM
        # series needs its own IOD (units, decay correction, radiopharmaceutical), not yet written.
        if self.moving.modality not in ("CT", "MR"):
            raise ValueError(f"ResampledSeries.moving.modality {self.moving.modality!r}: only CT or MR can be "
                             "resampled; PET/NM resampling is not supported yet")
        if not np.all(np.isfinite(self.volume.array)):
            raise ValueError("ResampledSeries.volume holds non-finite values")
        if len(self.window) != 2 or not self.window[1] > 0:
            raise ValueError(f"ResampledSeries.window must be (centre, width > 0), got {self.window!r}")
        if self.method not in REGISTRATION_METHODS:
            raise ValueError(f"ResampledSeries.method {self.method!r} is not one of {REGISTRATION_METHODS}")
        if not self.description or len(self.description) > 64:
            raise ValueError("ResampledSeries.description must be 1..64 characters")
        check_text(self.description, "ResampledSeries.description")
        if self.source_slices:
            n = len(self.moving.instances)
            if len(self.source_slices) != self.volume.array.shape[0]:
                raise ValueError("ResampledSeries.source_slices must have one entry per slice of the volume")
            if any(not s or min(s) < 0 or max(s) >= n for s in self.source_slices):
                raise ValueError(f"ResampledSeries.source_slices: each entry needs indices in 0..{n - 1}")


REGISTRATION_RESULTS = (SpatialRegistration, DeformableRegistration, ResampledSeries)


# --- Quantity maps (issue 21: a model's uncertainty as a DICOM Parametric Map) ---

@dataclass(frozen=True, eq=False)
class QuantityMap:
    """A float32 map of one quantity (e.g. a prediction's voxel entropy) on its own grid in the source
    series' Frame of Reference, delivered as a Parametric Map that references the source series.

    ``geometry`` need not be the source's: a model's map lies on the network grid. ``quantity`` and
    ``unit`` (a UCUM code) say what the values mean; ``value_range`` is their possible range (the
    display window and the Real World Value Mapping cover it).
    """

    source_series_uid: str
    geometry: Geometry
    values: np.ndarray  # float32 (slices, rows, columns) on ``geometry``
    quantity: Code
    unit: Code
    description: str
    value_range: tuple[float, float]

    def __post_init__(self) -> None:
        if not isinstance(self.values, np.ndarray) or self.values.dtype != np.float32:
            raise ValueError("QuantityMap.values must be a float32 array")
        if tuple(self.values.shape) != tuple(self.geometry.shape):
            raise ValueError(f"QuantityMap.values shape {self.values.shape} differs from geometry.shape "
                             f"{self.geometry.shape}")
        if not np.all(np.isfinite(self.values)):
            raise ValueError("QuantityMap.values holds non-finite values")
        lo, hi = self.value_range
        if not lo < hi:
            raise ValueError(f"QuantityMap.value_range must be (low, high) with low < high, got {self.value_range}")
        if self.values.min() < lo or self.values.max() > hi:
            raise ValueError(f"QuantityMap.values lie in {self.values.min():g}..{self.values.max():g}, "
                             f"outside value_range {self.value_range}")
        if self.unit.scheme != "UCUM":
            raise ValueError(f"QuantityMap.unit must be a UCUM code, got scheme {self.unit.scheme!r}")
        if not self.description or len(self.description) > 64:
            raise ValueError("QuantityMap.description must be 1..64 characters")
        check_text(self.description, "QuantityMap.description")
