"""Benchmark: which SEG representation for ct-anatomy's label map (issue 15's evaluation).

The ct-anatomy label map of a phantom chest CT is written as a Segmentation in each candidate
representation, by highdicom (the node's SEG encoder for the one in use): file size, encode time
(CPU seconds, steadier than wall time on a busy machine) and write time. The label map's External
includes the lungs, airway and bone (the body outline), so its segments overlap; a LABELMAP SEG
holds one label per pixel and can only carry the exclusive labels (External = body less organs),
a different meaning, listed here for its size and speed.

Each object is then stored by STOW-RS (dicomweb-client's store_instances: the node's delivery
path until session 9, which now posts the file to Orthanc's /instances) into a real Orthanc with
its DICOMweb plugin (tests/pacs_peers.py), one object per request; "stow s" is that request's wall time, until Orthanc
answered that it stored the object (one measurement per representation, each its own instance).

    .venv/bin/python bench/bench_seg_formats.py [--slices 300] [--size 512] [--no-stow]
"""
from __future__ import annotations

import argparse
import time
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from benchlib import files_of, phantom_ct


def _inputs(slices: int, size: int):
    from node.handler_api import HandlerInput, get_handler
    from node.volume import load_series

    series = load_series(files_of(phantom_ct(slices, size=size)))
    label_map, _ = get_handler("ct-anatomy")({}).run(HandlerInput(series.first.StudyInstanceUID, [series]),
                                                     lambda f, m: None)
    return series, label_map


def _stow(url: str, seg) -> float:
    """Seconds to store ``seg`` by STOW-RS; raises if refused."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url + "/dicom-web", session=requests.Session())
    t0 = time.perf_counter()
    resp = client.store_instances(datasets=[seg], study_instance_uid=str(seg.StudyInstanceUID))
    seconds = time.perf_counter() - t0
    stored = {str(r.ReferencedSOPInstanceUID) for r in resp.get("ReferencedSOPSequence", [])}
    if str(seg.SOPInstanceUID) not in stored:
        raise RuntimeError(f"Orthanc did not store the SEG: {resp}")
    return seconds


def _variant(series, lm, segmentation_type, pixels, syntax, ctx, stow_url: str | None = None, name: str = ""):
    from node.encoders.common import header_view
    from node.encoders.seg import _segment_descriptions

    t0, c0 = time.perf_counter(), time.process_time()
    seg = hd.seg.Segmentation(
        source_images=[header_view(ds) for ds in series.datasets], pixel_array=pixels,
        segmentation_type=segmentation_type, segment_descriptions=_segment_descriptions(lm, ctx, ("bench",)),
        series_instance_uid=ctx.uid("s", name), series_number=9000, sop_instance_uid=ctx.uid("i", name),
        instance_number=1,
        manufacturer="Hilum", manufacturer_model_name="Hilum", software_versions="bench", device_serial_number="1",
        omit_empty_frames=True, transfer_syntax_uid=syntax,
    )
    encode_s, encode_cpu = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    buf = BytesIO()
    seg.save_as(buf)
    write_s = time.perf_counter() - t1
    return {"encode_s": encode_s, "encode_cpu_s": encode_cpu, "write_s": write_s,
            "mb": len(buf.getvalue()) / 2**20, "frames": int(seg.NumberOfFrames),
            "stow_s": _stow(stow_url, seg) if stow_url else None}


def _node_seg(series, lm, ctx, stow_url: str | None, number: int, part=None):
    """The node's own SEG encoder (node/encoders/seg.py), as a job runs it: encode, write, STOW."""
    from node.encoders.seg import encode_seg

    t0, c0 = time.perf_counter(), time.process_time()
    seg, _ = encode_seg(lm, {series.series_uid: series}, ctx, series_number=number, part=part)
    encode_s, encode_cpu = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    buf = BytesIO()
    seg.save_as(buf)
    return {"encode_s": encode_s, "encode_cpu_s": encode_cpu, "write_s": time.perf_counter() - t1,
            "mb": len(buf.getvalue()) / 2**20, "frames": int(seg.NumberOfFrames),
            "stow_s": _stow(stow_url, seg) if stow_url else None}


def _split(lm):
    """The label map as two: the exclusive organs (External left out) and the External alone (the
    whole body, what the organs' SEG cannot carry)."""
    import dataclasses

    from node.results import LabelMap

    external = [s for s in lm.segments if s.includes]
    organs = tuple(s for s in lm.segments if not s.includes)
    inside = np.isin(lm.labels, [s.label for s in organs])
    organ_map = LabelMap(lm.source_series_uid, lm.geometry, np.where(inside, lm.labels, 0).astype(lm.labels.dtype),
                         organs, description=lm.description)
    body = tuple(dataclasses.replace(s, includes=()) for s in external)
    body_map = LabelMap(lm.source_series_uid, lm.geometry,
                        ((lm.labels != 0) * body[0].label).astype(lm.labels.dtype), body, description=lm.description)
    return organ_map, body_map


