"""``kind: pull`` rules: what to fetch from a PACS source, when, and how much.

A pull rule lives in the rules directory beside the routing rules and is loaded, validated,
versioned and hot-reloaded with them (node/rules/loader.py hands ``kind: pull`` entries here).
Its ``series`` filter is an ordinary condition (level series), tested against the C-FIND SERIES
answers, so only the matching series are retrieved. node/pacs/scheduler.py carries it out.

    - kind: pull
      name: chest-ct-daily
      source: pacs
      query: {ModalitiesInStudy: CT, StudyDate: {last: 24h}, StudyDescription: "*CHEST*"}
      series: {Modality: CT, SliceThickness: {le: 1.5}}
      schedule: {every: 15m, window: "01:00-05:00"}
      watch: true
      limits: {studies_per_run: 50, instances_per_hour: 20000}
"""
from __future__ import annotations

import csv
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from node.rules.conditions import Condition, compile_condition
from node.rules.model import parse_duration
from node.rules.rule import Action
from node.rules.spans import parse_span_s

_DATE = r"\d{8}"
_DATE_RANGE = re.compile(rf"^({_DATE})?(-({_DATE})?)?$")
_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
MAX_EVERY_S = 31 * 86400  # a monthly pull at most: a longer gap is a typo (and .inf/.nan never run)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RelativeDate(_Strict):
    last: float  # seconds back from the time of the query

    @field_validator("last", mode="before")
    @classmethod
    def _span(cls, v: Any) -> float:
        return parse_span_s(v)


class CsvList(_Strict):
    """A cohort: one query per value of ``column`` in ``file`` (relative to the rules directory)."""

    file: str
    column: Literal["PatientID", "AccessionNumber"]


class PullQuery(_Strict):
    ModalitiesInStudy: str = ""
    StudyDate: str | RelativeDate = ""
    StudyDescription: str = ""  # * and ? wildcards
    PatientID: str = ""
    AccessionNumber: str = ""
    csv: CsvList | None = None

    @field_validator("StudyDate")
    @classmethod
    def _date(cls, v: str | RelativeDate) -> str | RelativeDate:
        if isinstance(v, str) and v and not _DATE_RANGE.match(v.replace("-", "-")):
            raise ValueError(f"{v!r}: a date YYYYMMDD, a range YYYYMMDD-YYYYMMDD (either end open), or {{last: 24h}}")
        return v

    def study_date(self, now: dt.datetime) -> str:
        if isinstance(self.StudyDate, RelativeDate):
            return (now - dt.timedelta(seconds=self.StudyDate.last)).strftime("%Y%m%d") + "-"
        return self.StudyDate


class Schedule(_Strict):
    every: float = 900.0  # seconds between runs
    window: str | None = None  # "01:00-05:00": runs only start inside it (may wrap midnight)

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, v: Any) -> float:
        return parse_duration(v, max_s=MAX_EVERY_S)

    @field_validator("window")
    @classmethod
    def _window(cls, v: str | None) -> str | None:
        if v is not None and not _WINDOW.match(v):
            raise ValueError(f"{v!r}: a local time window like '01:00-05:00'")
        if v is not None and v[:5] == v[6:]:  # in_window(): start <= t < end is never true
            raise ValueError(f"{v!r}: the window starts and ends at the same time, so it never opens; "
                             "leave out 'window' to run at any time")
        return v

    def next_run(self, after: dt.datetime) -> dt.datetime:
        """``after + every``, moved to the window's next opening when it falls outside."""
        t = after + dt.timedelta(seconds=self.every)
        if self.window is None:
            return t
        m = _WINDOW.match(self.window)
        start = dt.time(int(m.group(1)), int(m.group(2)))
        end = dt.time(int(m.group(3)), int(m.group(4)))
        if in_window(t.time(), start, end):
            return t
        opening = dt.datetime.combine(t.date(), start)
        return opening if opening > t else opening + dt.timedelta(days=1)

    def open_now(self, now: dt.datetime) -> bool:
        if self.window is None:
            return True
        m = _WINDOW.match(self.window)
        return in_window(now.time(), dt.time(int(m.group(1)), int(m.group(2))),
                         dt.time(int(m.group(3)), int(m.group(4))))


def in_window(t: dt.time, start: dt.time, end: dt.time) -> bool:
    return start <= t < end if start <= end else (t >= start or t < end)


class Limits(_Strict):
    studies_per_run: int = Field(50, ge=1, le=100000)
    instances_per_hour: int | None = Field(None, ge=1)


class PullSpec(_Strict):
    kind: Literal["pull"]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    description: str = ""
    enabled: StrictBool = True
    source: str
    query: PullQuery
    series: dict[str, Any] | None = None  # a condition over the C-FIND SERIES answers
    schedule: Schedule = Schedule()
    watch: StrictBool = False  # remember what was pulled: each poll asks only for what is new
    limits: Limits = Limits()


