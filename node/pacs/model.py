"""What a query asks and what a source answers, independent of the protocol."""
from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field
from typing import Any


log = logging.getLogger("hilum.pacs")

# The most matches one query takes from a source when its caller sets no limit (a pull rule, priors):
# a query that matches more is cut here, with a warning, rather than filling memory and the index.
MAX_MATCHES = 10_000


class PacsError(Exception):
    """A source could not be reached or answered with an error; the message says which and why."""


class NotRetryable(PacsError):
    """An error that retrying cannot fix (e.g. the PACS does not know the move destination)."""


_SINCE_RE = re.compile(r"^(\d+)([hdwy])$")
_UNITS = {"h": dt.timedelta(hours=1), "d": dt.timedelta(days=1), "w": dt.timedelta(weeks=1),
          "y": dt.timedelta(days=365)}


def parse_span(text: str) -> dt.timedelta:
    """``24h``, ``7d``, ``2w``, ``5y``: a length of time (relative windows, priors' ``within``)."""
    m = _SINCE_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a time span like 24h, 7d, 2w or 5y")
    return int(m.group(1)) * _UNITS[m.group(2)]


def date_range(since: dt.timedelta | None, now: dt.datetime | None = None) -> str | None:
    """A DICOM StudyDate range from ``now - since`` to today (``YYYYMMDD-``)."""
    if since is None:
        return None
    start = (now or dt.datetime.now()) - since
    return start.strftime("%Y%m%d") + "-"


# An instance count a PACS answers is taken only in 0..MAX_COUNT: one past it (pydicom reads "1e+20" as IS)
# overflowed SQLite's INTEGER where the count is stored, and a negative one defeated instances_per_hour.
MAX_COUNT = (1 << 31) - 1
_ACR_NEMA_DA = re.compile(r"^([0-9]{4})\.([0-9]{2})\.([0-9]{2})$")


def answered_count(n: int | None, what: str) -> int | None:
    """A PACS's NumberOf...RelatedInstances, or None (not given) when outside 0..MAX_COUNT, with a
    warning naming ``what`` (the study or series)."""
    if n is None or 0 <= n <= MAX_COUNT:
        return n
    log.warning("%s: the PACS answered an instance count of %d, taken as not given (not 0..%d)", what, n, MAX_COUNT)
    return None


def answered_date(text: str) -> str | None:
    """A StudyDate a PACS answered as YYYYMMDD, or None when it is no date. The ACR-NEMA form
    YYYY.MM.DD (still sent by old archives) is normalised; anything else is refused rather than
    compared as a string, where "2023.01.05" or "2024" falls inside a date window by accident."""
    text = text.strip()
    if m := _ACR_NEMA_DA.match(text):
        text = "".join(m.groups())
    if len(text) != 8 or not (text.isascii() and text.isdigit()):
        return None
    try:
        dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:  # 20230230
        return None
    return text


@dataclass(frozen=True)
class StudyQuery:
    """Study-level matching keys; empty ones are not sent as constraints."""

    patient_id: str = ""
    accession: str = ""
    modality: str = ""  # ModalitiesInStudy
    study_date: str = ""  # DICOM date or range: 20240101, 20240101-20240131, 20240101-
    study_description: str = ""  # may use * and ? wildcards
    study_uid: str = ""
    issuer: str = ""  # IssuerOfPatientID: which authority's PatientID (priors send it when the study has one)

    def keys(self) -> dict[str, str]:
        return {k: v for k, v in (("PatientID", self.patient_id), ("IssuerOfPatientID", self.issuer),
                                  ("AccessionNumber", self.accession),
                                  ("ModalitiesInStudy", self.modality), ("StudyDate", self.study_date),
                                  ("StudyDescription", self.study_description),
                                  ("StudyInstanceUID", self.study_uid)) if v}


@dataclass
class StudyMatch:
    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    study_time: str = ""
    accession: str = ""
    description: str = ""
    modalities: list[str] = field(default_factory=list)
    instances: int | None = None  # NumberOfStudyRelatedInstances, when the PACS answers it
    sop_classes: list[str] = field(default_factory=list)  # SOPClassesInStudy, when answered
    issuer: str = ""  # IssuerOfPatientID, when asked for and answered

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SeriesMatch:
    series_uid: str
    study_uid: str
    modality: str = ""
    description: str = ""
    number: str = ""
    body_part: str = ""
    instances: int | None = None
    answer: Any = None  # the answer as a pydicom Dataset: what a pull rule's series filter reads

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "answer"}


@dataclass
class RetrieveOutcome:
    """What a retrieve returned: DIMSE sub-operation counts (WADO: instances stored / failed)."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    note: str = ""
