"""DICOMweb source: QIDO-RS (ping, study and series search) and WADO-RS retrieve (dicomweb-client).

WADO-RS instances are taken one at a time from the multipart stream (``iter_study``/``iter_series``)
and handed to the node's ingest as they arrive: a study is never held in memory whole.

QIDO-RS searches are paged here (``limit``/``offset``), not by dicomweb-client's ``get_remaining``,
which asks for the next page until one is empty: against an archive that ignores ``offset`` (it
answers the same page again) that never ends. Here a page that repeats what was already received
ends the search with a warning (``warnings``), as does the cap on matches.
"""
from __future__ import annotations

import logging
import time
from io import BytesIO
from typing import Callable

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from node.config_pacs import DicomwebSource
from node.pacs.model import (MAX_MATCHES, PacsError, RetrieveOutcome, SeriesMatch, StudyMatch, StudyQuery,
                             answered_count)

log = logging.getLogger("hilum.pacs")

STUDY_FIELDS = ["PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
                "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]
SERIES_FIELDS = ["Modality", "SeriesDescription", "SeriesNumber", "BodyPartExamined",
                 "NumberOfSeriesRelatedInstances", "SliceThickness", "ImageType", "ProtocolName"]
QIDO_PAGE = 1000  # results asked for per QIDO-RS request


class DicomwebSourceClient:
    def __init__(self, name: str, cfg: DicomwebSource) -> None:
        self.name, self.cfg = name, cfg
        self.warnings: list[str] = []  # what this client's searches could not do in full (results kept)
        self._more = False  # the last QIDO-RS answer's Warning header said more results exist

    def _client(self, url: str) -> DICOMwebClient:
        session = requests.Session()
        session.hooks["response"].append(self._note_warning)
        if self.cfg.auth is not None:
            secret = self.cfg.auth.secret()
            if self.cfg.auth.is_token:
                session.headers["Authorization"] = f"Bearer {secret}"
            else:
                session.auth = (self.cfg.auth.username, secret)
        return DICOMwebClient(url, session=session, timeout=self.cfg.timeout_s)

    def _call(self, what: str, fn):
        try:
            return fn()
        except requests.exceptions.JSONDecodeError as exc:  # a 200 whose body is not JSON (an HTML error page)
            raise PacsError(f"source {self.name}: {what}: malformed answer: not JSON ({exc})") from exc
        except requests.RequestException as exc:
            raise PacsError(f"source {self.name}: {what} failed: {exc}") from exc
        except ValueError as exc:  # a body that is not the JSON/multipart DICOMweb promises
            raise PacsError(f"source {self.name}: {what}: malformed answer: {exc}") from exc

    def _note_warning(self, response, *args, **kwargs) -> None:
        # PS3.18 6.7.1.2: an archive that returns fewer results than matched says so in a Warning
        # header ("299 ...: The number of results exceeded the maximum supported by the server.
        # Additional results can be requested."): then a short page is not the last one.
        text = response.headers.get("Warning", "")
        self._more = "additional results" in text.lower() or "exceeded" in text.lower()

    def _search(self, what: str, key: str, limit: int, fn) -> list[dict]:
        """All the answers of one QIDO-RS search, page by page: ``fn(limit=, offset=)`` asks one page.
        Ends at a page shorter than asked for (unless the archive's Warning header says more exist),
        at ``limit`` (0: ``MAX_MATCHES``), or at a page that repeats ``key`` values already received
        (an archive that ignores ``offset``): then with a warning in ``warnings``, never a hang."""
        cap = limit or MAX_MATCHES
        out: list[dict] = []
        seen: set[str] = set()
        while len(out) < cap:
            ask = min(QIDO_PAGE, cap - len(out))
            self._more = False
            page = self._call(what, lambda: fn(limit=ask, offset=len(out)))
            if not isinstance(page, list):
                raise PacsError(f"source {self.name}: {what}: malformed answer: not a JSON array")
            keys = [_key(a, key) for a in page]
            repeated = sum(1 for k in keys if k and k in seen)
            if repeated:
                self.warnings.append(
                    f"source {self.name}: {what}: the archive ignores 'offset' (the page at offset {len(out)} "
                    f"repeated {repeated} result(s) already received): {len(out)} result(s) kept, "
                    "more may exist")
                out += [a for a, k in zip(page, keys) if not k or k not in seen][: cap - len(out)]
                return out
            seen.update(k for k in keys if k)
            out += page[: cap - len(out)]
            if len(page) < ask and not self._more or not page:
                return out
        if not limit:  # the node's own cap, not one the caller asked for: say so
            self.warnings.append(f"source {self.name}: {what}: {MAX_MATCHES} matches or more: the first "
                                 f"{MAX_MATCHES} kept (narrow the query)")
        return out

    def echo(self) -> float:
        """A QIDO-RS search for one study: the archive answers and the credentials work."""
        t0 = time.perf_counter()
        self._call("QIDO-RS ping", lambda: self._client(self.cfg.qido_url).search_for_studies(limit=1))
        return time.perf_counter() - t0

    def find_studies(self, q: StudyQuery, limit: int = 0) -> tuple[list[StudyMatch], int]:
        client = self._client(self.cfg.qido_url)
        fields = STUDY_FIELDS + (["IssuerOfPatientID"] if q.issuer else [])
        answers = self._search("QIDO-RS study search", "StudyInstanceUID", limit, lambda **page:
                               client.search_for_studies(fields=fields, search_filters=q.keys(), **page))
        out, bad = [], 0
        for a in answers:
            m = _study(a)
            if m is None:
                bad += 1
            else:
                out.append(m)
        return out, bad

    def find_series(self, study_uid: str) -> tuple[list[SeriesMatch], int]:
        client = self._client(self.cfg.qido_url)
        answers = self._search("QIDO-RS series search", "SeriesInstanceUID", 0, lambda **page:
                               client.search_for_series(study_uid, fields=SERIES_FIELDS, **page))
        out, bad = [], 0
        for a in answers:
            m = _series(a, study_uid)
            if m is None:
                bad += 1
            else:
                out.append(m)
        return out, bad

    def get(self, study_uid: str, series_uids: list[str] | None, store: Callable[[bytes], tuple[int, str]],
            progress: Callable[[RetrieveOutcome, int], bool]) -> RetrieveOutcome:
        client = self._client(self.cfg.wado)
        out = RetrieveOutcome()
        streams = [client.iter_series(study_uid, s) for s in series_uids] if series_uids else \
            [client.iter_study(study_uid)]
        try:
            for stream in streams:
                for ds in _parts(stream, self.name):
                    if getattr(ds, "StudyInstanceUID", None) != study_uid:
                        out.failed += 1
                        out.note = "instances of other studies refused (not asked for)"
                        continue
                    status, _ = store(_part10(ds))
                    if status == 0:
                        out.completed += 1
                    else:
                        out.failed += 1
                        out.failed_uids.append(str(getattr(ds, "SOPInstanceUID", "?")))
                    if not progress(out, 0):
                        raise PacsError("WADO-RS retrieve cancelled")
        except requests.RequestException as exc:
            raise PacsError(f"source {self.name}: WADO-RS retrieve failed: {exc}") from exc
        return out


def _parts(stream, source: str):
    """The instances of a WADO-RS multipart stream; a part that is not DICOM, or a body that is not
    the multipart it should be, ends the retrieve with a PacsError saying so (what came before it
    is kept), not with an exception from inside dicomweb-client or pydicom."""
    it = iter(stream)
    while True:
        try:
            ds = next(it)
        except StopIteration:
            return
        except requests.RequestException:
            raise
        except Exception as exc:  # noqa: BLE001 - ValueError from the multipart decoder, pydicom's errors
            raise PacsError(f"source {source}: WADO-RS retrieve: malformed answer: {type(exc).__name__}: {exc}"
                            [:300]) from exc
        yield ds


def _part10(ds: pydicom.Dataset) -> bytes:
    """The instance as a Part 10 file, in the transfer syntax the archive sent it in."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _key(a, keyword: str) -> str:
    """A UID of one answer, to tell pages apart ("" if the answer is malformed: _study skips it)."""
    try:
        return _value(a, keyword)
    except (AttributeError, TypeError, ValueError):
        return ""


def _value(a: dict, keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    el = a.get(f"{tag_for_keyword(keyword):08X}", {})
    vals = el.get("Value", [])
    if not vals:
        return ""
    v = vals[0]
    if isinstance(v, dict):  # PN
        return str(v.get("Alphabetic", ""))
    return "\\".join(str(x) for x in vals) if len(vals) > 1 else str(v)


def _study(a: dict) -> StudyMatch | None:
    try:
        uid = _value(a, "StudyInstanceUID")
        if not uid:
            return None
        n = _value(a, "NumberOfStudyRelatedInstances")
        return StudyMatch(study_uid=uid, patient_id=_value(a, "PatientID"), patient_name=_value(a, "PatientName"),
                          study_date=_value(a, "StudyDate"), study_time=_value(a, "StudyTime"),
                          accession=_value(a, "AccessionNumber"), description=_value(a, "StudyDescription"),
                          modalities=[m for m in _value(a, "ModalitiesInStudy").split("\\") if m],
                          instances=answered_count(int(n), f"study {uid}") if n else None, issuer=_value(a, "IssuerOfPatientID"))
    except (AttributeError, TypeError, ValueError) as exc:
        log.warning("malformed QIDO-RS study answer skipped: %s", exc)
        return None


def _series(a: dict, study_uid: str) -> SeriesMatch | None:
    try:
        uid = _value(a, "SeriesInstanceUID")
        if not uid:
            return None
        n = _value(a, "NumberOfSeriesRelatedInstances")
        return SeriesMatch(series_uid=uid, study_uid=study_uid, modality=_value(a, "Modality"),
                           description=_value(a, "SeriesDescription"), number=_value(a, "SeriesNumber"),
                           body_part=_value(a, "BodyPartExamined"),
                           instances=answered_count(int(n), f"series {uid}") if n else None,
                           answer=pydicom.Dataset.from_json(a))
    except (AttributeError, TypeError, ValueError) as exc:
        log.warning("malformed QIDO-RS series answer skipped: %s", exc)
        return None
