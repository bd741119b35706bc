"""Benchmark: SEG with 10 segments and RTSTRUCT with 10 ROIs on a 512x512x300 CT grid.

Each encoder runs in a fresh subprocess; its peak memory is the process's peak resident set
(VmHWM) reset after the inputs are built, so it counts the encoder and the write only. The source is
a synthetic header-only series (what the encoders get: PixelData removed), the label map ten
ellipsoids of different sizes, two with holes, several touching the image border.
Targets (issue 5): under 10 s and under 2 GB each. Prints medians over --repeat runs.

    .venv/bin/python bench/bench_encoders.py [--repeat 3] [--slices 300] [--size 512]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(size: int, slices: int):
    import numpy as np
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage

    from node.results import Code, LabelMap, Segment
    from node.uids import derived_uid
    from node.volume import SeriesData, sort_by_geometry

    headers = []
    for k in range(slices):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = derived_uid("bench", "sop", k)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = derived_uid("bench", "study"), derived_uid("bench", "series")
        ds.FrameOfReferenceUID = derived_uid("bench", "for")
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "PHANTOM^BENCH", "BENCH", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-179.0, -179.0, -150.0 + k * 1.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        headers.append(ds)
    headers, geometry = sort_by_geometry(headers)
    series = SeriesData(headers[0].SeriesInstanceUID, "CT", headers)
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    z, y, x = np.ogrid[:slices, :size, :size]
    anat = Code("91723000", "SCT", "Anatomical Structure")
    segments = []
    rng = np.random.default_rng(0)
    for i in range(10):
        cz, cy, cx = rng.uniform(0.3, 0.7) * slices, rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size
        rz, ry, rx = rng.uniform(0.15, 0.4) * slices, rng.uniform(0.08, 0.3) * size, rng.uniform(0.08, 0.3) * size
        shell = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
        inside = shell < 1
        if i % 5 == 0:
            inside &= shell > 0.3  # a hollow structure: a hole on every slice
        labels[inside] = i + 1
        segments.append(Segment(i + 1, f"Structure {i + 1}", anat, Code("39607008", "SCT", "Lung"),
                                tg263=f"Struct_{i + 1}", color=(20 * i, 255 - 20 * i, 128)))
    lm = LabelMap(series.series_uid, geometry, labels, tuple(segments), description="Bench")
    return lm, {series.series_uid: series}


def run_one(kind: str, size: int, slices: int) -> dict:
    from node.encoders.context import EncodeContext
    from node.encoders.rtstruct import encode_rtstruct
    from node.encoders.seg import encode_seg

    lm, sources = build(size, slices)
    ctx = EncodeContext(job_key="bench", rule="bench", handler="bench", handler_version="1")
    baseline_mb = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "SEG":
        ds = encode_seg(lm, sources, ctx, series_number=9000)[0]
        detail = f"{int(ds.NumberOfFrames)} frames"
    else:
        ds = encode_rtstruct(lm, sources, ctx, series_number=9001)
        detail = f"{sum(len(r.get('ContourSequence', [])) for r in ds.ROIContourSequence)} contours"
    encode_s, encode_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    out = Path("/tmp") / f"hilum-bench-{kind}.dcm"
    ds.save_as(out, enforce_file_format=True)
    total_s = time.perf_counter() - t0
    peak_mb = _peak_mb()
    size_mb = out.stat().st_size / 2**20
    out.unlink()
    return {"encode_s": encode_s, "encode_cpu_s": encode_cpu_s, "total_s": total_s, "peak_mb": peak_mb, "input_mb": baseline_mb,
            "file_mb": size_mb, "detail": detail}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> float:
    """Reset the peak RSS to the current RSS (Linux clear_refs); return the current RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    return _status_mb("VmHWM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--one", choices=["SEG", "RTSTRUCT"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.size, args.slices)))
        return
    print(f"grid {args.size}x{args.size}x{args.slices}, 10 structures, {args.repeat} runs each (medians)")
    print("encode s: encoder alone (wall; cpu s: its CPU time, less sensitive to a busy machine);")
    print("+write s: encoder and save_as; peak MB: peak RSS of the process during")
    print("encode+write (inputs included); inputs MB: RSS before encoding (label map, headers, libraries)")
    print(f"{'object':<10}{'encode s':>10}{'cpu s':>10}{'+write s':>10}{'peak MB':>10}{'inputs MB':>10}"
          f"{'file MB':>10}  detail")
    for kind in ("SEG", "RTSTRUCT"):
        runs = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "--one", kind, "--size", str(args.size), "--slices", str(args.slices)]
            runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        keys = ("encode_s", "encode_cpu_s", "total_s", "peak_mb", "input_mb", "file_mb")
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        print(f"{kind:<10}{med['encode_s']:>10.2f}{med['encode_cpu_s']:>10.2f}{med['total_s']:>10.2f}"
              f"{med['peak_mb']:>10.0f}"
              f"{med['input_mb']:>10.0f}{med['file_mb']:>10.1f}  {runs[0]['detail']}")


if __name__ == "__main__":
    main()
