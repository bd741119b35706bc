"""Structured reports: TID 1500 measurement reports and free-text findings (highdicom).

A ``MeasurementReport`` becomes a Comprehensive 3D SR with root 126000 "Imaging Measurement
Report" and one 125007 Measurement Group per handler group, each carrying its tracking UID
(112040) and identifier (112039). A group whose segment was encoded as SEG in the same job
references that segment (TID 1411); other groups are TID 1501 groups. Names become codes through
the handler's SR template. Text findings join the report's "Qualitative Evaluations" container
or, without a report, a Comprehensive SR of their own.

A structure with a SEG segment also gets a key-slice group just before its TID 1411 group: the
outline of the segment on the source image where it is largest (a closed POLYLINE SCOORD), with
the area it encloses and, for CT, its mean attenuation, each NUM "inferred from" that outline
(TID 1501 / TID 300, as OHIF itself writes). OHIF's measurement panel lists only what its
cornerstone adapters can rebuild as a tool, and they pick the tool by the group's Tracking
Identifier (``Cornerstone3DTools@^0.1.0:PlanarFreehandROI...``) or by a 4-5 point rectangle,
and they read the outline from the first NUM's INFERRED FROM SCOORD: a TID 1410 group with the
region at group level is drawn but never listed. So that group's identifier carries OHIF's tool
prefix followed by the handler's tracking id; it shares the segment's tracking UID, which OHIF
uses to merge it with the volumetric group (the volume shows with the outline).
"""
from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.encoders.common import (
    MODEL_NAME,
    choose_charset,
    clip_text,
    code_texts,
    coded,
    contributing_equipment,
    copy_patient_study,
    header_views,
    job_time,
    pixels_per_slice,
    series_description,
    settle_encoding,
    source_series,
)
from node.encoders.context import EncodeContext
from node.encoders.contours import mask_contours
from node.encoders.seg import SegReference
from node.encoders.sr_templates import SRTemplate, load_template
from node.results import MeasurementGroup, MeasurementReport, TextFinding
from node.uids import derived_uid
from node.volume import SeriesData

__all__ = ["encode_measurement_sr", "encode_text_sr", "QUALITATIVE_EVALUATIONS", "FINDING", "KEY_SLICE_PREFIX",
           "AREA", "MEAN_ATTENUATION"]

QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
FINDING = codes.DCM.Finding  # (121071, DCM, "Finding")
TEXT_REPORT_TITLE = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")
# OHIF (cornerstone adapters 3.x) rebuilds a group as its freehand contour tool when the Tracking
# Identifier starts with this; what follows the last colon is the handler's tracking id.
KEY_SLICE_PREFIX = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI:"
AREA = hd.sr.CodedConcept("42798000", "SCT", "Area")
MEAN_ATTENUATION = (hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient"),
                    hd.sr.CodedConcept("373098007", "SCT", "Mean"))
_PROCEDURES = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region"),
}


def _observation_context(ctx: EncodeContext) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(MODEL_NAME, "device", ctx.device_serial),
        name=MODEL_NAME,
        manufacturer_name=ctx.manufacturer,
        model_name=clip_text(f"{ctx.handler} {ctx.handler_version}", 64),
        serial_number=ctx.device_serial,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _algorithm(ctx: EncodeContext) -> hd.sr.AlgorithmIdentification:
    parameters = [f"rule={ctx.rule}"]
    if ctx.model_name:
        parameters.append(f"model={ctx.model_name} {ctx.model_version or ''}".strip())
    return hd.sr.AlgorithmIdentification(name=ctx.handler, version=ctx.handler_version, parameters=parameters)


def _find_segment(group: MeasurementGroup, report: MeasurementReport, segs: list[SegReference]):
    """The SEG segment a group points at: prefer a SEG of the report's own series; never guess."""
    if group.segment_label is None:
        return None
    candidates = [s for s in segs if group.segment_label in s]
    same_series = [s for s in candidates if s.source_series_uid == report.source_series_uid]
    chosen = same_series or candidates
    if len(chosen) > 1:
        raise ValueError(
            f"MeasurementGroup {group.tracking_id!r}: segment_label {group.segment_label} is defined by "
            f"{len(chosen)} label maps; cannot tell which one it means"
        )
    return chosen[0] if chosen else None


