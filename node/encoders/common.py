"""What every encoder shares: the source study's identity, provenance, names and checks.

Result objects are placed in the source study: the Patient, General Study, Patient Study and
Clinical Trial modules are copied from the source header as they are (their text keeps its
character set), and the Type 2 attributes a careless modality left out are added empty, which is
what the standard asks for (PS3.3 C.7.1.1, C.7.2.1).
"""
from __future__ import annotations

import codecs
import copy
import functools
import re
import threading
from functools import lru_cache

import highdicom as hd
import numpy as np
from highdicom._standard_utils import get_module_attribute_map
from pydicom.charset import STAND_ALONE_ENCODINGS, default_encoding, python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.sr.codedict import codes

from node.encoders.context import EncodeContext
from node.results import Code, LabelMap, clip_text
from node.volume import Geometry, GeometryError, SeriesData, sort_by_geometry

__all__ = [
    "MODEL_NAME",
    "source_series",
    "header_view",
    "header_views",
    "copy_patient_study",
    "contributing_equipment",
    "algorithm_identification",
    "coded",
    "series_description",
    "choose_charset",
    "charset_fits",
    "context_texts",
    "code_texts",
    "labelmap_texts",
    "clip_text",
    "source_grid",
    "job_time",
    "settle_encoding",
]

MODEL_NAME = "Hilum"

_COPIED_MODULES = ("patient", "general-study", "patient-study", "clinical-trial-subject", "clinical-trial-study")
TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


@lru_cache(maxsize=1)
def _copied_keywords() -> tuple[str, ...]:
    table = get_module_attribute_map()
    return tuple(dict.fromkeys(
        str(item["keyword"]) for module in _COPIED_MODULES for item in table[module] if not item["path"]
    ))


def source_series(sources: dict[str, SeriesData], uid: str, what: str) -> SeriesData:
    """The source series ``uid`` of a result, or a ValueError naming the result field."""
    series = sources.get(uid)
    if series is None:
        raise ValueError(f"{what}.source_series_uid {uid!r} is not one of the job's series")
    if not series.datasets:
        raise ValueError(f"source series {uid} has no instances")
    if "StudyInstanceUID" not in series.first:
        raise ValueError(f"source series {uid} has no StudyInstanceUID")
    return series


def header_view(ds: Dataset) -> Dataset:
    """A new Dataset sharing ``ds``'s elements, with missing Type 2 patient/study attributes added empty.

    Libraries such as highdicom read ``src.PatientID`` and friends directly; this lets them take
    sources that lack them, without touching the source header.
    """
    view = Dataset()
    # The elements as ``ds`` holds them, still undecoded where it has not read them (pydicom's
    # RawDataElement, immutable): a library reads a few attributes of each of hundreds of source
    # headers, and decoding every element of every header to copy it (``for elem in ds``) was half
    # of the SR's encoding time. Each view decodes what is read of it into its own dictionary.
    view._dict.update(ds._dict)
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in view:
            view.add_new(tag_for_keyword(keyword), dictionary_VR(keyword), None)
    for tag in _SINGLE_NAMES:
        # highdicom takes these names from the source as they are and refuses a multi-valued one
        # (check_person_name: TypeError): the view shows the first name, as the object will carry
        # it (``copy_patient_study``). Only a value holding a backslash is decoded to find out.
        elem = view._dict.get(tag)
        if elem is None or (isinstance(elem, RawDataElement) and b"\\" not in (elem.value or b"")):
            continue
        elem = view[tag]  # decoded into the view's own dictionary, never the source's
        if elem.VM > 1:
            view[tag] = DataElement(tag, elem.VR, elem.value[0])
    return view


# The person names (VM 1) highdicom reads from a source header.
_SINGLE_NAMES = tuple(tag_for_keyword(k) for k in ("PatientName", "ReferringPhysicianName"))


_VIEWS_LOCK = threading.Lock()


