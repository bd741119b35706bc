"""Rule evaluation speed: 200 rules against one CT series (target: under 5 ms per series).

Run: .venv/bin/python bench/bench_rules.py [--rules 200] [--runs 300]

Each routing run gets fresh facts (nothing cached from the previous run), as the spine builds
facts once per arriving series and routes it once.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import pydicom
from pydantic import BaseModel, ConfigDict
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.handler_api import Handler  # noqa: E402
from node.rules import RuleSet, SeriesFacts  # noqa: E402

# Rule shapes an admin writes; most do not match the CT below, as in a real rule set.
TEMPLATES = [
    "Modality: {{in: [MR, PT, NM]}}\n    SeriesDescription: {{matches: '.*t{i}_.*'}}",
    "Modality: CT\n    SliceThickness: {{between: [{lo}, {hi}]}}\n    BodyPartExamined: [HEAD, NECK, BRAIN]",
    "all:\n      - Modality: CT\n      - any:\n          - StudyDescription: {{matches: '.*(abdomen|pelvis|liver{i}).*'}}\n"
    "          - SeriesDescription: {{contains: venous{i}}}\n      - not: {{ImageType: {{contains: LOCALIZER}}}}",
    "calling_ae: {{matches: 'SCANNER_{i}.*'}}\n    arrival_time: {{between: ['18:00', '07:00']}}",
    "'0009,1001': protocol-{i}\n    is_volume: true",
    "Modality: CT\n    patient_age: {{lt: {age}}}\n    orientation: [axial, coronal]\n    instance_count: {{ge: {n}}}",
    "ImageType: {{contains: DERIVED, all: false}}\n    Manufacturer: {{equals: VENDOR{i}, exact: true}}",
    "any:\n      - PixelSpacing: {{lt: 0.{i}, all: true}}\n      - KVP: {{gt: 140}}\n    StationName: {{exists: true}}",
]


def make_rules(n: int) -> dict[str, str]:
    docs = []
    for i in range(n):
        cond = TEMPLATES[i % len(TEMPLATES)].format(i=i, lo=0.5 + i % 5, hi=1.0 + i % 5, age=i % 90, n=i)
        docs.append(f"- name: rule-{i:03d}\n  order: {i}\n  match:\n    {cond}\n  handler: bench\n"
                    f"  destinations: [orthanc]\n")
    docs.append("- name: catch-all\n  fallback: true\n  match: {}\n  handler: bench\n  destinations: [orthanc]\n")
    return {"bench.yaml": "".join(docs)}


class _AnyParams(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Bench(Handler):
    name = "bench"
    version = "0"
    Params = _AnyParams


def ct_header() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.9.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.9"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.9.1"
    ds.Modality = "CT"
    ds.PatientName = "PHANTOM^CHEST"
    ds.PatientID = "PHANTOM-001"
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20250312"
    ds.StudyDescription = "CT CHEST W/O CONTRAST"
    ds.SeriesDescription = "Thorax 1.0 B31f"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "1.0000"
    ds.KVP = "120"
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = ["-250", "-250", "-100"]
    ds.Manufacturer = "PHANTOM"
    ds.private_block(0x0009, "HILUM BENCH", create=True).add_new(0x01, "LO", "protocol-x")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()), stop_before_pixels=True)


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=200)
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()

    files = make_rules(args.rules)
    load = lambda: RuleSet.from_files(files, handlers=lambda name: _Bench, destinations={"orthanc"})  # noqa: E731
    rules = load()
    ds = ct_header()
    kwargs = dict(instance_count=240, calling_ae="CT_SCANNER_1", called_ae="HILUM", source_ip="10.0.0.5",
                  arrived_at=datetime(2025, 3, 12, 14, 30), study_uid=ds.StudyInstanceUID,
                  series_uid=ds.SeriesInstanceUID)
    template = SeriesFacts.from_dataset(ds, **kwargs)
    stored = template.to_json()

    def fresh() -> SeriesFacts:
        return SeriesFacts(study_uid=template.study_uid, series_uid=template.series_uid, header=template.header,
                           instance_count=template.instance_count, arrived_at=template.arrived_at,
                           calling_ae=template.calling_ae, called_ae=template.called_ae,
                           source_ip=template.source_ip)

    pool = [fresh() for _ in range(args.runs)]
    it = iter(pool)
    matched = rules.match_series(template)
    warm = fresh()
    rules.match_series(warm)
    rows = [
        (f"load + validate {len(rules)} rules", timed(load, 5)),
        ("facts from header (from_dataset)", timed(lambda: SeriesFacts.from_dataset(ds, **kwargs), args.runs)),
        ("facts from index (from_json)", timed(lambda: SeriesFacts.from_json(stored), args.runs)),
        (f"match_series, {len(rules)} rules, fresh facts", timed(lambda: rules.match_series(next(it)), args.runs)),
        (f"match_series, {len(rules)} rules, cached lookups", timed(lambda: rules.match_series(warm), args.runs)),
        (f"explain_series, {len(rules)} rules", timed(lambda: rules.explain_series(fresh()), max(20, args.runs // 10))),
    ]
    print(f"{len(rules)} rules, {len(matched)} matching the CT series; times in ms")
    print(f"{'step':48} {'median':>9} {'p95':>9} {'runs':>6}")
    for name, times in rows:
        p95 = sorted(times)[max(0, int(len(times) * 0.95) - 1)]
        print(f"{name:48} {statistics.median(times):9.3f} {p95:9.3f} {len(times):6d}")


if __name__ == "__main__":
    main()
