"""Registration benchmark: Hilum (node.registration) against elastix (itk-elastix), same pairs.

Run: .venv/bin/python bench/bench_registration.py [--size 512 --slices 300] [--quick] [--no-elastix]

Pairs come from the phantom generator with their truth (node.phantom.pairs): a chest CT and its
follow-up moved rigidly (CT-CT rigid), the same with breathing (CT-CT deformable), a head CT and MR
in two Frames of Reference (MR-CT rigid, mutual information). Each engine runs in its own spawned
process and reports that process's own peak resident memory (VmHWM; loading the pair included).
Time includes the body masks (CT pairs); CPU time (all threads) is printed beside it because the
build machine is shared. TRE is the mean distance between where the result and the truth put the
fixed landmarks in the moving image (lung: the landmarks in the lung bases, where the breathing
moves most); jac min is the smallest Jacobian determinant of Hilum's deformable field (> 0: no
folding).

Targets (issue 18): rigid <= 10 s, deformable <= 60 s on 2 cores; Hilum's TRE <= elastix's + 0.2 mm
at <= 1.0x its time. Elastix parameter maps are its defaults for "rigid" and "bspline" with the
same metric per pair, three resolutions and a comparable number of samples.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _landmarks(path: Path):
    import numpy as np

    t = json.loads(path.read_text())
    return (np.array([p["fixed_mm"] for p in t["landmarks"]]), np.array([p["moving_mm"] for p in t["landmarks"]]),
            np.array([p.get("region", "") for p in t["landmarks"]]))


def _hilum(fixed_dir: str, moving_dir: str, method: str, metric: str, masks: bool):
    from node.phantom.study import PhantomStudy
    from node.registration import ct_mask, register, working_volume
    from node.volume import load_series

    fixed = load_series(PhantomStudy.open(fixed_dir).series_files())
    moving = load_series(PhantomStudy.open(moving_dir).series_files())
    t0, c0 = time.perf_counter(), time.process_time()
    # As the registration handler does: the ~2 mm working grids first, the masks made on them.
    fixed_w, moving_w = working_volume(fixed.volume), working_volume(moving.volume)
    kw = {}
    if masks:
        kw = dict(fixed_mask=ct_mask(fixed_w, "body"), moving_mask=ct_mask(moving_w, "body"))
    out = register(fixed_w, moving_w, method, metric=metric, **kw)
    jac = out.jacobian.minimum if out.jacobian is not None else None
    return time.perf_counter() - t0, time.process_time() - c0, out.fixed_to_moving, jac


def _elastix(fixed_dir: str, moving_dir: str, method: str, metric: str, masks: bool):
    import itk
    import numpy as np

    from node.phantom.study import PhantomStudy
    from node.registration import ct_mask
    from node.volume import load_series

    fixed = load_series(PhantomStudy.open(fixed_dir).series_files())
    moving = load_series(PhantomStudy.open(moving_dir).series_files())

    def image(vol, dtype=np.float32):
        img = itk.image_from_array(np.ascontiguousarray(vol.array, dtype=dtype))
        img.SetOrigin(vol.geometry.origin)
        img.SetSpacing(vol.geometry.spacing)
        img.SetDirection(itk.matrix_from_array(vol.geometry.matrix))
        return img

    t0, c0 = time.perf_counter(), time.process_time()
    params = itk.ParameterObject.New()
    names = ["rigid"] + (["bspline"] if method == "deformable" else [])
    for name in names:
        pm = params.GetDefaultParameterMap(name, 3)
        pm["Metric"] = ["AdvancedMeanSquares" if metric == "mean_squares" else "AdvancedMattesMutualInformation"]
        pm["NumberOfResolutions"] = ["3"]
        pm["NumberOfSpatialSamples"] = ["60000"]
        pm["MaximumNumberOfIterations"] = ["200" if name == "rigid" else "100"]
        if name == "bspline":
            pm["FinalGridSpacingInPhysicalUnits"] = ["30"]
        params.AddParameterMap(pm)
    kw = {}
    if masks:
        kw = dict(fixed_mask=image(type(fixed.volume)(ct_mask(fixed.volume, "body"), fixed.volume.geometry), np.uint8),
                  moving_mask=image(type(moving.volume)(ct_mask(moving.volume, "body"), moving.volume.geometry),
                                    np.uint8))
    _, result = itk.elastix_registration_method(image(fixed.volume), image(moving.volume), parameter_object=params,
                                                log_to_console=False, **kw)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    field = itk.transformix_deformation_field(image(moving.volume), result)
    field_arr = itk.array_from_image(field)  # displacement at each fixed voxel: fixed → moving
    geom = fixed.volume.geometry

    def mapping(points):
        from scipy import ndimage

        kji = geom.patient_to_index(points).T
        disp = np.stack([ndimage.map_coordinates(field_arr[..., c], kji, order=1) for c in range(3)], axis=1)
        return points + disp

    return elapsed, cpu, mapping, None  # its Jacobian is not computed: 9 gradients of a full-size field


def _peak_mb() -> float:
    """This process's own peak resident memory (VmHWM, MB). Not ru_maxrss: Linux carries a parent's
    maxrss across fork and exec, so a spawned child would report at least the parent's (here the
    bench's, with the full-size phantoms it generated) instead of its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