def header_views(series: SeriesData, ctx: EncodeContext) -> list[Dataset]:
    """``header_view`` of every header of ``series``, made once per job (``ctx``) and shared by the
    job's encoders. highdicom reads the position, orientation and references of each source
    image; a view decodes what is read into its own dictionary, so with views of their own the
    second SEG and the SR decoded the same 300 headers again (0.2-0.3 CPU s each). The encoders
    only read the views."""
    with _VIEWS_LOCK:
        made = ctx.header_views.get(series.series_uid)
        if made is None or made[0] is not series.datasets:
            made = ctx.header_views[series.series_uid] = (series.datasets, [header_view(ds) for ds in series.datasets])
        return list(made[1])


_COUNTS_LOCK = threading.Lock()


def pixels_per_slice(labels: np.ndarray, ctx: EncodeContext) -> dict[int, np.ndarray]:
    """Label value -> its pixel count on each slice of ``labels``, counted once per job (``ctx``):
    the report's key slices and a SEG's present segments read the same counts (counting took
    0.03-0.04 CPU s a 512x512x300 label map each). Read only."""
    with _COUNTS_LOCK:
        made = ctx.label_counts.get(id(labels))
        if made is None or made[0] is not labels:
            made = ctx.label_counts[id(labels)] = (labels, count_per_slice(labels))
        return made[1]


