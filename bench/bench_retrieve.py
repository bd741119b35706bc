"""Retrieve benchmark: Hilum pulling a CT from a PACS (C-MOVE and C-GET, durable) vs DCMTK
movescu/getscu doing the same retrieve into a plain storescp / getscu's own files, same run, alternating.

The PACS is a second Orthanc (tests/pacs_peers.py) holding one phantom CT (300 slices of 512x512 by
default). Each Hilum run uses a fresh `hilum up` (empty spool and index, so every instance is
written, sealed and indexed, not deduplicated); the time is from queuing the retrieve through the
API (a connected HTTP client) to its record saying done (its finished_at). Also: the C-FIND round trip of a 1 000-study answer, Hilum's query
client vs DCMTK findscu.

CPU seconds per retrieve are reported beside the times (less noisy on a shared machine): Hilum's node
process (all its threads; its own Orthanc is a separate process and idle here) against DCMTK's
processes (movescu + storescp, or getscu), and the PACS Orthanc's own CPU in each case (its pace).

    .venv/bin/python bench/bench_retrieve.py [--runs 3] [--slices 300] [--size 512] [--studies 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from benchlib import files_of, phantom_ct
from tests.nodeproc import DCMTK_ENV, NodeProcess, free_port, storescp, wait_for
from tests.pacs_peers import PacsOrthanc, tiny_study


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) of a running process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _hilum(pacs: PacsOrthanc, study_uid: str, method: str, n: int, cpu: dict) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-retrieve-", ignore_cleanup_errors=True) as d:
        (Path(d) / "rules").mkdir()
        src = {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port, "retrieve": method}
        node = NodeProcess(Path(d) / "node", Path(d) / "rules", sources={"pacs": src},
                           store_originals_in_orthanc=False, stable_after=3600)
        pacs.set_node("HILUM", node.dicom_port)
        node.start()
        # One HTTP client, connected before the clock starts: httpx.request() builds a client (and
        # an SSL context, certifi's bundle loaded) per call, 0.1-0.2 s that the bench counted as
        # the retrieve's.
        api = httpx.Client(base_url=node.web, headers={"Authorization": f"Bearer {node.token}"}, timeout=60)
        try:
            api.get("/api/pacs/retrieves").raise_for_status()
            c0, p0 = _cpu(node.proc.pid), _cpu(pacs.proc.pid)
            t0 = time.time()
            rid = api.post("/api/pacs/retrieves", json={"source": "pacs", "study_uids": [study_uid]}).json()["ids"][0]
            # The end is the record's own finished_at (same host, same clock), so the API is polled
            # slowly: polling every 20 ms cost the node's process a good part of a core (and the GIL)
            # while it was receiving, which is the bench measuring itself.
            row = wait_for(lambda: next((r for r in api.get("/api/pacs/retrieves").json()["retrieves"]
                                         if r["id"] == rid and r["status"] in ("done", "failed", "partial")), None),
                           600, "the retrieve", interval=0.25)
            dt = row["finished_at"] - t0
            cpu[f"hilum C-{method.upper()}"].append(_cpu(node.proc.pid) - c0)
            cpu[f"PACS for hilum C-{method.upper()}"].append(_cpu(pacs.proc.pid) - p0)
            if row["status"] != "done" or row["received"] != n:
                raise RuntimeError(f"hilum {method}: {row}")
            return dt
        finally:
            api.close()
            node.stop()
            node._kill_orthanc()


def _dcmtk_move(pacs: PacsOrthanc, study_uid: str, n: int, cpu: dict) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-movescp-") as d:
        c0 = _children_cpu()
        with storescp(Path(d), "STORESCP", options=("+xa",)) as port:
            _register(pacs, "storescp", "STORESCP", port)
            p0 = _cpu(pacs.proc.pid)
            t0 = time.perf_counter()
            _run(["movescu", "-aet", "BENCH", "-aec", pacs.ae_title, "-aem", "STORESCP", "-S",
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1",
                  str(pacs.dicom_port)])
            dt = time.perf_counter() - t0
            cpu["PACS for movescu"].append(_cpu(pacs.proc.pid) - p0)
        cpu["movescu"].append(_children_cpu() - c0)  # movescu + storescp (waited for on leaving)
        if len(list(Path(d).iterdir())) != n:
            raise RuntimeError("movescu: not every instance arrived")
        return dt


def _dcmtk_get(pacs: PacsOrthanc, study_uid: str, n: int, cpu: dict) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-getscu-") as d:
        c0, p0 = _children_cpu(), _cpu(pacs.proc.pid)
        t0 = time.perf_counter()
        _run(["getscu", "-aet", "BENCH", "-aec", pacs.ae_title, "-S", "-od", d, "-k", "QueryRetrieveLevel=STUDY",
              "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(pacs.dicom_port)])
        dt = time.perf_counter() - t0
        cpu["getscu"].append(_children_cpu() - c0)
        cpu["PACS for getscu"].append(_cpu(pacs.proc.pid) - p0)
        if len(list(Path(d).iterdir())) != n:
            raise RuntimeError("getscu: not every instance arrived")
        return dt


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {out.stderr[-500:]}")


def _register(pacs: PacsOrthanc, name: str, ae: str, port: int) -> None:
    r = httpx.put(f"{pacs.url}/modalities/{name}", json={"AET": ae, "Host": "127.0.0.1", "Port": port}, timeout=30)
    r.raise_for_status()


def _find(pacs: PacsOrthanc, studies: int, runs: int, scratch: Path) -> dict:
    from node.config import load_settings
    from node.pacs.dimse import STUDY_RETURN_KEYS  # findscu asks for the same return keys
    from node.pacs.model import StudyQuery
    from node.pacs.sources import source_client

    files = []
    for i in range(studies):
        files += tiny_study(scratch / f"f{i}", patient_id="FINDBENCH", rows=8, series=(("AX", 1.0, 1),)).files
    pacs.upload(files)
    client = source_client(load_settings(sources={"pacs": {"ae_title": pacs.ae_title, "host": "127.0.0.1",
                                                          "port": pacs.dicom_port}}), "pacs")
    hilum, dcmtk = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        found, _bad = client.find_studies(StudyQuery(patient_id="FINDBENCH"))
        hilum.append(time.perf_counter() - t0)
        assert len(found) == studies, len(found)
        t0 = time.perf_counter()
        _run(["findscu", "-aet", "BENCH", "-aec", pacs.ae_title, "-S", "-k", "QueryRetrieveLevel=STUDY",
              "-k", "PatientID=FINDBENCH", *[a for k in STUDY_RETURN_KEYS if k != "PatientID" for a in ("-k", k)],
              "127.0.0.1", str(pacs.dicom_port)])
        dcmtk.append(time.perf_counter() - t0)
    return {"hilum": hilum, "findscu": dcmtk}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--studies", type=int, default=1000, help="studies in the C-FIND answer")
    ap.add_argument("--quick", action="store_true", help="20 slices of 128 px, 100 studies, one run")
    ap.add_argument("--find-only", action="store_true", help="only the C-FIND round trip")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.runs, args.slices, args.size, args.studies = 1, 20, 128, 100
    study_dir = phantom_ct(args.slices, size=args.size)
    files = files_of(study_dir)
    mb = sum(f.stat().st_size for f in files) / 1e6
    import pydicom

    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    results: dict = {"instances": len(files), "mb": mb}
    with tempfile.TemporaryDirectory(prefix="bench-pacs-", ignore_cleanup_errors=True) as d:
        pacs = PacsOrthanc(Path(d) / "pacs").start()
        try:
            pacs.upload(files)
            _register(pacs, "bench", "BENCH", free_port())
            names = ("hilum C-MOVE", "movescu", "hilum C-GET", "getscu")
            times: dict[str, list[float]] = {k: [] for k in names}
            cpu: dict[str, list[float]] = {k: [] for n in names for k in (n, f"PACS for {n}")}
            for _ in range(0 if args.find_only else args.runs):
                times["hilum C-MOVE"].append(_hilum(pacs, study_uid, "move", len(files), cpu))
                times["movescu"].append(_dcmtk_move(pacs, study_uid, len(files), cpu))
                times["hilum C-GET"].append(_hilum(pacs, study_uid, "get", len(files), cpu))
                times["getscu"].append(_dcmtk_get(pacs, study_uid, len(files), cpu))
            results["retrieve"], results["cpu"] = times, cpu
            results["find"] = _find(pacs, args.studies, max(args.runs, 3), Path(d) / "find")
        finally:
            pacs.stop()
    print(f"\nretrieve: {len(files)} instances, {mb:.0f} MB from a PACS Orthanc, median of {args.runs}")
    print(f"{'retriever':<14} {'s':>7} {'spread':>13} {'inst/s':>8} {'MB/s':>7} {'CPU s':>7} {'PACS CPU s':>10}")
    med, cpu_med = {}, {}
    for name, ts in results["retrieve"].items() if not args.find_only else ():
        med[name] = statistics.median(ts)
        cpu_med[name] = statistics.median(results["cpu"][name])
        print(f"{name:<14} {med[name]:7.2f} {min(ts):6.2f}-{max(ts):<6.2f} {len(files) / med[name]:8.0f} "
              f"{mb / med[name]:7.0f} {cpu_med[name]:7.2f} {statistics.median(results['cpu']['PACS for ' + name]):10.2f}")
    if not args.find_only:
        print(f"hilum C-MOVE/movescu {med['hilum C-MOVE'] / med['movescu']:.2f} (CPU "
              f"{cpu_med['hilum C-MOVE'] / cpu_med['movescu']:.2f})   hilum C-GET/getscu "
              f"{med['hilum C-GET'] / med['getscu']:.2f} (CPU {cpu_med['hilum C-GET'] / cpu_med['getscu']:.2f})")
    f = results["find"]
    print(f"\nC-FIND, {args.studies}-study answer, median of {len(f['hilum'])}: hilum {statistics.median(f['hilum']):.2f} s, "
          f"findscu {statistics.median(f['findscu']):.2f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
