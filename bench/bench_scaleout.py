"""Scale-out: the Celery executor against the local one, input transfer to a worker, throughput with
1, 2 and 4 workers, and the archive's ingest on SQLite against PostgreSQL.

- scheduling overhead: job latency (created → finished, stability window apart) of a near no-op
  handler (`overview` of one 64-pixel tile), Celery minus local;
- input transfer: a worker's claim + streamed inputs of one CT (the worker API, decrypted from the
  vault), MB/s on loopback;
- throughput: 8 studies, a handler bound by a fixed sleep, 1/2/4 workers: makespan (first claim → last
  finish) and efficiency against linear;
- archive ingest: N studies × M instances POSTed into a managed Orthanc on SQLite and on PostgreSQL.
  The 50 000-instance pre-fill of the issue is not done here (hours on a shared 2-core machine).

    .venv/bin/python bench/bench_scaleout.py [--quick]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.nodeproc import free_port, storescu, wait_for  # noqa: E402
from tests.redisproc import redis_server  # noqa: E402
from tests.test_scaleout import ClusterNode, Worker, _queued_tickets  # noqa: E402

from node.phantom import generate_ct  # noqa: E402


def studies(root: Path, n: int, seed0: int, size: int = 64, slices: int = 12) -> list:
    return [generate_ct(root / f"s{seed0 + i}", seed=seed0 + i, rows=size, cols=size, slices=slices,
                        pixel_spacing=0.7 * 512 / size, slice_thickness=5.0, nodules=0) for i in range(n)]


def latencies(node, sts) -> list[float]:
    """Send each study alone and wait for its job: created → finished per job."""
    out = []
    for s in sts:
        assert storescu(node.dicom_port, s.dicom_dir).returncode == 0
        job = wait_for(lambda: next((j for j in node.index().jobs(study_uid=s.study_uid) if j["status"] in
                                     ("done", "failed")), None), 120, "job", interval=0.05)
        assert job["status"] == "done", job["error"]
        out.append(job["finished_at"] - job["created_at"])
    return out


NOOP_RULE = """\
- name: ct-overview
  level: series
  match: {Modality: CT}
  handler: {name: overview, params: {tiles: 1, tile_size: 64}}
  destinations: [orthanc]
