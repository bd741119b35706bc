"""Benchmark: the `lung-nodules` handler on a 512x512x300 chest CT phantom and its follow-up.

Phantoms (generated once, outside the timed runs): a baseline with random solid, ground-glass and
part-solid nodules, nodules touching the pleura and the pulmonary vessel tree, and its follow-up
120 days later (moved, breathing in by 15 mm at the lung bases, nodules grown/shrunk/vanished/stable,
one new). Each timed run is a fresh
subprocess that loads the series (not timed), resets the peak resident set (Linux clear_refs), runs
the handler (check + run, encoding excluded) and reads the peak (VmHWM, input volume included):
detection + measurement on the baseline alone, then the follow-up with the baseline as its prior
(detection on both, registration, matching). Targets (issue 19): detection + measurement <= 20 s
and <= 2 GB on 2 cores; follow-up <= 60 s. The accuracy of the same runs against the phantoms'
truth is printed with them.

    .venv/bin/python bench/bench_nodules.py [--repeat 1] [--size 512] [--slices 300] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPACING_MM = {512: 0.7}  # other sizes keep the same field of view
BREATHING_MM = 15.0  # the follow-up's deformation (node.phantom.breathing), as the registration pairs use


def phantoms(size: int, slices: int):
    from node.phantom import PhantomStudy, generate_ct, generate_followup

    # "-settled": since session 9 the follow-up's nodules are settled where the image shows them
    # (node.phantom.nodules.settle); a cache from before has a grown pleural nodule sunk into the wall.
    where = Path(tempfile.gettempdir()) / f"hilum-bench-nodules-{size}x{slices}-breathing{BREATHING_MM:g}-settled"
    if (where / "later" / "phantom.json").is_file():
        return PhantomStudy.open(where / "base"), PhantomStudy.open(where / "later")
    spacing = SPACING_MM.get(size, round(0.7 * 512 / size, 3))
    base = generate_ct(where / "base", seed=19, rows=size, cols=size, slices=slices, pixel_spacing=spacing,
                       slice_thickness=1.0, nodules=10, nodule_diameter_mm=(5.0, 16.0), ground_glass_fraction=0.3,
                       part_solid_fraction=0.2, pleural_nodules=2, vessels=True)
    later = generate_followup(base, where / "later", interval_days=120, new_nodules=1, breathing_mm=BREATHING_MM)
    return base, later


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _accuracy(study, results) -> dict:
    """Detections against the truth: hits, misses, false positives, volume and diameter errors."""
    import numpy as np

    from node.results import LabelMap, MeasurementReport

    labelmap = next((r for r in results if isinstance(r, LabelMap)), None)
    report = next(r for r in results if isinstance(r, MeasurementReport))
    groups = {g.tracking_id: g for g in report.groups}
    truth = study.nodules
    hits, fps, vol_err, diam_err, by_truth = set(), 0, [], [], {}
    for s in (labelmap.segments if labelmap else ()):
        kji = np.argwhere(labelmap.labels == s.label).mean(axis=0)
        centre = labelmap.geometry.index_to_patient(kji)
        dist = [np.linalg.norm(centre - t["center_mm"]) for t in truth]
        i = int(np.argmin(dist))
        if dist[i] > max(3.0, truth[i]["radius_mm"]) or truth[i]["id"] in hits:
            fps += 1
            continue
        hits.add(truth[i]["id"])
        values = {m.name: m.value for m in groups[s.name].measurements}
        by_truth[truth[i]["id"]] = values
        vol_err.append(values["volume"] / truth[i]["volume_mm3"] - 1)
        diam_err.append(values["mean_diameter"] - truth[i]["diameter_mm"])
    return {"truth": len(truth), "found": len(hits), "false_positives": fps,
            "missed": sorted({t["id"] for t in truth} - hits),
            "volume_error_median": float(np.median(np.abs(vol_err))) if vol_err else None,
            "volume_error_max": float(np.max(np.abs(vol_err))) if vol_err else None,
            "diameter_error_max": float(np.max(np.abs(diam_err))) if diam_err else None, "values": by_truth}


def _vdt_errors(later, values: dict) -> dict:
    """Relative VDT error per persistent nodule whose volume changed by >= 25 % (truth: changes.json),
    the nodule found where the truth puts it; None where it was not found or has no VDT."""
    out = {}
    for c in later.changes["nodules"]:
        if c["vdt_days"] is None or abs(c["volume_ratio"] - 1) < 0.25:
            continue
        vdt = values.get(c["id"], {}).get("volume_doubling_time")
        out[c["id"]] = None if vdt is None else abs(vdt / c["vdt_days"] - 1)
    return out


def run_one(size: int, slices: int, followup: bool) -> dict:
    from node.handler_api import HandlerInput, PriorStudy, get_handler
    from node.volume import load_series

    base, later = phantoms(size, slices)
    base_series = load_series(base.series_files())
    later_series = load_series(later.series_files()) if followup else None
    Path("/proc/self/clear_refs").write_text("5")
    input_mb = _status_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    handler = get_handler("lung-nodules")()
    if followup:
        inp = HandlerInput(later.study_uid, [later_series], priors=[PriorStudy(base.study_uid, None, [base_series])])
    else:
        inp = HandlerInput(base.study_uid, [base_series])
    handler.check(inp)
    results = handler.run(inp, lambda fraction, message: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"wall_s": wall, "cpu_s": cpu, "peak_mb": _status_mb("VmHWM"), "input_mb": input_mb,
           "accuracy": _accuracy(later if followup else base, results)}
    if followup:
        out["vdt_errors"] = _vdt_errors(later, out["accuracy"]["values"])
        out["notes"] = [r.text for r in results if type(r).__name__ == "TextFinding" and "Note:" in r.text]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="a 256x256x120 phantom")
    ap.add_argument("--json", type=Path, help="also write the runs as JSON here")
    ap.add_argument("--one", choices=["detect", "followup"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.size, args.slices = 256, 120
    if args.one:
        print(json.dumps(run_one(args.size, args.slices, args.one == "followup")))
        return
    phantoms(args.size, args.slices)
    report = {}
    for what in ("detect", "followup"):
        runs = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "--one", what, "--size", str(args.size), "--slices", str(args.slices)]
            runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        report[what] = runs
    print(f"lung-nodules on a {args.size}x{args.size}x{args.slices} CT phantom (1 mm slices), "
          f"{args.repeat} run(s) each (medians)")
    print("wall s / cpu s: check + run (encoding excluded); peak MB: peak RSS, input volume(s) included")
    print(f"{'':<22}{'wall s':>8}{'cpu s':>8}{'peak MB':>9}{'input MB':>10}   targets")
    for what, target in (("detect", "<= 20 s, <= 2048 MB"), ("followup", "<= 60 s")):
        runs = report[what]
        med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "peak_mb", "input_mb")}
        label = "detection+measurement" if what == "detect" else "follow-up (with prior)"
        print(f"{label:<22}{med['wall_s']:>8.2f}{med['cpu_s']:>8.2f}{med['peak_mb']:>9.0f}{med['input_mb']:>10.0f}"
              f"   {target}")
    for what in ("detect", "followup"):
        a = report[what][0]["accuracy"]
        print(f"accuracy ({what}): {a['found']}/{a['truth']} nodules found, missed {a['missed'] or 'none'}, "
              f"{a['false_positives']} false positive(s); |volume error| median {a['volume_error_median']:.1%} "
              f"max {a['volume_error_max']:.1%}; |mean-diameter error| max {a['diameter_error_max']:.2f} mm")
    errors = report["followup"][0]["vdt_errors"]
    print("VDT error (volume change >= 25 %): " + (", ".join(
        f"{k} {'not found' if e is None else f'{e:.1%}'}" for k, e in errors.items()) or "none"))
    for note in report["followup"][0]["notes"]:
        print(note)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
