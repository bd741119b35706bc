"""Where the loop meets the archive: model results become case predictions, and SEGs stored through
the gateway (OHIF's save) become case labels, after ``labels.check_seg`` has passed them.

The gateway streams STOW-RS bodies to the archive; while any project exists it first reads a body
whole (bounded by ``stow_max_mb``), so that a SEG for a project case can be refused, with the
reason, *before* the archive stores it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

import pydicom

from node.projects.labels import LabelRefused, check_seg
from node.receive.ingest import InflatedTooLarge, read_header_dataset
from node.projects.store import Project, ProjectStore

__all__ = ["CaseLabel", "multipart_parts", "seg_parts", "vet", "note_prediction", "complete_studies"]

SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # binary/fractional, Label Map


@dataclass(frozen=True)
class CaseLabel:
    project: Project
    study_uid: str
    sop_uid: str
    series_uid: str  # the SEG's own series
    segments: dict[str, int]


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The part bodies of a multipart/related request (RFC 2046), headers stripped."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        return [body] if body else []
    delimiter = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if sep:
            parts.append(data[:-2] if data.endswith(b"\r\n") else data)
    return parts


def seg_parts(parts: list[bytes], limit: int | None = None) -> list[pydicom.Dataset]:
    """The SEG instances among the parts (headers and segment descriptions; no pixel data read). A
    deflated part is inflated within ``limit`` bytes (the request's own limit), never whole by pydicom:
    ``InflatedTooLarge`` past it."""
    out = []
    for data in parts:
        try:
            ds = read_header_dataset(data, limit)
        except InflatedTooLarge:
            raise
        except Exception:  # noqa: BLE001 - not DICOM: the archive will answer for it
            continue
        if str(ds.get("SOPClassUID", "")) in SEG_CLASSES or ds.get("Modality") == "SEG":
            out.append(ds)
    return out


def vet(store: ProjectStore, segs: list[pydicom.Dataset], user: str, role: str,
        input_series: Callable[[Project, str], list[str]]) -> list[CaseLabel]:
    """The SEGs that are labels of a project case, checked; LabelRefused (reason) or PermissionError.

    ``input_series(project, study_uid) -> list[str]``: the case's series of the project's input
    modality, from the archive. SEGs of studies in no project pass through untouched.
    """
    accepted = []
    for ds in segs:
        study = str(ds.get("StudyInstanceUID", ""))
        for name in store.names():
            project = store.get(name)
            cases = store.cases(name)
            if study not in cases:
                continue
            if not project.may_annotate(user, role):
                raise PermissionError(project.why_not(user, role, "annotate"))
            try:
                segments = check_seg(project, ds, study, input_series(project, study), cases)
            except LabelRefused as exc:
                raise LabelRefused(f"project {name!r}, case {study}: {exc}") from None
            accepted.append(CaseLabel(project, study, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), segments))
    return accepted


def note_prediction(store: ProjectStore, job, results: list[dict], provenance: dict) -> list[str]:
    """A model job finished: for every project of that model holding the study, the case is predicted.

    Shadow runs are not predictions (their results are never shown to annotators). Returns the projects.
    """
    options = json.loads(job["options_json"] or "{}")
    if not job["handler"].startswith("model:") or options.get("shadow_of"):
        return []
    model = job["handler"].removeprefix("model:")
    seg = next((r["sop_instance_uid"] for r in results if r["modality"] == "SEG"), None)
    done = []
    for name in store.names():
        project = store.get(name)
        if project.model == model and store.has_case(name, job["study_uid"]):
            store.record_prediction(name, job["study_uid"], job_id=job["id"],
                                    model_version=str(provenance.get("model_version")), seg_sop_uid=seg,
                                    uncertainty=provenance.get("uncertainty"))
            done.append(name)
    return done


def complete_studies(index) -> list:
    """The ``StudyFacts`` of every study complete in the node's index (what a new project's ``select``
    condition is tested on, as the router tests each study completing later)."""
    from node.route.router import series_facts
    from node.rules.facts import StudyFacts

    grouped: dict[str, list] = {}
    for row in index.series_of_complete_studies():
        grouped.setdefault(row["study_uid"], []).append(series_facts(row))
    return [StudyFacts(series, uid) for uid, series in grouped.items()]