"""


def noop_node(tmp: Path, broker: str | None) -> ClusterNode:
    """A node whose one rule runs a near no-op handler (the local executor's spawned workers know only
    the shipped handlers); ``broker`` None: the local executor."""
    node = ClusterNode(tmp, broker or "redis://unused", 0.0)
    (tmp / "rules" / "ct.yaml").write_text(NOOP_RULE)
    if broker is None:
        node.config.pop("executor")
        node.config_path.write_text(__import__("yaml").safe_dump(node.config))
    return node


def overhead(tmp: Path, n: int) -> str:
    lat = {}
    sts = studies(tmp / "studies", 2 * n, 100)
    node = noop_node(tmp / "local", None).start()
    try:
        latencies(node, sts[:1])  # warm the worker process (imports) before measuring
        lat["local"] = latencies(node, sts[1:n])
    finally:
        node.stop()
        node._kill_orthanc()
    with redis_server(tmp / "redis-o") as redis:
        node = noop_node(tmp / "celery", redis.url).start()
        w = Worker(node, "w1", node.worker_token())
        try:
            latencies(node, sts[n:n + 1])
            lat["celery"] = latencies(node, sts[n + 1:])
        finally:
            w.stop()
            node.stop()
            node._kill_orthanc()
    med = {k: statistics.median(v) for k, v in lat.items()}
    return (f"scheduling overhead (near no-op handler, {n - 1} jobs each, median created→finished):\n"
            f"  local  {med['local'] * 1000:7.0f} ms\n  celery {med['celery'] * 1000:7.0f} ms\n"
            f"  overhead per job: {(med['celery'] - med['local']) * 1000:.0f} ms (target ≤ 500 ms)")


def transfer(tmp: Path, size: int, slices: int) -> str:
    from node.jobs.remote import NodeClient

    (st,) = studies(tmp / "big", 1, 300, size=size, slices=slices)
    with redis_server(tmp / "redis-t") as redis:
        node = ClusterNode(tmp / "transfer", redis.url, 0.0, worker_lost_s=600.0).start()
        try:
            token = node.worker_token().read_text()
            assert storescu(node.dicom_port, st.dicom_dir).returncode == 0
            (job_id, ticket), = wait_for(lambda: _queued_tickets(redis), 120, "the task").items()
            client = NodeClient(node.web, token, "bench")
            t0 = time.perf_counter()
            job = client.claim(job_id, ticket)
            claim_s = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                paths = client.fetch_inputs(job, ticket, Path(d))
                dt = time.perf_counter() - t0
                mb = sum(Path(p).stat().st_size for ps in paths.values() for p in ps) / 1e6
        finally:
            node.stop()
            node._kill_orthanc()
    return (f"input transfer to a worker ({slices} instances of {size}x{size}, {mb:.1f} MB, spool CRC-sealed, "
            f"not encrypted): claim {claim_s * 1000:.0f} ms, stream {dt:.2f} s = {mb / dt:.0f} MB/s "
            "(target ≥ 100 MB/s)")


def throughput(tmp: Path, sleep_s: float, counts: list[int]) -> str:
    rows = []
    with redis_server(tmp / "redis-p") as redis:
        node = ClusterNode(tmp / "tp", redis.url, sleep_s).start()
        token = node.worker_token()
        try:
            index = node.index()
            for round_, k in enumerate(counts):
                # All 8 jobs queued first, then the workers: the makespan measures the workers, not the
                # arrival of the studies.
                sts = studies(tmp / f"tp-studies-{k}", 8, 1000 + 10 * round_)
                for s in sts:
                    assert storescu(node.dicom_port, s.dicom_dir).returncode == 0
                uids = {s.study_uid for s in sts}
                wait_for(lambda: sum(1 for j in index.jobs() if j["study_uid"] in uids and j["status"] == "running")
                         == 8, 120, "8 jobs queued")
                workers = [Worker(node, f"r{round_}w{i}", token) for i in range(k)]

                def done():
                    jobs = [j for j in index.jobs() if j["study_uid"] in uids]
                    return len(jobs) == 8 and all(j["status"] == "done" for j in jobs) and jobs
                jobs = wait_for(done, 600, "8 jobs done", interval=0.2)
                claims = [a["claimed_at"] for j in jobs for a in index.attempts_of_job(j["id"])]
                span = max(j["finished_at"] for j in jobs) - min(claims)
                ideal = 8 * sleep_s / k
                rows.append((k, span, ideal))
                for w in workers:
                    w.stop()
        finally:
            node.stop()
            node._kill_orthanc()
    base = rows[0][1]
    lines = [f"throughput, 8 studies, handler sleeping {sleep_s:g} s each:",
             "  workers  makespan  speed-up  efficiency vs linear"]
    lines += [f"  {k:7d}  {span:7.1f}s  {base / span:7.2f}x  {base / span / k:6.2f}" for k, span, _ in rows]
    return "\n".join(lines)


def _prefill(c, n: int, template: bytes, per_series: int = 100) -> float:
    """POST ``n`` distinct small instances (``per_series`` a series, one series a study), 4 clients at once:
    the archive already holding many instances is what slows an SQLite index down. Returns seconds."""
    from concurrent.futures import ThreadPoolExecutor
    from io import BytesIO

    import pydicom

    base = pydicom.dcmread(BytesIO(template))

    def one(i: int) -> None:
        ds = copy.deepcopy(base)  # a shallow copy shares its elements: threads would overwrite each other's UIDs
        study, k = divmod(i, per_series)
        ds.StudyInstanceUID = f"2.25.9{study:012d}"
        ds.SeriesInstanceUID = f"2.25.8{study:012d}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.7{i:012d}"
        ds.InstanceNumber = k + 1
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        c.post("/instances", content=buf.getvalue()).raise_for_status()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(n)))
    return time.perf_counter() - t0


def ingest(tmp: Path, n_studies: int, per_study: int, size: int, prefill: int) -> str:
    import httpx

    from node.archive.orthanc import ManagedOrthanc
    from node.config import load_settings

    sts = studies(tmp / "ingest-studies", n_studies, 5000, size=size, slices=per_study)
    files = [p.read_bytes() for s in sts for p in s.series_files()]
    small = studies(tmp / "prefill-template", 1, 6000, size=64, slices=1)[0].series_files()[0].read_bytes()
    out = [f"archive ingest: {n_studies} × {per_study} instances ({size}x{size}) POSTed to a managed Orthanc, "
           "one client" + (f"; again (fresh UIDs) after a pre-fill of the archive with {prefill} other instances "
                           "(64x64, 100 a study, 4 clients)" if prefill else "")]
    for index in ("sqlite", "postgresql"):
        settings = load_settings(data_dir=tmp / f"orthanc-{index}", orthanc_http_port=free_port(),
                                 archive={"index": index})
        settings.data_dir.mkdir(parents=True)
        m = ManagedOrthanc(settings)
        m.start()
        try:
            with httpx.Client(base_url=m.endpoint.url, auth=m.endpoint.auth, timeout=60) as c:
                rounds = [("empty", files)]
                for label, batch in rounds:
                    t0 = time.perf_counter()
                    for b in batch:
                        c.post("/instances", content=b).raise_for_status()
                    dt = time.perf_counter() - t0
                    out.append(f"  {index:10s} {label:>18s} {dt:6.1f} s  {len(batch) / dt:6.0f} instances/s")
                    if prefill and label == "empty":
                        fill_s = _prefill(c, prefill, small)
                        out.append(f"  {index:10s} {'pre-fill':>18s} {fill_s:6.1f} s  {prefill / fill_s:6.0f} "
                                   "instances/s (4 clients)")
                        # the same instances again would be duplicates: the second round sends fresh copies
                        rounds.append((f"after {prefill // 1000}k", _fresh(files)))
                held = int(c.get("/statistics").json()["CountInstances"])
                out.append(f"  {index:10s} {'archive holds':>18s} {held} instances (sent {len(files) * len(rounds) + prefill})")
        finally:
            m.stop()
    if not prefill:
        out.append("  (after a 50 000-instance pre-fill: not measured in this run; --prefill 50000)")
    return "\n".join(out)


def _fresh(files: list[bytes]) -> list[bytes]:
    """The same instances under new UIDs (a second study of the same size)."""
    from io import BytesIO

    import pydicom
    from pydicom.uid import generate_uid

    out = []
    for b in files:
        ds = pydicom.dcmread(BytesIO(b))
        for tag in ("StudyInstanceUID", "SeriesInstanceUID"):  # the same new UID for the same old one
            setattr(ds, tag, generate_uid(entropy_srcs=[str(ds[tag].value), "fresh"]))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[str(ds.SOPInstanceUID), "fresh"])
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="overhead,transfer,throughput,ingest")
    ap.add_argument("--prefill", type=int, default=None,
                    help="instances already in the archive before the second ingest round (default: 50000, "
                         "0 with --quick)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as d:
        tmp = Path(d)
        print("machine shared with other jobs: figures are indicative")
        if "overhead" in parts:
            print(overhead(tmp, 3 if args.quick else 6), flush=True)
        if "transfer" in parts:
            print(transfer(tmp, 128 if args.quick else 512, 40 if args.quick else 300), flush=True)
        if "throughput" in parts:
            print(throughput(tmp, 1.0 if args.quick else 3.0, [1, 2] if args.quick else [1, 2, 4]), flush=True)
        if "ingest" in parts:
            prefill = args.prefill if args.prefill is not None else (0 if args.quick else 50000)
            print(ingest(tmp, 2 if args.quick else 5, 40 if args.quick else 300, 64 if args.quick else 128,
                         prefill), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
