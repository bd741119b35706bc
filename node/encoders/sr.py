"""Structured reports: TID 1500 measurement reports and free-text findings (highdicom).

A ``MeasurementReport`` becomes a Comprehensive 3D SR with root 126000 "Imaging Measurement
Report" and one 125007 Measurement Group per handler group, each carrying its tracking UID
(112040) and identifier (112039), the OHIF contract. A group whose segment was encoded as SEG in
the same job references that segment (TID 1411); other groups are TID 1501 groups. Names become
codes through the handler's SR template. Text findings join the report's "Qualitative
Evaluations" container or, without a report, a Comprehensive SR of their own.
"""
from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.encoders.common import (
    DEVICE_SERIAL,
    MODEL_NAME,
    choose_charset,
    coded,
    contributing_equipment,
    copy_patient_study,
    header_view,
    series_description,
    source_series,
)
from node.encoders.context import EncodeContext
from node.encoders.seg import SegReference
from node.encoders.sr_templates import SRTemplate, load_template
from node.results import MeasurementGroup, MeasurementReport, TextFinding
from node.uids import derived_uid
from node.volume import SeriesData

__all__ = ["encode_measurement_sr", "encode_text_sr", "QUALITATIVE_EVALUATIONS", "FINDING"]

QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
FINDING = codes.DCM.Finding  # (121071, DCM, "Finding")
TEXT_REPORT_TITLE = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")
_PROCEDURES = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region"),
}


def _observation_context(ctx: EncodeContext) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(MODEL_NAME, "device", DEVICE_SERIAL),
        name=MODEL_NAME,
        manufacturer_name=ctx.manufacturer,
        model_name=f"{ctx.handler} {ctx.handler_version}"[:64],
        serial_number=DEVICE_SERIAL,
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
        sop_class_uid=seg.dataset.SOPClassUID, sop_instance_uid=seg.dataset.SOPInstanceUID,
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
                    else ctx.uid(*uid_key, "group", group.tracking_id))
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


def _text_container(findings: list[TextFinding]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=FINDING, value=f.text, relationship_type="CONTAINS") for f in findings
    ])
    return container


def _document(cls, content, series: SeriesData, ctx: EncodeContext, *, uid_key: tuple, series_number: int,
              description: str, texts: list[str], evidence: list[Dataset]) -> Dataset:
    sr = cls(
        evidence=[header_view(ds) for ds in series.datasets] + evidence,
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
        device_serial_number=DEVICE_SERIAL,
        contributing_equipment=[contributing_equipment(ctx)],
        specific_character_set=None,  # set by copy_patient_study
    )
    copy_patient_study(sr, series.first, choose_charset(series.first, [description, *texts]))
    return sr


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
    groups, used = [], []
    for g in report.groups:
        seg = _find_segment(g, report, list(segs))
        if seg is not None and seg not in used:
            used.append(seg)
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
    texts = [report.title, *(g.tracking_id for g in report.groups), *(f.text for f in findings)]
    return _document(
        hd.sr.Comprehensive3DSR, content, series, ctx, uid_key=uid_key, series_number=series_number,
        description=series_description(report.title, "SR"), texts=texts, evidence=[s.dataset for s in used],
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