def _sum(*parts: dict) -> dict:
    out = {k: sum(p[k] for p in parts) for k in ("encode_s", "encode_cpu_s", "write_s", "mb", "frames")}
    out["stow_s"] = None if parts[0]["stow_s"] is None else sum(p["stow_s"] for p in parts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-stow", action="store_true", help="sizes and encode times only, no Orthanc")
    args = ap.parse_args()
    if args.no_stow:
        run(args, None)
        return
    import tempfile

    from tests.pacs_peers import pacs_orthanc

    with tempfile.TemporaryDirectory(prefix="bench-seg-formats-") as d, pacs_orthanc(Path(d) / "orthanc") as orthanc:
        run(args, orthanc.url)


def run(args, stow_url: str | None) -> None:
    import dataclasses

    from node.encoders.context import EncodeContext
    from node.encoders.seg import seg_parts

    series, lm = _inputs(args.slices, args.size)
    ctx = EncodeContext(job_key="bench", rule="bench", handler="ct-anatomy", handler_version="1")
    stack = np.stack([lm.region(s.label) for s in lm.segments], axis=-1)  # highdicom's overlapping input
    numbers = {s.label: n for n, s in enumerate(lm.segments, start=1)}
    exclusive = np.zeros_like(lm.labels)
    for label, n in numbers.items():
        exclusive[lm.labels == label] = n
    binary, labelmap = hd.seg.SegmentationTypeValues.BINARY, hd.seg.SegmentationTypeValues.LABELMAP
    variants = [
        ("BINARY, overlapping (highdicom)", binary, stack, ExplicitVRLittleEndian),
        ("BINARY, overlapping, RLE", binary, stack, RLELossless),
        ("BINARY, overlapping, JPEG 2000 lossless", binary, stack, JPEG2000Lossless),
        ("LABELMAP, exclusive", labelmap, exclusive, ExplicitVRLittleEndian),
        ("LABELMAP, exclusive, RLE", labelmap, exclusive, RLELossless),
        ("LABELMAP, exclusive, JPEG-LS lossless", labelmap, exclusive, JPEGLSLossless),
    ]
    print(f"ct-anatomy label map of a {args.size}x{args.size}x{args.slices} phantom CT, "
          f"{len(lm.segments)} segments (External includes the others)")
    print(f"{'representation':<42}{'MB':>8}{'frames':>8}{'encode s':>10}{'cpu s':>8}{'write s':>9}{'stow s':>8}")
    organ_map, body_map = _split(lm)
    labelmap_lm = dataclasses.replace(lm, seg_format="labelmap")
    organ_numbers = {s.label: n for n, s in enumerate(organ_map.segments, start=1)}
    organ_pixels = np.zeros_like(lm.labels)
    for label, n in organ_numbers.items():
        organ_pixels[organ_map.labels == label] = n
    combined = [
        ("node's encoder, seg_format binary", lambda: _node_seg(
            series, dataclasses.replace(lm, seg_format="binary"), ctx, stow_url, 9100)),
        ("node's encoder, labelmap (in use)", lambda: _sum(*(
            _node_seg(series, labelmap_lm, ctx, stow_url, 9110 + i, part) for i, part in enumerate(seg_parts(labelmap_lm))))),
        ("LABELMAP organs + BINARY External: 2 SEGs", lambda: _sum(
            _variant(series, organ_map, labelmap, organ_pixels, ExplicitVRLittleEndian, ctx, stow_url, "o1"),
            _node_seg(series, body_map, ctx, stow_url, 9101))),
        ("LABELMAP organs JPEG-LS + BINARY External", lambda: _sum(
            _variant(series, organ_map, labelmap, organ_pixels, JPEGLSLossless, ctx, stow_url, "o2"),
            _node_seg(series, body_map, ctx, stow_url, 9102))),
    ]
    runs = [(name, lambda kind=kind, pixels=pixels, syntax=syntax, name=name: _variant(
        series, lm, kind, pixels, syntax, ctx, stow_url, name)) for name, kind, pixels, syntax in variants] + combined
    for name, make in runs:
        try:
            r = make()
        except Exception as exc:  # noqa: BLE001 - one highdicom cannot write or Orthanc refuses is a finding
            print(f"{name:<42}  not written or not stored: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        stow = f"{r['stow_s']:>8.2f}" if r["stow_s"] is not None else f"{'-':>8}"
        print(f"{name:<42}{r['mb']:>8.1f}{r['frames']:>8}{r['encode_s']:>10.2f}{r['encode_cpu_s']:>8.2f}"
              f"{r['write_s']:>9.2f}{stow}")
    if stow_url:
        print("stow s: one STOW-RS request per object into a local Orthanc (DICOMweb plugin), until it answered")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
