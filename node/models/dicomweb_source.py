"""Training cases from a DICOMweb archive: what an OHIF annotation workflow leaves behind.

QIDO-RS finds the SEG instances (Modality=SEG, narrowed by ``study_uids`` and ``query``); each
SEG's ReferencedSeriesSequence names its source series, which WADO-RS retrieves. A SEG and its
series become a case through ``data.seg_case``, the folder source's own path.

An archive also holds SEGs that are not this model's annotations (AI results, other projects):
a SEG without a segment for every model label is skipped, logged and counted; if none is usable,
loading fails with the reasons. A SEG whose source series the archive lacks is an error.

Retrieved instances are written under ``work_dir/<name>/dicomweb/`` only while they are read
(``load_series`` reads Part 10 files) and removed afterwards: nothing is cached between runs, so
an annotation corrected in OHIF is what the next run trains on.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import unquote

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from node.models.card import CardError
from node.models.data import Case, UnusableSeg, read_seg, referenced_series_uid, seg_case, seg_label_values
from node.models.train_config import DicomwebAuth, DicomwebSource, TrainLabel
from node.volume import SeriesData, load_series

__all__ = ["dicomweb_cases", "dicomweb_client"]

FIELD = "data.dicomweb"
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)  # as stored: no transcoding by the archive
_LITERAL = re.compile(r"%(2A|3F|2C|3A|40|21|24|27|28|29|3B)", re.IGNORECASE)  # * ? , : @ ! $ ' ( ) ;


@dataclass(frozen=True)
class _SegRef:
    study: str
    series: str
    sop: str

    @property
    def what(self) -> str:
        return f"SEG {self.sop} (study {self.study})"


def _secret(auth: DicomwebAuth, kind: str) -> str:
    env, file = getattr(auth, f"{kind}_env"), getattr(auth, f"{kind}_file")
    if env:
        value = os.environ.get(env)
        if not value:
            raise CardError(f"{FIELD}.auth.{kind}_env: environment variable {env} is not set")
        return value
    try:
        value = Path(file).read_text().strip()
    except OSError as exc:
        raise CardError(f"{FIELD}.auth.{kind}_file: cannot read {file}: {exc.strerror}") from None
    if not value:
        raise CardError(f"{FIELD}.auth.{kind}_file: {file} is empty")
    return value


class _LiteralQuerySession(requests.Session):
    """Sends QIDO wildcards (``*``, ``?``) and other characters a URL query may hold unescaped.

    requests percent-encodes them, and Orthanc (1.10 with DICOMweb plugin 1.7, Debian 12) matches
    query values without decoding them, so ``PatientID=PHANTOM%2A`` would find nothing. RFC 3986
    allows sub-delimiters, ``:``, ``@`` and ``?`` in a query as they are; a space or ``^`` must
    stay escaped (urllib3 re-escapes them), so such a value matches there only through ``?``.
    """

    def send(self, request, **kwargs):
        base, sep, query = (request.url or "").partition("?")
        if sep:
            request.url = base + "?" + _LITERAL.sub(lambda m: unquote(m.group()), query)
        return super().send(request, **kwargs)


def dicomweb_client(spec: DicomwebSource) -> DICOMwebClient:
    """A client for ``spec.url`` with its credentials (HTTP basic or bearer) read now."""
    session = _LiteralQuerySession()
    auth = spec.auth
    if auth is not None and (auth.password_env or auth.password_file):
        session.auth = (auth.username, _secret(auth, "password"))
    elif auth is not None:
        session.headers["Authorization"] = f"Bearer {_secret(auth, 'token')}"
    client = DICOMwebClient(url=spec.url, session=session, timeout=spec.timeout_s)
    # Retry a refused connection or a 408/429/503/504 twice (after 1 s and 2 s: long enough for the node
    # to restart its Orthanc), not dicomweb-client's five times over 30 s: a wrong URL fails fast.
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=500)
    return client


class _Archive:
    """The client's calls, with HTTP and network failures turned into errors that name the field."""

    def __init__(self, spec: DicomwebSource) -> None:
        self.url = spec.url
        self.client = dicomweb_client(spec)

    def call(self, doing: str, method: str, *args, **kwargs):
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            if status in (401, 403):
                raise CardError(f"{FIELD}.auth: {self.url} refused the credentials (HTTP {status}) "
                                f"while {doing}") from None
            body = exc.response.text[:200] if exc.response is not None else ""
            raise CardError(f"{FIELD}: HTTP {status} from {self.url} while {doing}: {body}") from None
        except requests.RequestException as exc:
            raise CardError(f"{FIELD}.url: cannot reach {self.url} while {doing}: {exc}") from None

    def search(self, doing: str, method: str, **kwargs) -> list[Dataset]:
        return [Dataset.from_json(item) for item in self.call(doing, method, get_remaining=True, **kwargs)]