def _segment_reference(seg: SegReference, label: int) -> hd.sr.ReferencedSegment:
    # TID 1411 for every segmentation, a single image's included: highdicom's TID 1410 variant
    # names both frame and segment number, which PS3.3 forbids (dciodvfy reports it).
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.sop_class_uid, sop_instance_uid=seg.sop_instance_uid,
        segment_number=seg.segment_numbers[label],
        source_series=hd.sr.SourceSeriesForSegmentation(seg.source_series_uid),
    )


def _group(group: MeasurementGroup, template: SRTemplate, ctx: EncodeContext, uid_key: tuple,
           seg: SegReference | None):
    finding = template.finding(group.finding)
    measurements = []
    for m in group.measurements:
        mc = template.measurement(m)
        measurements.append(hd.sr.Measurement(
            name=coded(mc.concept),
            value=m.value,
            unit=hd.sr.CodedConcept(mc.unit, "UCUM", mc.unit_meaning),
            derivation=coded(mc.derivation) if mc.derivation else None,
        ))
    qualitative = [hd.sr.QualitativeEvaluation(*map(coded, template.qualitative(concept, value)))
                   for concept, value in group.qualitative]
    # A group about a SEG segment shares the segment's tracking UID: one finding, two objects.
    tracking_uid = (seg.tracking_uid(group.segment_label) if seg is not None
                    else group.tracking_uid or ctx.uid(*uid_key, "group", group.tracking_id))
    kwargs = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=group.tracking_id),
        finding_type=coded(finding.type),
        finding_category=coded(finding.category) if finding.category else None,
        finding_sites=[hd.sr.FindingSite(coded(finding.site))] if finding.site else None,
        algorithm_id=_algorithm(ctx),
        measurements=measurements or None,
        qualitative_evaluations=qualitative or None,
    )
    if seg is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**kwargs)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        referenced_segment=_segment_reference(seg, group.segment_label), **kwargs)


@dataclass(frozen=True)
class KeySlice:
    """Where a segment is largest: its source image, the frame there, and its mask."""

    source: Dataset
    frame_number: int | None  # of a multi-frame source image
    slice_index: int | None  # into the source series' volume
    mask: np.ndarray  # (rows, cols) bool


def _key_slices(seg: SegReference, sources: dict[str, SeriesData],
                counts: dict[int, np.ndarray]) -> dict[int, KeySlice]:
    """Segment number -> the slice with the most pixels of it (the first on a tie), as the SEG
    has it: found in the label map (``counts``: its ``pixels_per_slice``), so the report does not
    wait for the SEG to be encoded."""
    series = sources.get(seg.source_series_uid)
    if series is None:
        return {}
    labelmap = seg.labelmap
    # A slice of the volume only when each dataset is one slice (not frames of one instance).
    one_per_slice = series.volume is not None and len(series.datasets) == series.volume.array.shape[0]
    out = {}
    for label, number in seg.segment_numbers.items():
        members = [label, *labelmap.segment(label).includes]  # the segment's region, as the SEG has it
        pixels = sum(counts.get(m, 0) for m in members)
        if not np.any(pixels):
            continue  # an empty segment: no slice to show it on
        k = int(np.argmax(pixels))
        out[number] = KeySlice(series.datasets[k], None, k if one_per_slice else None,
                               np.isin(labelmap.labels[k], members))
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    """The largest closed contour of a 2-D mask, (n, 2) (row, col) pixel-index coordinates."""
    polygons = [poly for _, poly in mask_contours(mask[None])]
    return max(polygons, key=lambda p: abs(_shoelace(p[:, 1], p[:, 0])))


