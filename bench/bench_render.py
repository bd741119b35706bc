"""Rendering benchmark: interactive and full-quality VR frames, cold start, the renders default set.

Run: .venv/bin/python bench/bench_render.py [--shape 300 512 512] [--size 512] [--repeat 3]

Targets (issue 8), 512x512x300 CT, 512x512 viewport: interactive frame <= 150 ms, full-quality
frame <= 1 s, cold start (volume to first frame) <= 5 s, renders default set <= 30 s. Prints a
table of medians and the OpenGL backend that produced them (EGL llvmpipe on CPU hosts, the GPU
elsewhere: the same script gives both figures).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handlers.renders import Renders  # noqa: E402
from node.handler_api import HandlerInput  # noqa: E402
from node.render.phantom import centred_geometry, chest_phantom, sample_phantom  # noqa: E402
from node.render.vr import Camera, VolumeScene  # noqa: E402
from node.volume import SeriesData, Volume  # noqa: E402


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("SLICES", "ROWS", "COLS"))
    ap.add_argument("--size", type=int, default=512, help="viewport side in pixels")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the slow items (cold start, default set)")
    ap.add_argument("--frames", type=int, default=20, help="frames per interactive/full measurement")
    args = ap.parse_args()

    shape = tuple(args.shape)
    spacing = (350.0 / shape[2], 350.0 / shape[1], 300.0 / shape[0])  # a 35 cm x 30 cm chest CT
    geometry = centred_geometry(shape, spacing, (1, 0, 0), (0, 1, 0))
    cache = Path(__file__).resolve().parent / "out" / f"render_phantom_{'x'.join(map(str, shape))}.npy"
    t = time.perf_counter()
    if cache.exists():  # sampling the phantom takes a minute or two; its voxels never change
        vol = Volume(np.load(cache), geometry)
    else:
        vol = sample_phantom(geometry, chest_phantom)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, vol.array)
    print(f"phantom {shape} int16, spacing {tuple(round(s, 3) for s in spacing)} mm: ready in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    size = (args.size, args.size)
    rows = []
    load_before = os.getloadavg()[0]

    scenes: list[VolumeScene] = []

    def cold_start():
        scenes.append(VolumeScene(vol, "CT", size))
        scenes[-1].render(Camera(), preset="bone", quality="full", size=size)

    cold = []
    for _ in range(args.repeat):
        if scenes:
            scenes[-1].close()  # one scene (and its copy of the volume) at a time
        cold.append(timed(cold_start))
    scene = scenes[-1]
    rows.append(("cold start: volume -> first full frame", cold, 5.0))
    backend = scene.backend

    for preset, mode in (("bone", "vr"), ("vascular", "vr"), ("bone", "mip")):
        for quality, target in (("interactive", 0.15), ("full", 1.0)):
            scene.render(Camera(azimuth_deg=1), preset=preset, mode=mode, quality=quality, size=size)  # settle
            times = [timed(lambda a=a: scene.render(Camera(azimuth_deg=a, elevation_deg=10), preset=preset, mode=mode,
                                                     quality=quality, size=size))
                     for a in range(0, 5 * args.frames, 5)]
            label = f"{quality} frame, {mode}" + (f" {preset}" if mode == "vr" else "")
            rows.append((label, times, target))
    scene.close()

    series = SeriesData("1.2.826.0.1.3680043.8.498.1", "CT", [], vol)
    default = [timed(lambda: Renders().run(HandlerInput("1.2.3", [series]), lambda f, m: None))
               for _ in range(args.repeat)]
    rows.append(("renders default set (7 series)", default, 30.0))

    print(f"\nbackend: {backend}; viewport {size[0]}x{size[1]}; {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("(wall: elapsed; cpu: this process's CPU time, all threads: on a shared host it shows the work"
          " without the waiting)")
    print(f"{'measurement':40s} {'wall med':>9s} {'wall min':>9s} {'cpu med':>9s} {'n':>3s} {'target':>8s}  ok")
    for label, samples, target in rows:
        wall = statistics.median(w for w, _ in samples)
        cpu = statistics.median(c for _, c in samples)
        print(f"{label:40s} {wall * 1000:7.0f}ms {min(w for w, _ in samples) * 1000:7.0f}ms {cpu * 1000:7.0f}ms "
              f"{len(samples):3d} {target * 1000:6.0f}ms  {'yes' if wall <= target else 'NO'}")


if __name__ == "__main__":
    main()
