"""Inside a worker process: load → handler → validate → encode → durable, sealed result files.

The handler computes, the encoders turn its typed results into DICOM, and the files land in
``results/<job id>/`` before the parent records them. Nothing here touches the index or the
network: the parent process owns both.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import logging
import os
import resource
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from node.encoders.context import EncodeContext
from node.encoders.fastwrite import presize_sequences
from node.encoders.warnings import mark_warnings
from node.handler_api import HandlerInput, HandlerRefusal, ModelRef, discover, get_handler
from node.jobs.artefacts import ArtefactCache, instance_set_key
from node.jobs.quality import QualityPolicy, warning_findings
from node.jobs.priors_input import load_priors
from node.receive.spool import fsync_dirs
from node.results import ResultSet
from node.store.vault import IntegrityError, Vault, VaultSpec
from node.volume import ReleasedPixels, Volume, load_series


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    job_key: str
    study_uid: str
    rule: str
    handler: str
    params: dict
    series: dict[str, list[str]]  # series UID → instance locators; the first series is the primary one
    results_dir: str
    vault: VaultSpec
    series_number: int = 9000
    extra: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # from the rule: on_quality_failure
    # When the node created the job (its local time, ISO): the time every result object carries, so
    # the job gives the same bytes wherever and however often it runs. Empty: now (a one-off run).
    created: str = ""
    # The node's device serial (EncodeContext.device_serial) when a remote worker runs it; empty: this host's.
    device_serial: str = ""


def job_created(created_at: float) -> str:
    """The ``JobSpec.created`` of a job row's ``created_at`` (epoch seconds), in the node's local time."""
    return _dt.datetime.fromtimestamp(created_at).isoformat()


log = logging.getLogger(__name__)


class SpoolIntegrityError(Exception):
    pass


_vaults: dict[VaultSpec, Vault] = {}


def _vault(spec: VaultSpec) -> Vault:
    # One per keyring the worker has seen: a rotation hands later jobs a new spec.
    if spec not in _vaults:
        for old in _vaults.values():
            old.close()
        _vaults.clear()
        _vaults[spec] = spec.open()
    return _vaults[spec]


class PhaseClock:
    """Seconds per phase of one job (load, handler, each encoder, each write), for the job history:
    the latency benchmark reads them back from there, so a slow phase is named, not guessed.
    Wall seconds, and CPU seconds: steadier on a shared machine, and the encoders overlap in wall
    time (a phase run beside others counts its own thread's CPU only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str, cpu_clock=time.process_time):
        t0, c0 = time.perf_counter(), cpu_clock()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0, cpu_clock() - c0)

    def add(self, phase: str, seconds: float, cpu_seconds: float) -> None:
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + seconds, 4)
        self.cpu_seconds[phase] = round(self.cpu_seconds.get(phase, 0.0) + cpu_seconds, 4)


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> float:
    """Make the peak RSS (VmHWM) the current RSS (Linux), so a reused worker reports this job's peak,
    not its lifetime's; returns the RSS the job starts from (libraries, a loaded model), MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mb("VmRSS") or 0.0


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # else: lifetime peak


def _return_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc). Reading a series frees hundreds of
    half-megabyte Pixel Data buffers (and a handler its temporaries) that glibc would otherwise
    keep, counted in the worker's memory and peak for the rest of the job: the big arrays
    allocated later are mapped afresh and do not reuse them."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def _map_big_allocations() -> None:
    """Give every allocation of 1 MB or more its own mapping (glibc), returned to the system the
    moment it is freed. glibc's default threshold rises (up to 32 MB) each time such a block is
    freed, after which the segmentation's many few-megabyte temporaries stay on the heap as free
    memory the next, larger array cannot use: the job's peak grew by a third of the volume."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; a fixed value stops the rise
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def _one_heap_for_all_threads() -> None:
    """Let every thread allocate from the main heap (glibc's M_ARENA_MAX 1). A job's encoders run on
    a thread of their own (node/jobs/lanes.py), and a thread's own heap is a set of mappings that
    glibc hands back to the system page by page as blocks are freed there and maps afresh when
    they are taken again: the RTSTRUCT's contour tracing, chunk after chunk of few-hundred-KB
    arrays, took 100 000 page faults and 0.25 CPU s of system time on its thread, 7 000 and
    0.05 s on the main heap (512x512x300 CT, measured in the worker's path). Effective for the
    threads that first allocate after it, so it is set before a job starts any; Python's GIL
    serialises the threads' allocations anyway, and ONNX Runtime's threads (the model handler)
    took as long with it."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def _small_pages_for_arrays() -> None:
    """Keep NumPy from asking for transparent huge pages (its madvise on every array of 4 MB or
    more), unless NumPy's own switch, NUMPY_MADVISE_HUGEPAGE, says otherwise. A worker hands its
    memory back between jobs, so every job fills fresh pages: on the virtual machines the 2-core
    figures come from (Firecracker, freed memory reported back to the host), a fresh huge page
    costs about five times the system time of the same memory in 4 KB pages (0.4-0.6 s against
    0.09 s for a CT volume's 158 MB), and over whole ct-anatomy jobs the load and the handler each
    took about a sixth less CPU without them (docs/benchmarks.md, latency)."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    from numpy._core import multiarray  # where NumPy's switch sets the same flag at import

    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


def _collect_less_often() -> None:
    """Run Python's cycle collector every 20 000 net allocations instead of every 700. A job makes
    millions of short-lived objects (the series' headers, highdicom's and pydicom's items) and
    almost no cycles: at the default, 200 collections of the young objects and a full one took
    0.16 CPU s of a CT's ct-anatomy job, at this threshold 0.03 s, for the same peak memory."""
    gc.set_threshold(20_000, 20, 20)


@contextmanager
def _verified_reads(vault: Vault):
    """Never hand a tampered or truncated instance to a handler: quarantine it and fail the job."""
    try:
        yield
    except IntegrityError as exc:
        where = vault.quarantine_damaged(exc.locator, str(exc))
        raise SpoolIntegrityError(f"spool integrity check failed for {exc.locator}: {exc} "
                                  f"(copy kept in {where or 'nowhere: quarantine not writable'})") from None


def _load_sources(spec: JobSpec, needs_pixels: bool, vault: Vault) -> dict:
    """Every series of the job, read and decoded once; encoders reuse the handler's headers."""
    with _verified_reads(vault):
        return {uid: load_series(paths, with_pixels=needs_pixels, read=vault.read)
                for uid, paths in spec.series.items()}


def _load_priors(spec: JobSpec, needs_pixels: bool, vault: Vault) -> list:
    """The earlier studies the rule asked for (node/pacs/priors.py), read like the job's own series."""
    with _verified_reads(vault):
        return load_priors(spec.extra, lambda paths: load_series(paths, with_pixels=needs_pixels, read=vault.read))


def _write_result(ds, out_dir: Path, vault: Vault) -> dict:
    """One result object sealed (file fsync'ed; the caller fsyncs the directory); its metadata."""
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    presize_sequences(ds)  # the same bytes, a SEG's thousands of per-frame items written in one pass
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with buf.getbuffer() as view:  # not getvalue(): a large SEG is not copied once more to be sealed
        vault.write_file(path, view)
    return {
        "sop_instance_uid": str(ds.SOPInstanceUID), "sop_class_uid": str(ds.SOPClassUID),
        "series_instance_uid": str(ds.SeriesInstanceUID), "modality": str(ds.Modality), "path": str(path),
    }


def _release_pixels(sources: dict) -> None:
    """Let the source volumes' pixels go once the handler and the reports (whose key-slice HU
    statistics read them) are done: the SEG and RTSTRUCT still encoding need only the label map
    and the grid, and a CT volume is the largest thing the job holds while they do."""
    for series in sources.values():
        if series.volume is not None and not isinstance(series.volume.array, ReleasedPixels):
            series.volume = Volume(ReleasedPixels(series.volume.array), series.volume.geometry)
    _return_freed_memory()


def _keep_artefacts(handler, inp: HandlerInput, outputs: list, kept, series_key: str | None,
                    clock: PhaseClock) -> None:
    """What the handler offers later jobs on this series, once its results are accepted. A cache
    that cannot be written costs those jobs time, not this job its results."""
    offered = handler.artefacts(inp, outputs) if series_key else {}
    if not offered:
        return
    with clock("store artefacts"):
        _return_freed_memory()  # the encoders' buffers, before a volume-sized array is made
        for key, array in offered.items():
            try:
                kept.save(series_key, key, array)
            except OSError as exc:
                log.warning("artefact %s of %s not kept: %s", key.name, key.producer, exc)


def _handler_class(spec: JobSpec):
    """The handler, or for a model job the exact version folder the executor resolved for it."""
    if spec.extra.get("model_dir"):
        from node.models.registry import handler_at
        from node.models.versions import BUILT_IN

        version = spec.extra.get("model_version")
        return handler_at(spec.extra["model_dir"], None if version == BUILT_IN else version)
    return get_handler(spec.handler)


def run_job(spec: JobSpec, progress, on_result=lambda meta: None, artefacts=None) -> tuple[list[dict], dict, dict]:
    """Returns (result objects' metadata, the handler's provenance: model hash, execution providers…,
    the job's figures: seconds per phase, peak memory). ``on_result`` gets the metadata of each
    encoder's objects (one SEG, a series of SC images) as soon as they are durable, so the parent
    can deliver them while the next are encoded. ``artefacts``: where arrays kept for later jobs
    are found and left (``load``/``save`` as ``ArtefactCache``); by default the node's cache under
    its data directory, for a remote worker the node over its API."""
    from node.encoders import REPORT_LANE, encode_plan  # imported here: heavy, and only workers need it
    from node.jobs.lanes import run_lanes

    _map_big_allocations()
    _one_heap_for_all_threads()
    _small_pages_for_arrays()
    _collect_less_often()
    start_rss = _reset_peak_rss()
    clock = PhaseClock()
    cls = _handler_class(spec)
    handler = cls(spec.params)
    policy = QualityPolicy(spec.options)
    vault = _vault(spec.vault)
    progress(0.0, "loading series")
    with clock("load"):
        sources = _load_sources(spec, cls.needs_pixels, vault)
        priors = _load_priors(spec, cls.needs_pixels, vault)
        _return_freed_memory()
    inp = HandlerInput(study_uid=spec.study_uid, series=list(sources.values()), priors=priors,
                       priors_note=spec.extra.get("priors_note"),
                       models={p: ModelRef(**m) for p, m in spec.extra.get("param_models", {}).items()})
    kept = artefacts or ArtefactCache(Path(spec.vault.data_dir) / "artefacts", vault)
    series_key = instance_set_key(inp.primary) if inp.series and inp.primary.datasets else None
    if cls.wants_artefacts and series_key:
        with clock("artefacts"):
            found = {key: kept.load(series_key, key) for key in cls.wants_artefacts}
            inp.artefacts = {key: array for key, array in found.items() if array is not None}
    with clock("check"):
        handler.check(inp)
        domain_flags = list(handler.assess_input(inp))
    policy.enforce(domain_flags, "the input")  # before any compute: refused out of the validated domain
    progress(0.05, "running handler")

    def handler_progress(fraction: float, message: str) -> None:
        progress(0.05 + 0.85 * max(0.0, min(1.0, fraction)), message)

    with clock("handler"):
        results = ResultSet(domain_flags + list(handler.run(inp, handler_progress)))
        _return_freed_memory()  # the handler's temporaries too, before the encoders allocate theirs
    flags = results.flags
    policy.enforce(flags, "the result")
    warnings = [f.text for f in flags]
    progress(0.9, "encoding DICOM")
    ctx = EncodeContext(
        job_key=spec.job_key, rule=spec.rule, handler=cls.name, handler_version=cls.version,
        # the instance's: a handler running a model its params name (a detector) sets them on itself
        model_name=handler.model_name, model_version=handler.model_version, series_number=spec.series_number,
        **({"created": _dt.datetime.fromisoformat(spec.created)} if spec.created else {}),
        **({"device_serial": spec.device_serial} if spec.device_serial else {}),
    )
    out_dir = Path(spec.results_dir) / str(spec.job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[int, list[dict]] = {}
    plan = encode_plan(results.outputs + warning_findings(flags, inp.primary.series_uid), sources, ctx)
    volume_mb = sum(s.volume.array.nbytes for s in sources.values() if s.volume is not None) / 2**20
    reports_left = sum(task.lane == REPORT_LANE for task in plan)
    if not reports_left:
        _release_pixels(sources)
    for made in run_lanes(plan):  # the reports first, the SEGs last (node/jobs/lanes.py)
        if plan[made.index].lane == REPORT_LANE:
            reports_left -= 1
            if not reports_left:
                _release_pixels(sources)
        clock.add(f"encode {made.kind}", made.seconds, made.cpu_seconds)
        with clock(f"write {made.kind}", cpu_clock=time.thread_time):  # the next encoder runs meanwhile
            mark_warnings(made.datasets, warnings)
            written[made.index] = [_write_result(ds, out_dir, vault) for ds in made.datasets]
            fsync_dirs({out_dir})  # durable: now it may leave the node
        # Written: a SEG's frames (tens of MB) need not wait in memory for the next encoder to finish.
        made.datasets.clear()
        on_result(written[made.index])
    meta = [m for i in sorted(written) for m in written[i]]  # the plan's order, whichever lane finished first
    _keep_artefacts(handler, inp, results.outputs, kept, series_key, clock)  # after delivery is under way
    if spec.extra.get("keep_labels"):  # a shadow pair: the label map is compared with the other version's
        from node.models.shadow import save_labels

        save_labels(out_dir, results.outputs, vault.write_file)
        fsync_dirs({out_dir})
    progress(1.0, f"{len(meta)} result object(s)" + (f", {len(warnings)} quality warning(s)" if warnings else ""))
    figures = {"seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds, "peak_rss_mb": round(_peak_rss_mb(), 1),
               "start_rss_mb": round(start_rss, 1), "input_volume_mb": round(volume_mb, 1)}
    provenance = dict(handler.provenance)
    if spec.extra.get("retrieved_by"):  # input pulled from a PACS: which rule or user asked (node/pacs)
        provenance["retrieved_by"] = spec.extra["retrieved_by"]
    if warnings:
        provenance["quality_warnings"] = warnings
    return meta, provenance, figures


def warm_up() -> None:
    """What a worker's first job would otherwise pay before its handler starts: the handlers'
    modules (``discover``) and highdicom's tables of the standard, read from JSON at first use (0.3
    CPU s). A worker does this while it waits for its first job, started with the node, so that a
    fresh node's first study does not wait ~2 s for it. Per-model sessions still load at first use
    (which model comes is not known)."""
    discover()
    try:  # private to highdicom: if it moves, the first encoder reads the tables as before
        from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
    except ImportError:
        return
    get_sop_class_iod_map()
    get_iod_module_map()
    get_module_attribute_map()


def worker_main(conn, memory_mb: int) -> None:
    """Process entry point: serve jobs from the parent over ``conn`` until it closes."""
    _one_heap_for_all_threads()  # before any thread (a handler's libraries start theirs on import)
    limit = memory_mb * 1024 * 1024
    # A memory cap per worker: a runaway handler gets MemoryError (or is killed), the node lives.
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        warm_up()
    except Exception:  # noqa: BLE001 - a handler that fails to import fails its jobs, with the reason, later
        log.exception("worker warm-up failed; jobs will import what they need")
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            return
        if spec is None:
            return
        try:
            meta, provenance, figures = run_job(spec, lambda f, m: conn.send(("progress", float(f), str(m))),
                                                lambda made: conn.send(("results", made)))
            conn.send(("done", meta, provenance, figures))
        except HandlerRefusal as exc:
            conn.send(("error", f"refused: {exc}"))
        except SpoolIntegrityError as exc:
            conn.send(("error", str(exc)))
        except MemoryError:
            conn.send(("error", f"out of memory (worker cap {memory_mb} MB)"))
        except Exception as exc:  # noqa: BLE001 - report any handler failure to the parent, keep serving
            tb = traceback.format_exc(limit=8)
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{tb}"))
