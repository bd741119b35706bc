"""What the node benchmarks share: cached phantom studies, timed DCMTK sends, the node's view of a
study (through its API, never its spool), and the memory of its processes.

Processes are started with tests/nodeproc.py (``running_node``, ``storescp``), the same code the
end-to-end tests use, so a benchmark measures the node the tests check.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.nodeproc import DCMTK_ENV, NodeProcess  # noqa: E402

CACHE = REPO / "bench" / "out"


def phantom_ct(slices: int, ts: str = "explicit", seed: int = 1, size: int = 512, cache: Path = CACHE) -> Path:
    """The DICOM folder of a phantom chest CT, generated once and kept under bench/out/.

    ``size`` keeps the 512-pixel field of view (coarser pixels); each seed is another patient and
    study (its own UIDs), so a node sees a new study, as it would in real use."""
    from node.phantom import PhantomStudy, generate_ct

    name = f"ct{slices}-{ts}" if (seed, size) == (1, 512) else f"ct{size}x{slices}-{ts}-seed{seed}"
    d = cache / name
    try:
        return PhantomStudy.open(d).dicom_dir
    except FileNotFoundError:
        shutil.rmtree(d, ignore_errors=True)
        d.parent.mkdir(parents=True, exist_ok=True)
        return generate_ct(d, seed=seed, rows=size, cols=size, pixel_spacing=0.7 * 512 / size, slices=slices,
                           transfer_syntax=ts, nodules=3 if slices >= 100 else 0).dicom_dir


def files_of(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


def send(port: int, files: list[Path], called: str, assocs: int = 1, propose: list[str] | None = None) -> float:
    """Send with DCMTK storescu (TCP_NODELAY=1) over ``assocs`` parallel associations; seconds taken."""
    chunks = [files[i::assocs] for i in range(assocs)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", called, "-nh", *(propose or []), "127.0.0.1",
                               str(port), *map(str, c)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
             for c in chunks]
    errs = [p.communicate()[1] for p in procs]
    dt = time.perf_counter() - t0
    for p, e in zip(procs, errs):
        # storescu exits 0 even when it could not send a file (no accepted context): check its messages too.
        if p.returncode != 0 or b"E: " in e:
            raise RuntimeError(f"storescu failed: {e.decode()[-500:]}")
    return dt


def series_rule(rules_dir: Path, handler: str | None) -> Path:
    """A rules folder routing every CT series to ``handler`` (None: no rule, nothing matches),
    results to the node's Orthanc. The node's own stable_after applies. Results that fail a quality
    check (e.g. a bench phantom outside a model's validated domain) are delivered with their warning:
    these benchmarks time the path, the accuracy benchmarks judge the results."""
    rules_dir.mkdir(parents=True, exist_ok=True)
    if handler:
        (rules_dir / "bench.yaml").write_text(textwrap.dedent(f"""\
            - name: bench-{handler.replace(':', '-')}
              level: series
              match: {{Modality: CT}}
              handler: "{handler}"
              destinations: [orthanc]
              on_quality_failure: deliver_with_warnings
            """))
    return rules_dir


class BenchError(RuntimeError):
    pass


def _deliveries(node: NodeProcess, status: str) -> list[dict]:
    r = node.api("GET", "/api/deliveries", params={"status": status, "limit": 1000})
    r.raise_for_status()
    return r.json()["deliveries"]


def finished_study(node: NodeProcess, study_uid: str, instances: int, jobs: int) -> dict | None:
    """The study (API JSON, with ``deliveries``: its delivered rows) once it is stable, its ``jobs``
    are done, and every copy is delivered: each result and each original to Orthanc. None while
    any of that is still under way; a failed job or delivery raises."""
    st = node.study(study_uid)
    if not st or not st["stable"] or st["instances_received"] < instances or len(st["jobs"]) < jobs:
        return None
    for j in st["jobs"]:
        if j["status"] == "failed":
            raise BenchError(f"job {j['id']} ({j['handler']}) failed: {j['error']}")
        if j["status"] != "done":
            return None
    if any(d["study_uid"] == study_uid for d in _deliveries(node, "failed")):
        raise BenchError(f"a delivery of study {study_uid} failed")
    if any(d["study_uid"] == study_uid for d in _deliveries(node, "pending")):
        return None
    # Newest first: this study's rows are the last ones the node added.
    done = [d for d in _deliveries(node, "delivered") if d["study_uid"] == study_uid]
    results = {r["sop_instance_uid"] for j in st["jobs"] for r in j["results"]}
    if sum(d["kind"] == "original" for d in done) < instances or \
            not results <= {d["sop_instance_uid"] for d in done if d["kind"] == "result"}:
        return None  # routing has not added the delivery rows yet
    return {**st, "deliveries": done}


def confirm_in_orthanc(node: NodeProcess, study_uid: str, results: list[dict]) -> int:
    """Check that Orthanc holds every result object in its series of the study; the study's
    instance count there."""
    query = {"Query": {"StudyInstanceUID": study_uid}, "Expand": True}
    with node.orthanc() as c:
        series = {s["ID"]: s["MainDicomTags"]["SeriesInstanceUID"]
                  for s in c.post("/tools/find", json={"Level": "Series", **query}).json()}
        found = c.post("/tools/find", json={"Level": "Instance", **query}).json()
    held = {(i["MainDicomTags"]["SOPInstanceUID"], series[i["ParentSeries"]]) for i in found}
    missing = [r for r in results if (r["sop_instance_uid"], r["series_instance_uid"]) not in held]
    if missing:
        raise BenchError(f"{len(missing)} result object(s) of study {study_uid} not in Orthanc")
    return len(found)


def rss_mb(pid: int) -> float:
    """Resident set size of one process, MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[tuple[int, str]]:
    """Direct children of ``pid``: (pid, command line)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except FileNotFoundError:
            continue  # the thread ended meanwhile (a node's delivery lane, a worker's thread)
        for child in kids:
            try:
                cmd = (Path("/proc") / child / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except FileNotFoundError:
                continue  # exited meanwhile
            out.append((int(child), cmd))
    return out


def node_memory(node: NodeProcess) -> dict[str, float]:
    """RSS (MB) of the node's receiving process (the `hilum up` parent: SCP, index, router,
    delivery), of its job workers together, and of the managed Orthanc."""
    pid = node.proc.pid
    mem = {"receiver": rss_mb(pid), "workers": 0.0, "orthanc": 0.0}
    for child, cmd in children(pid):
        kind = "orthanc" if "Orthanc" in cmd else "workers" if "spawn_main" in cmd else None
        if kind:
            try:
                mem[kind] += rss_mb(child)
            except FileNotFoundError:
                pass
    return mem