def _find_segs(archive: _Archive, spec: DicomwebSource) -> list[_SegRef]:
    filters = {**spec.query, "Modality": "SEG"}
    found: set[_SegRef] = set()
    for study in spec.study_uids or [None]:
        if study is not None and not archive.search(f"looking for study {study}", "search_for_studies",
                                                    search_filters={"StudyInstanceUID": study}):
            raise CardError(f"{FIELD}.study_uids: study {study} is not in the archive at {archive.url}")
        for ds in archive.search("searching for SEG instances", "search_for_instances", study_instance_uid=study,
                                 search_filters=filters):
            found.add(_SegRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
    if spec.sop_uids:
        found = {r for r in found if r.sop in set(spec.sop_uids)}
        missing = sorted(set(spec.sop_uids) - {r.sop for r in found})
        if missing:
            raise CardError(f"{FIELD}.sop_uids: SEG instance(s) {missing} are not in the archive at {archive.url}")
    # a stable order: the train/validation split is seeded by position
    return sorted(found, key=lambda r: (r.study, r.series, r.sop))




def _source_study(archive: _Archive, ref: _SegRef, series_uid: str) -> str:
    """The study holding the SEG's source series: the SEG's own, or wherever the archive has it."""
    for study in (ref.study, None):
        hits = archive.search(f"looking for series {series_uid}", "search_for_series", study_instance_uid=study,
                              search_filters={"SeriesInstanceUID": series_uid})
        if hits:
            return str(hits[0].StudyInstanceUID) if study is None else study
    raise CardError(f"{FIELD}: {ref.what} references series {series_uid}, which the archive at {archive.url} "
                    "does not have")


def _load_series(archive: _Archive, study: str, series_uid: str, folder: Path) -> SeriesData:
    datasets = archive.call(f"retrieving series {series_uid}", "retrieve_series", study, series_uid,
                            media_types=ANY_TRANSFER_SYNTAX)
    if not datasets:
        raise CardError(f"{FIELD}: the archive at {archive.url} returned no instance of series {series_uid}")
    out = folder / series_uid
    out.mkdir(parents=True)
    paths = []
    for i, ds in enumerate(datasets):
        paths.append(out / f"{i:05d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return load_series(paths)


def dicomweb_cases(spec: DicomwebSource, labels: Sequence[TrainLabel], work_dir: Path,
                   log: Callable[[str], None] = print) -> list[Case]:
    """One case per usable SEG in the archive, on its source series."""
    archive = _Archive(spec)
    refs = _find_segs(archive, spec)
    scope = (f" in studies {spec.study_uids}" if spec.study_uids else "") + (f" matching {spec.query}"
                                                                                if spec.query else "")
    if not refs:
        raise CardError(f"{FIELD}: no SEG instance at {spec.url}{scope}")
    log(f"DICOMweb: {len(refs)} SEG instance(s) at {spec.url}{scope}")
    download = Path(work_dir) / "dicomweb"
    shutil.rmtree(download, ignore_errors=True)  # left by an interrupted run
    series: dict[str, SeriesData] = {}  # several SEGs may annotate one series: retrieve it once
    cases: list[Case] = []
    skipped: list[str] = []
    try:
        for ref in refs:
            ds = archive.call(f"retrieving {ref.what}", "retrieve_instance", ref.study, ref.series, ref.sop,
                              media_types=ANY_TRANSFER_SYNTAX)
            source = referenced_series_uid(ds, ref.what, FIELD)

            def source_series(ref=ref, source=source) -> SeriesData:
                if source not in series:
                    series[source] = _load_series(archive, _source_study(archive, ref, source), source, download)
                return series[source]

            seg = read_seg(ds, ref.what, FIELD, source_series)
            try:
                seg_label_values(seg, labels, ref.what)
            except UnusableSeg as exc:
                skipped.append(str(exc))
                log(f"DICOMweb: skipped {exc}")
                continue
            cases.append(seg_case(seg, source_series(), labels, f"seg-{ref.sop}", ref.what, FIELD))
    finally:
        shutil.rmtree(download, ignore_errors=True)
    log(f"DICOMweb: {len(cases)} SEG(s) used, {len(skipped)} skipped")
    if not cases:
        raise CardError(f"{FIELD}: none of the {len(refs)} SEG instance(s) at {spec.url}{scope} is usable: "
                        + "; ".join(skipped))
    return cases