def _shoelace(x: np.ndarray, y: np.ndarray) -> float:
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _inside(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside ``polygon`` (even-odd rule).

    Contour vertices lie half-way between pixel centres, so no centre is ever on an edge: the
    pixels inside the outline are exactly the outlined component and the holes it encloses.
    """
    rows, cols = shape
    y0, x0 = polygon[:, 0], polygon[:, 1]
    y1, x1 = np.roll(y0, -1), np.roll(x0, -1)
    crossings = np.zeros((rows, cols + 1), dtype=np.int32)
    for a, b, c, d in zip(y0, x0, y1, x1):
        lo, hi = (a, c) if a < c else (c, a)
        for r in range(max(int(np.ceil(lo)), 0), min(int(np.ceil(hi)), rows)):  # rows with lo <= r < hi
            x = b + (r - a) * (d - b) / (c - a)
            crossings[r, 0] += 1  # every centre left of the crossing sees it
            crossings[r, min(max(int(np.ceil(x)), 0), cols)] -= 1
    return (np.cumsum(crossings, axis=1)[:, :cols] % 2).astype(bool)


def _key_slice_group(group: MeasurementGroup, finding, ctx: EncodeContext, seg: SegReference, key: KeySlice,
                     series: SeriesData) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    polygon = _outline(key.mask)
    row_mm, col_mm = (float(v) for v in key.source.PixelSpacing)
    area = abs(_shoelace(polygon[:, 1] * col_mm, polygon[:, 0] * row_mm))
    # SCOORD image coordinates: (column, row), 0\0 the top left corner of the top left pixel.
    closed = np.vstack([polygon, polygon[:1]])[:, ::-1] + 0.5
    region = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=closed,
        source_image=hd.sr.SourceImageForRegion(
            key.source.SOPClassUID, key.source.SOPInstanceUID,
            [key.frame_number] if key.frame_number is not None else None))
    measurements = [hd.sr.Measurement(name=AREA, value=round(area, 2), referenced_coordinates=[region],
                                      unit=hd.sr.CodedConcept("mm2", "UCUM", "square millimeter"))]
    if series.modality == "CT" and key.slice_index is not None:
        hu = series.volume.array[key.slice_index][_inside(polygon, key.mask.shape)]
        measurements.append(hd.sr.Measurement(
            name=MEAN_ATTENUATION[0], derivation=MEAN_ATTENUATION[1], value=round(float(hu.mean()), 2),
            unit=hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit"), referenced_coordinates=[region]))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=seg.tracking_uid(group.segment_label),
                                                     identifier=KEY_SLICE_PREFIX + group.tracking_id),
        finding_type=coded(finding.type),
        finding_category=coded(finding.category) if finding.category else None,
        finding_sites=[hd.sr.FindingSite(coded(finding.site))] if finding.site else None,
        algorithm_id=_algorithm(ctx),
        measurements=measurements,
    )


def _text_container(findings: list[TextFinding]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=FINDING, value=f.text, relationship_type="CONTAINS") for f in findings
    ])
    return container


def _document(cls, content, series: SeriesData, ctx: EncodeContext, *, uid_key: tuple, series_number: int,
              description: str, texts: list[str], evidence: list[Dataset]) -> Dataset:
    sr = cls(
        evidence=header_views(series, ctx) + evidence,
        content=content,
        series_instance_uid=ctx.uid(*uid_key, "series"),
        series_number=series_number,
        sop_instance_uid=ctx.uid(*uid_key, "instance", 1),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        is_complete=True,
        is_final=False,  # an algorithm's findings are preliminary until a physician verifies them
        series_description=description,
        manufacturer_model_name=MODEL_NAME,
        software_versions=ctx.software_version,
        device_serial_number=ctx.device_serial,
        contributing_equipment=[contributing_equipment(ctx)],
        specific_character_set=None,  # set by copy_patient_study
    )
    copy_patient_study(sr, series.first, choose_charset(series.first, [description, *texts], ctx))
    job_time(sr, ctx)
    # Settled, pydicom writes the content tree without walking it for ambiguous VRs once per
    # level, and node.encoders.fastwrite can serialise its sequences (0.08 -> 0.03 CPU s).
    return settle_encoding(sr)


def _template_texts(template: SRTemplate, report: MeasurementReport) -> list[str]:
    """The strings the template puts in the report for ``report``'s groups: its codes' meanings."""
    out = code_texts(template.procedure)
    for g in report.groups:
        finding = template.finding(g.finding)
        out += code_texts(finding.type, finding.site, finding.category)
        for m in g.measurements:
            mc = template.measurement(m)
            out += [mc.unit, mc.unit_meaning, *code_texts(mc.concept, mc.derivation)]
        for concept, value in g.qualitative:
            out += code_texts(*template.qualitative(concept, value))
    return out


def encode_measurement_sr(
    report: MeasurementReport,
    sources: dict[str, SeriesData],
    ctx: EncodeContext,
    *,
    series_number: int,
    segs: list[SegReference] = (),
    findings: list[TextFinding] = (),
) -> Dataset:
    """A TID 1500 Comprehensive 3D SR of ``report`` (plus ``findings`` as text evaluations)."""
    series = source_series(sources, report.source_series_uid, "MeasurementReport")
    template = load_template(report.template)
    template.check(report)  # every name mapped before anything is built: one clear error
    uid_key = ("SR", series_number)
    groups, used, key_slices, counts = [], [], {}, {}
    for g in report.groups:
        seg = _find_segment(g, report, list(segs))
        if seg is not None and seg not in used:
            used.append(seg)
            # Counted once per label map: a Label Map SEG and the binary SEG of its External share it.
            if id(seg.labelmap) not in counts:
                counts[id(seg.labelmap)] = pixels_per_slice(seg.labelmap.labels, ctx)
            key_slices[id(seg)] = _key_slices(seg, sources, counts[id(seg.labelmap)])
        key = key_slices[id(seg)].get(seg.segment_numbers[g.segment_label]) if seg is not None else None
        if key is not None:
            groups.append(_key_slice_group(g, template.finding(g.finding), ctx, seg, key,
                                           sources[seg.source_series_uid]))
        groups.append(_group(g, template, ctx, uid_key, seg))
    modality = str(series.first.get("Modality", ""))
    procedure = (coded(template.procedure) if template.procedure
                 else _PROCEDURES.get(modality, codes.SCT.ImagingProcedure))
    content = hd.sr.MeasurementReport(
        observation_context=_observation_context(ctx),
        procedure_reported=procedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    if findings:
        content[0].ContentSequence.append(_text_container(list(findings)))
    texts = [report.title, *(g.tracking_id for g in report.groups), *(f.text for f in findings),
             *_template_texts(template, report)]
    return _document(
        hd.sr.Comprehensive3DSR, content, series, ctx, uid_key=uid_key, series_number=series_number,
        description=series_description(report.title, "SR"), texts=texts, evidence=[s.evidence() for s in used],
    )


def encode_text_sr(findings: list[TextFinding], sources: dict[str, SeriesData], ctx: EncodeContext, *,
                   series_number: int) -> Dataset:
    """A Comprehensive SR holding free-text findings about one source series."""
    if not findings:
        raise ValueError("encode_text_sr needs at least one TextFinding")
    uids = {f.source_series_uid for f in findings}
    if len(uids) != 1:
        raise ValueError(f"TextFinding.source_series_uid differs between findings of one SR: {sorted(uids)}")
    series = source_series(sources, uids.pop(), "TextFinding")
    root = hd.sr.ContainerContentItem(name=TEXT_REPORT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=FINDING, value=f.text, relationship_type="CONTAINS") for f in findings
    ])
    return _document(
        hd.sr.ComprehensiveSR, root, series, ctx, uid_key=("TEXT-SR", series_number),
        series_number=series_number, description=series_description(f"{ctx.handler} findings", "SR"),
        texts=[f.text for f in findings], evidence=[],
    )