PULL_FIELDS = tuple(PullSpec.model_fields)


@dataclass(frozen=True, eq=False)
class PullRule:
    """A loaded pull rule (``level`` 'pull': routing never evaluates it)."""

    name: str
    description: str
    file: str
    line: int | None
    index: int
    enabled: bool
    spec: PullSpec
    series_filter: Condition | None
    order: int = 100
    level: str = "pull"
    fallback: bool = False
    exclusive: bool = False

    @property
    def action(self) -> Action:
        """Routing's view of it: no handler, no destinations (what it does is pull, not route)."""
        return Action(rule=self.name, level="pull", handler=None)

    def sort_key(self) -> tuple:
        return (self.order, self.file, self.index)

    def where(self) -> str:
        return self.file + (f":{self.line}" if self.line else "")


def cohort_path(c: CsvList, base_dir: Path) -> Path:
    p = Path(c.file)
    return p if p.is_absolute() else base_dir / p


def read_cohort(c: CsvList, base_dir: Path) -> list[str]:
    """The distinct non-empty values of the cohort column; ValueError/OSError saying what is wrong."""
    path = cohort_path(c, base_dir)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if c.column not in (reader.fieldnames or []):
            have = ", ".join(reader.fieldnames or []) or "none (empty file)"
            raise ValueError(f"{path} has no column {c.column!r} (columns: {have})")
        values: dict[str, None] = {}  # distinct, in file order
        try:
            for r in reader:
                if v := (r.get(c.column) or "").strip():
                    _exact_value(v, c.column, f"{path} line {reader.line_num}")
                    values[v] = None
        except csv.Error as exc:
            raise ValueError(f"{path}: not a readable CSV: {exc}") from exc
    if not values:
        raise ValueError(f"{path}: no {c.column} values under the header")
    return list(values)


def _exact_value(v: str, column: str, where: str) -> None:
    """A cohort value goes out as a C-FIND / QIDO-RS matching key, where '*' and '?' are wildcards and
    '\\' separates values, with no escape for either (PS3.4 C.2.2.2): 'AB*1' would pull every
    patient whose ID matches it. Such a value is refused, naming its line."""
    if bad := sorted({ch for ch in v if ch in "*?\\"}):
        raise ValueError(f"{where}: {column} {v!r} contains {' and '.join(repr(ch) for ch in bad)}, which DICOM "
                         "matching reads as a wildcard or value separator (it has no escape): other patients' "
                         "studies would match")


def cohort_problem(c: CsvList, base_dir: Path) -> str | None:
    """Why a cohort CSV cannot be used (missing, unreadable, not UTF-8, no such column, empty, a value with
    a wildcard), or None."""
    try:
        read_cohort(c, base_dir)
    except FileNotFoundError:
        return f"cohort file {cohort_path(c, base_dir)} does not exist"
    except UnicodeDecodeError as exc:
        return f"cohort file {cohort_path(c, base_dir)} is not UTF-8 text ({exc.reason} at byte {exc.start})"
    except OSError as exc:
        return f"cohort file {cohort_path(c, base_dir)} cannot be read: {exc.strerror or exc}"
    except ValueError as exc:
        return f"cohort file {exc}"
    return None


def load_pull_rule(raw: dict, file: str, index: int, line: int | None, sources: frozenset[str],
                   problems_of, base_dir: Path | None = None) -> tuple[PullRule | None, list[tuple[tuple, str]]]:
    """Validate one ``kind: pull`` entry; ``problems_of`` turns a ValidationError into (path, message)s.
    ``base_dir``: the rules directory, against which a cohort CSV is checked (None: rule text judged
    on its own, e.g. a proposed version, and the CSV is checked when it is loaded from the directory)."""
    problems: list[tuple[tuple, str]] = []
    spec = None
    try:
        spec = PullSpec.model_validate(raw)
    except ValidationError as exc:
        problems.extend(problems_of(exc, (), PULL_FIELDS))
    if spec is not None and spec.query.csv is not None and base_dir is not None:
        if (why := cohort_problem(spec.query.csv, base_dir)) is not None:
            problems.append((("query", "csv", "file"), why))
    if isinstance(raw.get("source"), str) and raw["source"] not in sources:
        known = ", ".join(sorted(sources)) or "none"
        problems.append((("source",), f"unknown source '{raw['source']}'; configured: {known}"))
    condition = None
    if isinstance(raw.get("series"), dict):
        condition, cond_problems = compile_condition(raw["series"], level="series", path=("series",))
        problems.extend(cond_problems)
    if problems or spec is None:
        return None, problems
    return PullRule(name=spec.name, description=spec.description, file=file, line=line, index=index,
                    enabled=spec.enabled, spec=spec, series_filter=condition), problems