def count_per_slice(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Label value -> its pixel count on each slice, in one pass over the volume."""
    if labels.dtype.kind in "ub" or (labels.dtype.kind == "i" and labels.min() >= 0):
        top = int(labels.max()) + 1
        if top <= 17:
            # A few labels: a comparison and a count per label and plane, six times faster than a
            # bincount, which copies each plane to 8-byte integers first (0.05 vs 0.3 CPU s at
            # 512x512x300), and this is on the way to the first result in the archive.
            table = np.zeros((len(labels), top), dtype=np.int64)
            same = np.empty(labels.shape[1:], dtype=bool)
            for k, plane in enumerate(labels):
                for v in range(1, top):
                    table[k, v] = np.count_nonzero(np.equal(plane, v, out=same))
        else:
            table = np.stack([np.bincount(plane.ravel(), minlength=top) for plane in labels])
        return {v: table[:, v] for v in range(1, top)}
    return {int(v): np.count_nonzero((labels == v).reshape(len(labels), -1), axis=1)
            for v in np.unique(labels).tolist() if v}


def _remember_iod_lookups() -> None:
    """Make highdicom remember whether an IOD holds an attribute. It asks for every source image
    of a SEG (is the image multi-frame, does it have pixels), each time walking the standard's
    module tables: 0.2-0.4 CPU s of a 300-slice SEG. The answer depends only on the attribute,
    the SOP class and the excluded path, all given by value; highdicom is pinned (pyproject), and
    its own functions look the name up in their module at each call."""
    from highdicom import _standard_utils as standard

    looked_up = standard.is_attribute_in_iod
    if hasattr(looked_up, "remembered"):
        return

    @functools.lru_cache(maxsize=4096)
    def remembered(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return looked_up(attribute, sop_class_uid, None if exclude is None else list(exclude))

    def is_attribute_in_iod(attribute, sop_class_uid, exclude_path_elements=None) -> bool:
        return remembered(str(attribute), str(sop_class_uid),
                          None if exclude_path_elements is None else tuple(exclude_path_elements))

    is_attribute_in_iod.remembered = remembered
    standard.is_attribute_in_iod = is_attribute_in_iod


_remember_iod_lookups()


def new_instance(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """An empty Explicit VR Little Endian Part 10 dataset with its file meta and SOP Common UIDs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def copy_patient_study(dst: Dataset, src: Dataset, charset: str | list[str] | None) -> None:
    """Copy the patient and study modules from ``src`` (deep copies), fill Type 2 gaps, set the charset.

    The charset is set here rather than through highdicom, which rejects the empty first value
    of ISO 2022 code extensions (e.g. ``['', 'ISO 2022 IR 87']``, Japanese).
    """
    if charset:
        dst.SpecificCharacterSet = charset
    elif "SpecificCharacterSet" in dst:
        del dst.SpecificCharacterSet
    for keyword in _copied_keywords():
        tag = tag_for_keyword(keyword)
        if tag in src:
            elem = copy.deepcopy(src[tag])
            if elem.VR != "SQ" and elem.VM > 1 and dictionary_VM(tag) == "1":
                # A source breaking VM 1, e.g. a PatientName "DOE^JOHN\\SMITH^J" (two names), would
                # make every object invalid (dciodvfy: VM 2) and highdicom refuses it outright: the
                # object carries the first value, the name the source gives first.
                elem.value = elem.value[0]
            dst[tag] = elem
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in dst:
            dst.add_new(tag_for_keyword(keyword), dictionary_VR(keyword), None)
    dst.StudyInstanceUID = src.StudyInstanceUID


# Date/time pairs highdicom takes from the clock when it builds an object.
_CLOCK_STAMPED = (("InstanceCreationDate", "InstanceCreationTime"), ("ContentDate", "ContentTime"),
                  ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"))


def job_time(ds: Dataset, ctx: EncodeContext) -> None:
    """Replace the times highdicom stamped from the clock with the job's (``ctx.created``), so the
    object is the same bytes however often the job is encoded. Its own equipment item in the
    Contributing Equipment Sequence carries a ContributionDateTime of "now" too."""
    for date, time in _CLOCK_STAMPED:
        if date in ds:
            setattr(ds, date, ctx.date)
            setattr(ds, time, ctx.time)
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom" and "ContributionDateTime" in item:
            item.ContributionDateTime = ctx.created.strftime("%Y%m%d%H%M%S")


def contributing_equipment(ctx: EncodeContext) -> hd.ContributingEquipment:
    """Provenance: which node, rule, handler and model produced the object."""
    model = f"; model {ctx.model_name} {ctx.model_version or ''}".rstrip() if ctx.model_name else ""
    versions = [clip_text(f"{MODEL_NAME} {ctx.software_version}", 64),
                clip_text(f"{ctx.handler} {ctx.handler_version}", 64)]
    if ctx.model_name:
        versions.append(clip_text(f"{ctx.model_name} {ctx.model_version or ''}".strip(), 64))
    return hd.ContributingEquipment(
        manufacturer=clip_text(ctx.manufacturer, 64),
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=MODEL_NAME,
        software_versions=versions,
        device_serial_number=ctx.device_serial,
        contribution_description=clip_text(
            f"{MODEL_NAME} {ctx.software_version}: rule {ctx.rule!r} ran handler {ctx.handler} "
            f"{ctx.handler_version}{model}", 1024),
    )


def algorithm_identification(ctx: EncodeContext) -> hd.AlgorithmIdentificationSequence:
    family = codes.cid7162.ArtificialIntelligence if ctx.model_name else codes.DCM.ImageProcessing
    parameters = {"rule": ctx.rule}
    if ctx.model_name:
        parameters["model"] = f"{ctx.model_name} {ctx.model_version or ''}".strip()
    return hd.AlgorithmIdentificationSequence(
        name=clip_text(ctx.handler, 64), family=family, version=clip_text(ctx.handler_version, 64),
        source=clip_text(f"{ctx.manufacturer} {ctx.software_version}", 64), parameters=parameters,
    )


def coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def series_description(text: str, kind: str) -> str:
    """'AI: <text> (<kind>)', shortened to fit LO (64 characters, and bytes in UTF-8)."""
    suffix = f" ({kind})"
    return "AI: " + clip_text(text, 64 - 4 - len(suffix.encode("utf-8"))) + suffix


def _encodable(char: str, encoding: str) -> bool:
    try:
        char.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


_ASCII_TERMS = ("", "ISO_IR 6", "ISO 2022 IR 6")  # the default repertoire


def _defined_term(term: str, extensions: bool) -> str:
    """The Specific Character Set Defined Term pydicom decoded a source's ``term`` as.

    A valid term is itself. A misspelt one ("ISO IR 100", "ISO_2022_IR_87") pydicom corrects, with
    a warning, and decodes by the correction; a Python codec name ("latin_1") it takes as that
    codec; anything else it decodes as its default (Latin-1). The object declares the term of
    what the values were decoded with, so a reader decodes them as the node did (a term copied as
    it is would be an invalid Specific Character Set, and a warning at every write)."""
    if term in python_encoding:
        return term
    patched = None
    if re.match("^ISO[^_]IR", term) is not None:  # pydicom.charset's corrections
        patched = "ISO_IR" + term[6:]
    elif re.match("^(?=ISO.2022.IR.)(?!ISO 2022 IR )", term) is not None:
        patched = "ISO 2022 IR " + term[12:]
    if patched in python_encoding:
        return patched
    try:
        codec = codecs.lookup(term if patched is None else default_encoding).name
    except LookupError:
        codec = codecs.lookup(default_encoding).name
    same = [t for t, c in python_encoding.items() if t not in _ASCII_TERMS and codecs.lookup(c).name == codec]
    same.sort(key=lambda t: t.startswith("ISO 2022") != extensions)  # code extensions keep ISO 2022 terms
    return same[0] if same else "ISO_IR 192"  # a codec DICOM has no term for: UTF-8 holds any text


def _declared(charset) -> list[str]:
    """The terms of a Specific Character Set value, each as the Defined Term it stands for."""
    terms = [charset] if isinstance(charset, str) else [str(t) for t in charset or []]
    terms = [_defined_term(t, len(terms) > 1) for t in terms]
    if len(terms) > 1:
        # As pydicom decodes it: a stand-alone character set (UTF-8, GB18030, GBK) takes no code
        # extensions, so it is the only one when first and ignored after.
        terms = terms[:1] + ([] if terms[0] in STAND_ALONE_ENCODINGS
                             else [t for t in terms[1:] if t not in STAND_ALONE_ENCODINGS])
    return terms


def charset_fits(charset, texts: list[str]) -> bool:
    """Whether a Specific Character Set value (None: the default repertoire) can encode ``texts``."""
    # An empty term (or IR 6) is the default repertoire: ASCII, whatever pydicom decodes it as.
    codecs_ = ["ascii" if t in _ASCII_TERMS else python_encoding[t] for t in _declared(charset)] or ["ascii"]
    return all(any(_encodable(ch, c) for c in codecs_) for ch in set("".join(t for t in texts if t)))


def context_texts(ctx: EncodeContext | None) -> list[str]:
    """Every string of the job context an encoder writes: provenance (contributing equipment,
    algorithm identification, descriptions) names the rule, handler and model."""
    if ctx is None:
        return []
    return [ctx.rule, ctx.handler, ctx.handler_version, ctx.model_name or "", ctx.model_version or "",
            ctx.manufacturer, ctx.software_version, ctx.device_serial]


def code_texts(*codes_: Code | None) -> list[str]:
    return [t for c in codes_ if c is not None for t in (c.value, c.scheme, c.meaning)]


def labelmap_texts(labelmap: LabelMap) -> list[str]:
    """Every string of a label map its SEG or RTSTRUCT writes: the description, the segments'
    names (label, ROI name and description, tracking id) and their codes."""
    out = [labelmap.description]
    for s in labelmap.segments:
        out += [s.name, s.tg263 or "", *code_texts(s.category, s.type)]
    return out


def choose_charset(src: Dataset, texts: list[str], ctx: EncodeContext | None) -> str | list[str] | None:
    """The source's Specific Character Set if it can encode ``texts`` and the job context's
    strings (``context_texts``), else ISO_IR 192 (UTF-8). ``texts`` must hold every other string
    the encoder writes.

    Copied values are held decoded by pydicom, so switching to UTF-8 re-encodes them correctly.
    A misspelt source term is declared as the term pydicom decoded it with (``_defined_term``).
    """
    terms = _declared(src.get("SpecificCharacterSet"))
    if not charset_fits(terms, [*texts, *context_texts(ctx)]):
        return "ISO_IR 192"
    if not any(terms):
        return None
    return terms[0] if len(terms) == 1 else terms


def _single_image_grid(ds: Dataset, claimed: Geometry) -> Geometry:
    """A single image's plane as a grid (slice spacing taken from ``claimed``); ``claimed`` itself
    for an image without an Image Plane module (a projection radiograph has no patient grid)."""
    if not all(k in ds for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")):
        if (int(ds.Rows), int(ds.Columns)) != tuple(claimed.shape[1:]):
            raise ValueError(f"LabelMap is {claimed.shape[1:]}, the source image {int(ds.Rows)}x{int(ds.Columns)}")
        return claimed
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    return Geometry(
        shape=(1, int(ds.Rows), int(ds.Columns)),
        origin=tuple(float(v) for v in ds.ImagePositionPatient),
        spacing=(col_spacing, row_spacing, claimed.spacing[2]),
        direction=tuple(float(v) for v in np.column_stack([iop[:3], iop[3:], normal]).ravel()),
    )


def source_grid(series: SeriesData, labelmap: LabelMap, what: str) -> Geometry:
    """The source's voxel grid, checked against the label map's; ValueError when it has none."""
    if any(int(ds.get("NumberOfFrames", 1) or 1) != 1 for ds in series.datasets):
        raise ValueError(
            f"{what}: source series {series.series_uid} is multi-frame; label maps are encoded on "
            "single-frame slices only"
        )
    if len(series.datasets) != labelmap.labels.shape[0]:
        raise ValueError(
            f"{what}: LabelMap has {labelmap.labels.shape[0]} slices, source series {series.series_uid} "
            f"has {len(series.datasets)} instances"
        )
    if series.volume is not None:
        grid = series.volume.geometry
    elif len(series.datasets) == 1:
        grid = _single_image_grid(series.first, labelmap.geometry)
    else:
        try:
            ordered, grid = sort_by_geometry(series.datasets)
        except GeometryError as exc:
            raise ValueError(f"{what}: source series {series.series_uid} is not a regular volume: {exc}") from None
        if [d.SOPInstanceUID for d in ordered] != [d.SOPInstanceUID for d in series.datasets]:
            raise ValueError(f"{what}: source series {series.series_uid} headers are not in geometric order")
    same = (
        tuple(grid.shape) == tuple(labelmap.geometry.shape)
        and np.allclose(grid.origin, labelmap.geometry.origin, atol=1e-3)
        and np.allclose(grid.spacing, labelmap.geometry.spacing, rtol=1e-4)
        and np.allclose(grid.direction, labelmap.geometry.direction, atol=1e-4)
    )
    if not same:
        raise ValueError(f"{what}: LabelMap.geometry is not the voxel grid of source series {series.series_uid}")
    return grid


def settle_encoding(ds: Dataset) -> Dataset:
    """Fix ``ds``'s encoding for writing, once: Explicit VR Little Endian in its character set, for
    it and every item nested in it, ambiguous VRs (OB or OW, US or SS) resolved.

    pydicom resolves them while writing a data set of unknown encoding, and does so for every item
    again at each level it is nested in (an item's subtree is walked once per ancestor): a SEG's
    thousands of per-frame functional group items made that a quarter of its writing time. The
    written bytes are the same; elements still undecoded (copied from a source) are decoded first,
    so they are written in this object's encoding, as pydicom would have."""
    correct_ambiguous_vr(ds, True)
    stack = [ds]
    while stack:
        item = stack.pop()
        for tag, elem in list(item._dict.items()):
            if isinstance(elem, RawDataElement):
                elem = item[tag]
            if elem.VR == "SQ":
                stack.extend(elem.value)
        item.set_original_encoding(False, True, item._character_set)
    return ds
