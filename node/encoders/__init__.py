"""Turn handler results (``node.results``) into DICOM objects placed in the source study.

``encode`` picks the encoder(s) for one result; ``encode_all`` encodes a handler's whole result
list, label maps first, so that a measurement report can reference the segments of a SEG made
in the same job. Every result gets series of its own, numbered from ``ctx.series_number``
upwards, skipping numbers the source series already use; UIDs derive from the job and the
series number, so encoding the same job again gives the same objects' UIDs.

``encode_plan`` gives the same work as tasks in three independent lanes (SEGs, reports, the
rest), so a worker can make them in the order that suits delivery (node/jobs/lanes.py) and hand
each object on as soon as it is made.

    LabelMap          -> SEG (per LabelMap.seg_format: one binary SEG, or a Label Map SEG of the
                         exclusive segments plus a binary SEG of those that include others; and a
                         fractional SEG when it has fractions) and/or RTSTRUCT, per LabelMap.encodings
    MeasurementReport -> TID 1500 Comprehensive 3D SR (text findings of its series included)
    ImageSeries       -> Secondary Capture (one instance per frame, or one multi-frame instance)
    TextFinding       -> Comprehensive SR, or the measurement report of the same series
    SpatialRegistration / DeformableRegistration -> (Deformable) Spatial Registration Storage
    ResampledSeries   -> CT or MR Image series on the fixed grid, referencing the registration
                         encoded in the same job
    QuantityMap       -> Parametric Map (float32, on the map's own grid) referencing the source series
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from pydicom.dataset import Dataset

from node.encoders.context import EncodeContext
from node.encoders.rtstruct import encode_rtstruct
from node.encoders.sc import encode_sc
from node.encoders.seg import SegPart, SegReference, encode_seg, seg_parts, seg_reference
from node.encoders.sr import encode_measurement_sr, encode_text_sr
from node.encoders.registration import encode_deformable_registration, encode_spatial_registration
from node.encoders.resampled import encode_resampled
from node.encoders.pmap import encode_quantity_map
from node.results import (DeformableRegistration, ImageSeries, LabelMap, MeasurementReport, QuantityMap,
                          ResampledSeries, SpatialRegistration, TextFinding)
from node.volume import SeriesData

__all__ = ["EncodeContext", "EncodeTask", "OTHER_LANE", "REPORT_LANE", "SEG_LANE", "encode", "encode_all", "encode_iter",
           "encode_plan", "series_count"]


def _series_numbers(ctx: EncodeContext, sources: dict[str, SeriesData], offset: int) -> Iterator[int]:
    """ctx.series_number + offset, + 1, ... skipping the SeriesNumbers of the source series."""
    taken = set()
    for s in sources.values():
        try:
            taken.add(int(s.first.get("SeriesNumber")))
        except (TypeError, ValueError):
            continue  # Type 2: may be empty
    n = ctx.series_number + offset
    while True:
        if n not in taken:
            yield n
        n += 1


def series_count(result) -> int:
    """How many series ``encode`` makes for ``result`` (its share of the series offsets)."""
    if isinstance(result, LabelMap):
        if "SEG" not in result.encodings:
            return int("RTSTRUCT" in result.encodings)
        return len(seg_parts(result)) + int(result.fractions is not None) + int("RTSTRUCT" in result.encodings)
    if isinstance(result, (MeasurementReport, ImageSeries, TextFinding, SpatialRegistration,
                           DeformableRegistration, ResampledSeries, QuantityMap)):
        return 1
    raise TypeError(f"cannot encode {type(result).__name__}: not a node.results type")


def _encode_labelmap(lm: LabelMap, sources, ctx, numbers: Iterator[int],
                     refs: list[SegReference]) -> Iterator[Dataset]:
    """The label map's objects one by one; each SEG's reference is appended to ``refs`` as it is made."""
    if "SEG" in lm.encodings:
        for part in seg_parts(lm):
            seg, ref = encode_seg(lm, sources, ctx, series_number=next(numbers), part=part)
            refs.append(ref)
            yield seg
        if lm.fractions is not None:
            yield encode_seg(lm, sources, ctx, series_number=next(numbers), fractional=True)[0]
    if "RTSTRUCT" in lm.encodings:
        yield encode_rtstruct(lm, sources, ctx, series_number=next(numbers))


def encode(
    result,
    sources: dict[str, SeriesData],
    ctx: EncodeContext,
    *,
    series_offset: int = 0,
    segs: list[SegReference] = (),
) -> list[Dataset]:
    """The DICOM objects for one result; ``segs`` lets a MeasurementReport reference SEG segments."""
    numbers = _series_numbers(ctx, sources, series_offset)
    if isinstance(result, LabelMap):
        return list(_encode_labelmap(result, sources, ctx, numbers, []))
    if isinstance(result, MeasurementReport):
        return [encode_measurement_sr(result, sources, ctx, series_number=next(numbers), segs=list(segs))]
    if isinstance(result, ImageSeries):
        return encode_sc(result, sources, ctx, series_number=next(numbers))
    if isinstance(result, TextFinding):
        return [encode_text_sr([result], sources, ctx, series_number=next(numbers))]
    if isinstance(result, (SpatialRegistration, DeformableRegistration)):
        return [_encode_registration(result, sources, ctx, next(numbers))]
    if isinstance(result, ResampledSeries):
        return encode_resampled(result, sources, ctx, series_number=next(numbers), registration=None)
    if isinstance(result, QuantityMap):
        return [encode_quantity_map(result, sources, ctx, series_number=next(numbers))]
    raise TypeError(f"cannot encode {type(result).__name__}: not a node.results type")


def _encode_registration(result, sources, ctx, number: int) -> Dataset:
    if isinstance(result, SpatialRegistration):
        return encode_spatial_registration(result, sources, ctx, series_number=number)
    return encode_deformable_registration(result, sources, ctx, series_number=number)


def encode_all(results: list, sources: dict[str, SeriesData], ctx: EncodeContext) -> list[Dataset]:
    """Every object for a handler's results, label maps first so reports can point at SEG segments."""
    return list(encode_iter(results, sources, ctx))


