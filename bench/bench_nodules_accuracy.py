"""Accuracy of lung-nodule detection over a set of full-size chest CT phantom variants.

Issue 19's detection targets are over "a set of phantom variants (not one)": sensitivity >= 0.95
for solid nodules >= 5 mm and >= 0.85 for ground glass >= 8 mm, at <= 1 false positive per scan on
average. This runs ``detect_nodules`` (the handler's detection and measurement, lungs from
``segment_anatomy``) on each variant (512x512x300 by default, 0.7 mm pixels, 1 mm slices; cached
under the temp folder) and prints, against the phantom's truth: sensitivity per type and size band,
false positives per scan with what each one sits on (the truth label at its centre, its distance
to the nearest vessel branch point), and the volume / mean-diameter errors.

A detection is true when its centre lies within max(3 mm, the nodule's radius) of a true nodule's
centre (as the tests pair them). Not timed: ``bench_nodules.py`` times the handler.

    .venv/bin/python bench/bench_nodules_accuracy.py [--size 512] [--slices 300] [--only vessels,...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMON = dict(nodules=10, nodule_diameter_mm=(4.5, 16.0), ground_glass_fraction=0.3)
VARIANTS = {  # name -> generate_ct options (besides the size): every kind of nodule and of look-alike
    "bench": dict(seed=19, part_solid_fraction=0.2, pleural_nodules=2, vessels=True),  # bench_nodules' baseline
    "plain": dict(seed=31),
    "vessels": dict(seed=32, vessels=True),
    "vessels2": dict(seed=33, vessels=True, nodules=12, nodule_diameter_mm=(5.0, 10.0)),
    "pleural": dict(seed=34, pleural_nodules=6, nodules=6),
    "part_solid": dict(seed=35, part_solid_fraction=0.4, ground_glass_fraction=0.3, vessels=True),
    "noisy": dict(seed=36, noise_hu=25.0, pleural_nodules=3, vessels=True),
}


def phantom(name: str, size: int, slices: int):
    from node.phantom import PhantomStudy, generate_ct

    where = Path(tempfile.gettempdir()) / f"hilum-nodules-accuracy-{size}x{slices}" / name
    if (where / "phantom.json").is_file():
        return PhantomStudy.open(where)
    spacing = round(0.7 * 512 / size, 3)
    return generate_ct(where, rows=size, cols=size, slices=slices, pixel_spacing=spacing, slice_thickness=1.0,
                       **{**COMMON, **VARIANTS[name]})


def branch_points() -> np.ndarray:
    """Patient-frame points where the phantom's vessels branch (a baseline's pose is the identity)."""
    from node.phantom.chest import vessel_tree

    tree = vessel_tree()
    starts = {tuple(np.round(a, 3)) for a, _, _ in tree}
    return np.array([b for _, b, _ in tree if tuple(np.round(b, 3)) in starts])


def pair(truth: list[dict], found) -> tuple[dict, list]:
    """truth id -> detected nodule, and the detections matching no truth (false positives)."""
    hits, fps = {}, []
    for n in found:
        dist = [np.linalg.norm(np.subtract(n.center_mm, t["center_mm"])) for t in truth]
        i = int(np.argmin(dist)) if dist else -1
        if i >= 0 and dist[i] <= max(3.0, truth[i]["radius_mm"]) and truth[i]["id"] not in hits:
            hits[truth[i]["id"]] = n
        else:
            fps.append(n)
    return hits, fps


def band(t: dict) -> str:
    d = t["diameter_mm"]
    return f"{t['type']}{' (pleural)' if t['pleural'] else ''} {'<5' if d < 5 else '5-8' if d < 8 else '>=8'} mm"


def main() -> None:
    from node.anatomy import segment_anatomy
    from node.nodules.detect import detect_nodules
    from node.volume import load_series

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--only", help="comma-separated variant names")
    ap.add_argument("--json", type=Path, help="write every true nodule's result here (to compare two runs)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    branches = branch_points()
    rows, fp_total, lines = [], 0, []
    for name in names:
        study = phantom(name, args.size, args.slices)
        series = load_series(study.series_files())
        labels = segment_anatomy(series.volume, airway=True, bone=False).labels
        t0 = time.process_time()
        det = detect_nodules(series.volume, labels)
        cpu = time.process_time() - t0
        truth = study.nodules
        hits, fps = pair(truth, det.nodules)
        fp_total += len(fps)
        rows += [(name, t, hits.get(t["id"])) for t in truth]
        missed = [f"{t['id']} {band(t)} {t['diameter_mm']:.1f}" for t in truth if t["id"] not in hits]
        lines.append(f"{name:<11} {len(hits)}/{len(truth)} found, {len(fps)} FP, detection {cpu:.1f} s CPU"
                     + (f"; missed: {', '.join(missed)}" if missed else ""))
        if fps:
            truth_labels, _ = study.label_volume()
            names_of = {int(e["value"]): e["name"] for e in study.label_table["labels"]}
            for n in fps:
                kji = tuple(int(round(v)) for v in n.center_kji)
                on = names_of.get(int(truth_labels[kji]), "?")
                vb = float(np.min(np.linalg.norm(branches - np.asarray(n.center_mm), axis=1)))
                lines.append(f"    FP {n.type:<12} d {n.mean_diameter_mm:4.1f} mm  at {np.round(n.center_mm, 1)} "
                             f"on {on}, {vb:.1f} mm from a vessel branch point, {n.side} {n.zone}")
    print(f"lung-nodule detection on {len(names)} phantom variants, {args.size}x{args.size}x{args.slices} "
          f"({0.7 * 512 / args.size:.2f} mm pixels, 1 mm slices)")
    print("\n".join(lines))
    bands: dict[str, list] = {}
    for _, t, n in rows:
        bands.setdefault(band(t), []).append(n is not None)
    print("sensitivity by type and size:")
    for b in sorted(bands):
        print(f"    {b:<32} {sum(bands[b])}/{len(bands[b])}")
    solid = [n is not None for _, t, n in rows if t["type"] == "solid" and t["diameter_mm"] >= 5.0]
    ggn = [n is not None for _, t, n in rows if t["type"] == "ground_glass" and t["diameter_mm"] >= 8.0]
    vol = [abs(n.volume_mm3 / t["volume_mm3"] - 1) for _, t, n in rows
           if n is not None and t["type"] == "solid" and t["diameter_mm"] >= 6.0]
    diam = [abs(n.mean_diameter_mm - t["diameter_mm"]) for _, t, n in rows if n is not None and t["diameter_mm"] >= 5]
    typed = [n.type == t["type"] for _, t, n in rows if n is not None and t["diameter_mm"] >= 6.0]
    print(f"solid >= 5 mm: {sum(solid)}/{len(solid)} = {sum(solid) / max(len(solid), 1):.3f} (target >= 0.95); "
          f"ground glass >= 8 mm: {sum(ggn)}/{len(ggn)} = {sum(ggn) / max(len(ggn), 1):.3f} (>= 0.85); "
          f"false positives {fp_total / len(names):.2f} per scan (<= 1)")
    for name, t, n in rows:
        if n is not None and t["type"] == "solid" and t["diameter_mm"] >= 6.0 and abs(n.volume_mm3 / t["volume_mm3"] - 1) > 0.1:
            print(f"    volume off by {n.volume_mm3 / t['volume_mm3'] - 1:+.1%}: {name} {t['id']} {band(t)} "
                  f"{t['diameter_mm']:.1f} mm")
    print(f"solid >= 6 mm |volume error| median {np.median(vol):.1%} max {np.max(vol):.1%} (<= 10 %); "
          f"|mean-diameter error| max {np.max(diam):.2f} mm (<= 1); type right {sum(typed)}/{len(typed)} (>= 90 %)")


    if args.json:
        args.json.write_text(json.dumps([
            dict(variant=name, id=t["id"], type=t["type"], pleural=t["pleural"], diameter_mm=t["diameter_mm"],
                 found=n is not None, volume_error=None if n is None else n.volume_mm3 / t["volume_mm3"] - 1,
                 diameter_error=None if n is None else n.mean_diameter_mm - t["diameter_mm"],
                 found_type=None if n is None else n.type) for name, t, n in rows], indent=1))


if __name__ == "__main__":
    main()
