"""Inside a worker process: load → handler → validate → encode → durable, sealed result files.

The handler computes, the encoders turn its typed results into DICOM, and the files land in
``results/<job id>/`` before the parent records them. Nothing here touches the index or the
network: the parent process owns both.
"""
from __future__ import annotations

import os
import resource
from io import BytesIO
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from node.encoders.context import EncodeContext
from node.encoders.warnings import mark_warnings
from node.handler_api import HandlerInput, HandlerRefusal, get_handler
from node.jobs.quality import QualityPolicy, warning_findings
from node.jobs.priors_input import load_priors
from node.receive.spool import fsync_dirs
from node.results import ResultSet
from node.store.vault import IntegrityError, Vault, VaultSpec
from node.volume import load_series


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


def run_job(spec: JobSpec, progress) -> tuple[list[dict], dict]:
    """Returns (result objects' metadata, the handler's provenance: model hash, execution providers…)."""
    from node.encoders import encode_all  # imported here: heavy, and only workers need it

    cls = get_handler(spec.handler)
    handler = cls(spec.params)
    policy = QualityPolicy(spec.options)
    vault = _vault(spec.vault)
    progress(0.0, "loading series")
    try:
        sources = {uid: load_series(paths, with_pixels=cls.needs_pixels, read=vault.read)
                   for uid, paths in spec.series.items()}
        priors = load_priors(spec.extra, lambda paths: load_series(paths, with_pixels=cls.needs_pixels,
                                                                   read=vault.read))
    except IntegrityError as exc:  # never hand a tampered or truncated instance to a handler
        where = vault.quarantine_damaged(exc.locator, str(exc))
        raise SpoolIntegrityError(f"spool integrity check failed for {exc.locator}: {exc} "
                                  f"(copy kept in {where or 'nowhere: quarantine not writable'})") from None
    inp = HandlerInput(study_uid=spec.study_uid, series=list(sources.values()), priors=priors,
                       priors_note=spec.extra.get("priors_note"))
    handler.check(inp)
    domain_flags = list(handler.assess_input(inp))
    policy.enforce(domain_flags, "the input")  # before any compute: refused out of the validated domain
    progress(0.05, "running handler")

    def handler_progress(fraction: float, message: str) -> None:
        progress(0.05 + 0.85 * max(0.0, min(1.0, fraction)), message)

    results = ResultSet(domain_flags + list(handler.run(inp, handler_progress)))
    flags = results.flags
    policy.enforce(flags, "the result")
    warnings = [f.text for f in flags]
    progress(0.9, "encoding DICOM")
    ctx = EncodeContext(
        job_key=spec.job_key, rule=spec.rule, handler=cls.name, handler_version=cls.version,
        model_name=cls.model_name, model_version=cls.model_version, series_number=spec.series_number,
    )
    datasets = encode_all(results.outputs + warning_findings(flags, inp.primary.series_uid), sources, ctx)
    mark_warnings(datasets, warnings)
    out_dir = Path(spec.results_dir) / str(spec.job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = []
    for ds in datasets:
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        vault.write_file(path, buf.getvalue())
        meta.append({
            "sop_instance_uid": str(ds.SOPInstanceUID), "sop_class_uid": str(ds.SOPClassUID),
            "series_instance_uid": str(ds.SeriesInstanceUID), "modality": str(ds.Modality), "path": str(path),
        })
    fsync_dirs({out_dir})
    progress(1.0, f"{len(meta)} result object(s)" + (f", {len(warnings)} quality warning(s)" if warnings else ""))
    provenance = dict(handler.provenance)
    if spec.extra.get("retrieved_by"):  # input pulled from a PACS: which rule or user asked (node/pacs)
        provenance["retrieved_by"] = spec.extra["retrieved_by"]
    if warnings:
        provenance["quality_warnings"] = warnings
    return meta, provenance


def worker_main(conn, memory_mb: int) -> None:
    """Process entry point: serve jobs from the parent over ``conn`` until it closes."""
    limit = memory_mb * 1024 * 1024
    # A memory cap per worker: a runaway handler gets MemoryError (or is killed), the node lives.
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            return
        if spec is None:
            return
        try:
            meta, provenance = run_job(spec, lambda f, m: conn.send(("progress", float(f), str(m))))
            conn.send(("done", meta, provenance))
        except HandlerRefusal as exc:
            conn.send(("error", f"refused: {exc}"))
        except SpoolIntegrityError as exc:
            conn.send(("error", str(exc)))
        except MemoryError:
            conn.send(("error", f"out of memory (worker cap {memory_mb} MB)"))
        except Exception as exc:  # noqa: BLE001 - report any handler failure to the parent, keep serving
            tb = traceback.format_exc(limit=8)
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{tb}"))