def encode_iter(results: list, sources: dict[str, SeriesData], ctx: EncodeContext) -> Iterator[Dataset]:
    """``encode_all`` one object at a time, each as soon as it is made."""
    for task in encode_plan(results, sources, ctx):
        yield from task.make()


SEG_LANE, REPORT_LANE, OTHER_LANE = 0, 1, 2


@dataclass(frozen=True)
class EncodeTask:
    """One encoder run; ``make()`` gives its objects. Lanes do not depend on each other (a report
    names the segments of a SEG by UIDs known before the SEG is made), so a worker may make them
    in any order: the SEGs, the reports (small, so first in the archive), and the rest."""

    lane: int
    kind: str  # what it makes, for timings: SEG, FSEG, RTSTRUCT, SR, SC, REG, PMAP
    make: Callable[[], list[Dataset]]


def encode_plan(results: list, sources: dict[str, SeriesData], ctx: EncodeContext) -> list[EncodeTask]:
    """Every encoder run for a handler's results, in ``encode_all``'s order. Series numbers are
    given out here, up front, so the objects are the same whichever order the tasks run in."""
    for r in results:
        series_count(r)  # TypeError for anything that is not a result, before any work
    numbers = _series_numbers(ctx, sources, 0)
    segs: list[SegReference] = []  # known before any SEG is made: a report need not wait for one
    tasks: list[EncodeTask] = []

    def seg(lm: LabelMap, number: int, part: SegPart) -> list[Dataset]:
        return [encode_seg(lm, sources, ctx, series_number=number, part=part)[0]]

    def fractional_seg(lm: LabelMap, number: int) -> list[Dataset]:
        return [encode_seg(lm, sources, ctx, series_number=number, fractional=True)[0]]

    def rtstruct(lm: LabelMap, number: int) -> list[Dataset]:
        return [encode_rtstruct(lm, sources, ctx, series_number=number)]

    def report_sr(report: MeasurementReport, number: int, findings: list[TextFinding]) -> list[Dataset]:
        return [encode_measurement_sr(report, sources, ctx, series_number=number, segs=segs, findings=findings)]

    def text_sr(group: list[TextFinding], number: int) -> list[Dataset]:
        return [encode_text_sr(group, sources, ctx, series_number=number)]

    def sc(images: ImageSeries, number: int) -> list[Dataset]:
        return encode_sc(images, sources, ctx, series_number=number)

    def quantity_map(qmap: QuantityMap, number: int) -> list[Dataset]:
        return [encode_quantity_map(qmap, sources, ctx, series_number=number)]

    def registration(regs: list, resampled: list) -> list[Dataset]:
        done = [_encode_registration(r, sources, ctx, number) for r, number in regs]
        for res, number in resampled:
            done += encode_resampled(res, sources, ctx, series_number=number,
                                     registration=done[0] if len(regs) == 1 else None)
        return done

    for lm in (r for r in results if isinstance(r, LabelMap)):
        if "SEG" in lm.encodings:
            for part in seg_parts(lm):
                number = next(numbers)
                segs.append(seg_reference(lm, sources, ctx, series_number=number, part=part))
                tasks.append(EncodeTask(SEG_LANE, "SEG", partial(seg, lm, number, part)))
            if lm.fractions is not None:
                tasks.append(EncodeTask(SEG_LANE, "FSEG", partial(fractional_seg, lm, next(numbers))))
        if "RTSTRUCT" in lm.encodings:
            tasks.append(EncodeTask(OTHER_LANE, "RTSTRUCT", partial(rtstruct, lm, next(numbers))))
    texts = [r for r in results if isinstance(r, TextFinding)]
    for report in (r for r in results if isinstance(r, MeasurementReport)):
        mine = [t for t in texts if t.source_series_uid == report.source_series_uid]
        texts = [t for t in texts if t.source_series_uid != report.source_series_uid]
        tasks.append(EncodeTask(REPORT_LANE, "SR", partial(report_sr, report, next(numbers), mine)))
    for uid in dict.fromkeys(t.source_series_uid for t in texts):
        group = [t for t in texts if t.source_series_uid == uid]
        tasks.append(EncodeTask(REPORT_LANE, "SR", partial(text_sr, group, next(numbers))))
    for images in (r for r in results if isinstance(r, ImageSeries)):
        tasks.append(EncodeTask(OTHER_LANE, "SC", partial(sc, images, next(numbers))))
    for qmap in (r for r in results if isinstance(r, QuantityMap)):
        tasks.append(EncodeTask(OTHER_LANE, "PMAP", partial(quantity_map, qmap, next(numbers))))
    # Registrations, then the resampled series that reference them (one registration per job): one
    # task, since a resampled image cites the registration object's UIDs.
    regs = [(r, next(numbers)) for r in results if isinstance(r, (SpatialRegistration, DeformableRegistration))]
    resampled = [(r, next(numbers)) for r in results if isinstance(r, ResampledSeries)]
    if regs or resampled:
        tasks.append(EncodeTask(OTHER_LANE, "REG", partial(registration, regs, resampled)))
    return tasks
