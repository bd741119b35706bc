"""Turn handler results (``node.results``) into DICOM objects placed in the source study.

``encode`` picks the encoder(s) for one result; ``encode_all`` encodes a handler's whole result
list, label maps first, so that a measurement report can reference the segments of a SEG made
in the same job. Every result gets series of its own, numbered from ``ctx.series_number``
upwards, skipping numbers the source series already use; UIDs derive from the job and the
series number, so encoding the same job again gives the same objects' UIDs.

    LabelMap          -> SEG (binary; plus a fractional SEG when it has fractions) and/or RTSTRUCT,
                         per LabelMap.encodings
    MeasurementReport -> TID 1500 Comprehensive 3D SR (text findings of its series included)
    ImageSeries       -> Secondary Capture (one instance per frame, or one multi-frame instance)
    TextFinding       -> Comprehensive SR, or the measurement report of the same series
    SpatialRegistration / DeformableRegistration -> (Deformable) Spatial Registration Storage
    ResampledSeries   -> CT or MR Image series on the fixed grid, referencing the registration
                         encoded in the same job
"""
from __future__ import annotations

from collections.abc import Iterator

from pydicom.dataset import Dataset

from node.encoders.context import EncodeContext
from node.encoders.rtstruct import encode_rtstruct
from node.encoders.sc import encode_sc
from node.encoders.seg import SegReference, encode_seg
from node.encoders.sr import encode_measurement_sr, encode_text_sr
from node.encoders.registration import encode_deformable_registration, encode_spatial_registration
from node.encoders.resampled import encode_resampled
from node.results import (DeformableRegistration, ImageSeries, LabelMap, MeasurementReport, ResampledSeries,
                          SpatialRegistration, TextFinding)
from node.volume import SeriesData

__all__ = ["EncodeContext", "encode", "encode_all", "series_count"]


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
        seg = "SEG" in result.encodings
        return int(seg) + int(seg and result.fractions is not None) + int("RTSTRUCT" in result.encodings)
    if isinstance(result, (MeasurementReport, ImageSeries, TextFinding, SpatialRegistration,
                           DeformableRegistration, ResampledSeries)):
        return 1
    raise TypeError(f"cannot encode {type(result).__name__}: not a node.results type")


def _encode_labelmap(lm: LabelMap, sources, ctx, numbers: Iterator[int]) -> tuple[list[Dataset], list[SegReference]]:
    out, refs = [], []
    if "SEG" in lm.encodings:
        seg, ref = encode_seg(lm, sources, ctx, series_number=next(numbers))
        out.append(seg)
        refs.append(ref)
        if lm.fractions is not None:
            out.append(encode_seg(lm, sources, ctx, series_number=next(numbers), fractional=True)[0])
    if "RTSTRUCT" in lm.encodings:
        out.append(encode_rtstruct(lm, sources, ctx, series_number=next(numbers)))
    return out, refs


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
        return _encode_labelmap(result, sources, ctx, numbers)[0]
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
    raise TypeError(f"cannot encode {type(result).__name__}: not a node.results type")


def _encode_registration(result, sources, ctx, number: int) -> Dataset:
    if isinstance(result, SpatialRegistration):
        return encode_spatial_registration(result, sources, ctx, series_number=number)
    return encode_deformable_registration(result, sources, ctx, series_number=number)


def encode_all(results: list, sources: dict[str, SeriesData], ctx: EncodeContext) -> list[Dataset]:
    """Every object for a handler's results, label maps first so reports can point at SEG segments."""
    for r in results:
        series_count(r)  # TypeError for anything that is not a result
    numbers = _series_numbers(ctx, sources, 0)
    out: list[Dataset] = []
    segs: list[SegReference] = []
    for lm in (r for r in results if isinstance(r, LabelMap)):
        datasets, refs = _encode_labelmap(lm, sources, ctx, numbers)
        out += datasets
        segs += refs
    texts = [r for r in results if isinstance(r, TextFinding)]
    for report in (r for r in results if isinstance(r, MeasurementReport)):
        mine = [t for t in texts if t.source_series_uid == report.source_series_uid]
        texts = [t for t in texts if t.source_series_uid != report.source_series_uid]
        out.append(encode_measurement_sr(report, sources, ctx, series_number=next(numbers), segs=segs, findings=mine))
    for uid in dict.fromkeys(t.source_series_uid for t in texts):
        group = [t for t in texts if t.source_series_uid == uid]
        out.append(encode_text_sr(group, sources, ctx, series_number=next(numbers)))
    for images in (r for r in results if isinstance(r, ImageSeries)):
        out += encode_sc(images, sources, ctx, series_number=next(numbers))
    # Registrations before the resampled series that reference them (one registration per job).
    registrations = [_encode_registration(r, sources, ctx, next(numbers)) for r in results
                     if isinstance(r, (SpatialRegistration, DeformableRegistration))]
    out += registrations
    for res in (r for r in results if isinstance(r, ResampledSeries)):
        out += encode_resampled(res, sources, ctx, series_number=next(numbers),
                                registration=registrations[0] if len(registrations) == 1 else None)
    return out
