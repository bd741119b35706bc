"""Ingest benchmark: Hilum vs DCMTK storescp vs Orthanc, in the same run, alternating.

One 300-slice 512x512 phantom CT sent by DCMTK storescu (TCP_NODELAY=1) over one association,
over 4 parallel associations, and as an RLE-lossless copy. Every receiver starts fresh for each
run (empty storage), so nothing is cached between runs that real use would not have cached.
Hilum runs as `hilum up` with its durable path (fsync + committed index row before Success).

    .venv/bin/python bench/bench_ingest.py [--runs 5] [--slices 300]
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.phantom import generate_ct  # noqa: E402
from tests.nodeproc import DCMTK_ENV, NodeProcess, free_port, wait_for, _port_open  # noqa: E402


def study(out: Path, slices: int, ts: str) -> Path:
    """The phantom CT's DICOM folder, generated once and kept under bench/out/."""
    from node.phantom.study import PhantomStudy

    d = out / f"ct{slices}-{ts}"
    try:
        return PhantomStudy.open(d).dicom_dir
    except FileNotFoundError:
        shutil.rmtree(d, ignore_errors=True)
        return generate_ct(d, seed=1, slices=slices, transfer_syntax=ts, nodules=3 if slices >= 100 else 0).dicom_dir


def files_of(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


def send(port: int, files: list[Path], called: str, assocs: int, propose: list[str]) -> float:
    chunks = [files[i::assocs] for i in range(assocs)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", called, "-nh", *propose, "127.0.0.1", str(port),
                               *map(str, c)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for c in chunks]
    errs = [p.communicate()[1] for p in procs]
    dt = time.perf_counter() - t0
    for p, e in zip(procs, errs):
        # storescu exits 0 even when it could not send a file (no accepted context): check its messages too.
        if p.returncode != 0 or b"E: " in e:
            raise RuntimeError(f"storescu failed: {e.decode()[-500:]}")
    return dt


class StoreSCP:
    name = "storescp"

    def __enter__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="bench-scp-"))
        self.port = free_port()
        self.proc = subprocess.Popen(["storescp", "+xa", "-aet", "STORESCP", "-od", str(self.dir), str(self.port)],
                                     env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _port_open(self.port), 10, "storescp")
        self.called = "STORESCP"
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Orthanc:
    name = "orthanc"

    def __enter__(self):
        from node.archive.orthanc import ManagedOrthanc
        from node.config import load_settings

        self.dir = Path(tempfile.mkdtemp(prefix="bench-orthanc-"))
        self.port = free_port()
        settings = load_settings(data_dir=self.dir, orthanc_http_port=free_port(), orthanc_dicom_port=self.port,
                                 orthanc_dicom_enabled=True)
        self.m = ManagedOrthanc(settings)
        self.m.start()
        wait_for(lambda: _port_open(self.port), 20, "Orthanc DICOM port")
        self.called = "HILUMARCHIVE"
        return self

    def __exit__(self, *exc):
        self.m.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Hilum:
    name = "hilum"

    def __enter__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="bench-hilum-"))
        rules = self.dir / "rules"
        rules.mkdir()
        self.node = NodeProcess(self.dir / "data", rules, stable_after=3600, log_level="WARNING")
        self.node.start()
        self.port = self.node.dicom_port
        self.called = "HILUM"
        return self

    def __exit__(self, *exc):
        self.node.stop(signal.SIGTERM)
        self.node._kill_orthanc()
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--cases", default="single,parallel,rle", help="comma list of: single, parallel, rle")
    ap.add_argument("--no-warmup", action="store_true")
    args = ap.parse_args()
    cache = REPO / "bench" / "out"
    cache.mkdir(parents=True, exist_ok=True)
    wanted = set(args.cases.split(","))
    cases = {}
    if "single" in wanted:
        cases["1 assoc"] = (files_of(study(cache, args.slices, "explicit")), 1, [])
    if "parallel" in wanted:
        cases["4 assocs"] = (files_of(study(cache, args.slices, "explicit")), 4, [])
    if "rle" in wanted:
        cases["1 assoc RLE"] = (files_of(study(cache, args.slices, "rle")), 1, ["-xr"])
    receivers = [StoreSCP, Orthanc, Hilum]
    results: dict[str, dict[str, list[float]]] = {c: {r.name: [] for r in receivers} for c in cases}
    for case, (files, assocs, propose) in cases.items():
        mb = sum(f.stat().st_size for f in files) / 1e6
        first = 1 if args.no_warmup else 0
        for run in range(first, args.runs + 1):  # run 0 is the warm-up
            for R in receivers:
                with R() as rx:
                    dt = send(rx.port, files, rx.called, assocs, propose)
                if run:
                    results[case][R.name].append(dt)
        print(f"\n{case}: {len(files)} instances, {mb:.0f} MB, median of {args.runs}")
        print(f"{'receiver':<10} {'s':>7} {'spread':>13} {'inst/s':>8} {'MB/s':>7}")
        for name, times in results[case].items():
            med = statistics.median(times)
            print(f"{name:<10} {med:7.2f} {min(times):6.2f}-{max(times):<6.2f} {len(files) / med:8.0f} {mb / med:7.0f}")
        h, o, s = (statistics.median(results[case][n]) for n in ("hilum", "orthanc", "storescp"))
        print(f"hilum/orthanc {h / o:.2f}   hilum/storescp {h / s:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
