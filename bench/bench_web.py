"""Web door benchmark: what the gateway costs a viewer, and what a sign-in costs.

One `hilum up` (managed Orthanc) holding a 512x512 phantom CT. For every run, the whole series is
read the way OHIF reads it, straight from Orthanc's DICOMweb plugin (node's credentials; asking
gzip as a browser does, and asking no compression) and through the node's gateway (a viewer's
session cookie, asking gzip as a browser does), alternating: series metadata, then
every frame (multipart, transfer-syntax=*), then every pixel-data bulk element as single-part
octets (the gateway's multipart-to-single-part path; Orthanc 1.10 itself refuses that request).
Also the time of one sign-in (argon2id verification). Medians of ``--runs`` runs.

    .venv/bin/python bench/bench_web.py [--runs 5] [--slices 100]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.phantom import generate_ct  # noqa: E402
from tests.nodeproc import NodeProcess, storescu, wait_for  # noqa: E402

PASSWORD = "bench password 1234"
FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def read_series(client: httpx.Client, base: str, study: str, series: str, bulk_accept: str) -> tuple[float, ...]:
    """(metadata s, all frames s, all bulk s) for one series."""
    t0 = time.perf_counter()
    meta = client.get(f"{base}/studies/{study}/series/{series}/metadata").json()
    t1 = time.perf_counter()
    for inst in meta:
        sop = inst["00080018"]["Value"][0]
        r = client.get(f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/1", headers={"Accept": FRAMES})
        assert r.status_code == 200, r.status_code
    t2 = time.perf_counter()
    for inst in meta:
        r = client.get(inst["7FE00010"]["BulkDataURI"], headers={"Accept": bulk_accept})
        assert r.status_code == 200, r.status_code
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--slices", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ct = generate_ct(tmp / "ct", seed=1, slices=args.slices, nodules=0)
        (tmp / "rules").mkdir()
        node = NodeProcess(tmp / "node", tmp / "rules").start()
        try:
            subprocess.run([sys.executable, "-m", "node.cli", "user", "add", "bench", "--role", "viewer", "--config",
                            str(node.config_path)], input=PASSWORD + "\n", text=True, check=True, cwd=REPO,
                           capture_output=True)
            assert storescu(node.dicom_port, ct.dicom_dir).returncode == 0
            orthanc = node.orthanc()
            wait_for(lambda: len(orthanc.get(f"/dicom-web/studies/{ct.study_uid}/series/{ct.series_uid}/instances"
                                              ).json() or []) == args.slices, 300, "the series in the archive")
            viewer = httpx.Client(timeout=120)
            logins = []
            for _ in range(args.runs):
                t = time.perf_counter()
                r = viewer.post(node.web + "/api/session", json={"username": "bench", "password": PASSWORD})
                logins.append(time.perf_counter() - t)
                assert r.status_code == 200
            direct = str(orthanc.base_url).rstrip("/") + "/dicom-web"
            rows = {"orthanc gzip": [], "orthanc plain": [], "gateway": []}
            for _ in range(args.runs):
                # A browser asks for gzip; Orthanc then compresses every frame it sends.
                orthanc.headers["Accept-Encoding"] = "gzip, deflate"
                rows["orthanc gzip"].append(read_series(orthanc, direct, ct.study_uid, ct.series_uid, FRAMES))
                orthanc.headers["Accept-Encoding"] = "identity"
                rows["orthanc plain"].append(read_series(orthanc, direct, ct.study_uid, ct.series_uid, FRAMES))
                viewer.headers["Accept-Encoding"] = "gzip, deflate"
                rows["gateway"].append(read_series(viewer, node.web + "/dicom-web", ct.study_uid, ct.series_uid,
                                                   "application/octet-stream"))
        finally:
            node.stop()
            node._kill_orthanc()
    print(f"{args.slices} x 512x512 CT, medians of {args.runs} runs (seconds)")
    print(f"{'path':<14} {'metadata':>9} {'frames':>8} {'bulk':>8} {'frames/s':>9}")
    for path, runs in rows.items():
        meta, frames, bulk = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{path:<14} {meta:>9.3f} {frames:>8.3f} {bulk:>8.3f} {args.slices / frames:>9.0f}")
    print("bulk: orthanc = multipart (it refuses single-part); gateway = single-part octets cut out of multipart")
    print(f"sign-in (argon2id verify + session): median {statistics.median(logins) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