def _child(engine: str, args: tuple, truth: str, queue) -> None:
    import os

    os.chdir(Path(truth).parent)  # transformix writes deformationField.nii into the working directory
    elapsed, cpu, mapping, jac_min = (_hilum if engine == "hilum" else _elastix)(*args)
    import numpy as np

    f, m, region = _landmarks(Path(truth))
    tre = np.linalg.norm(mapping(f) - m, axis=1)
    lung = region == "lung_base"
    queue.put({"time_s": elapsed, "cpu_s": cpu, "peak_mb": _peak_mb(),
               "tre_mm": float(tre.mean()), "tre_max_mm": float(tre.max()),
               "tre_lung_mm": float(tre[lung].mean()) if lung.any() else None, "jac_min": jac_min})


def run(engine: str, args: tuple, truth: Path) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(engine, args, str(truth), q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"error": f"exit {p.exitcode}"}
    return q.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="128x128x60 chest, for a smoke run")
    ap.add_argument("--no-elastix", action="store_true")
    ap.add_argument("--cases", default="rigid,deformable,mr-ct")
    a = ap.parse_args()
    if a.quick:
        a.size, a.slices = 128, 60
    from node.phantom import generate_ct
    from node.phantom.pairs import REGISTRATION_TRUTH, generate_breathing_followup, generate_head_ct_mr

    work = Path(tempfile.mkdtemp(prefix="bench-registration-"))
    try:
        spacing, thickness = 0.7 * 512 / a.size, 300 / a.slices
        base = generate_ct(work / "base", seed=0, rows=a.size, cols=a.size, slices=a.slices, pixel_spacing=spacing,
                           slice_thickness=thickness, nodules=0)
        cases = []
        wanted = a.cases.split(",")
        if "rigid" in wanted:
            still = generate_breathing_followup(base, work / "still", breathing_mm=0.0)
            cases.append((f"CT-CT rigid {a.size}x{a.size}x{a.slices}", (str(still.root), str(base.root), "rigid",
                                                                        "mean_squares", True), still.root, "<= 10 s"))
        if "deformable" in wanted:
            breath = generate_breathing_followup(base, work / "breath", breathing_mm=15.0)
            cases.append((f"CT-CT deformable {a.size}x{a.size}x{a.slices}", (str(breath.root), str(base.root),
                                                                             "deformable", "mean_squares", True),
                          breath.root, "<= 60 s"))
        if "mr-ct" in wanted:
            ct, mr = generate_head_ct_mr(work / "head", ct_pixel_mm=1.0 if not a.quick else 2.0)
            cases.append(("MR-CT rigid (MI)", (str(ct.root), str(mr.root), "rigid", "mattes", False),
                          ct.root.parent, "<= 10 s"))
        engines = ["hilum"] + ([] if a.no_elastix else ["elastix"])
        print(f"{'case':36} {'engine':8} {'time s':>8} {'cpu s':>7} {'peak MB':>8} {'TRE mm':>7} {'max':>6} {'lung':>6} {'jac min':>7}  target")
        for name, args, truth_dir, target in cases:
            for engine in engines:
                r = run(engine, args, truth_dir / REGISTRATION_TRUTH)
                if "error" in r:
                    print(f"{name:36} {engine:8} {r['error']}")
                    continue
                lung = f"{r['tre_lung_mm']:6.2f}" if r["tre_lung_mm"] is not None else "     -"
                jac = f"{r['jac_min']:7.2f}" if r.get("jac_min") is not None else "      -"
                print(f"{name:36} {engine:8} {r['time_s']:8.1f} {r['cpu_s']:7.1f} {r['peak_mb']:8.0f} {r['tre_mm']:7.2f} "
                      f"{r['tre_max_mm']:6.2f} {lung} {jac}  {target if engine == 'hilum' else ''}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
