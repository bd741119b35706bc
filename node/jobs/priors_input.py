"""A job's priors (JobSpec.extra, filled by the executor from node/pacs/priors.py) as the typed
``PriorStudy`` list of HandlerInput: loaded series, acquisition datetime, most recent first."""
from __future__ import annotations

import datetime as dt
from typing import Callable

from node.handler_api import PriorStudy
from node.volume import SeriesData


def acquired(date: str, time_: str) -> dt.datetime | None:
    """StudyDate + StudyTime (time optional) as a datetime; None when the date is not a date."""
    try:
        d = dt.datetime.strptime((date or "")[:8], "%Y%m%d")
    except ValueError:
        return None
    t = (time_ or "").split(".")[0]
    try:
        return d.replace(hour=int(t[0:2]), minute=int(t[2:4] or 0), second=int(t[4:6] or 0)) if len(t) >= 2 else d
    except ValueError:
        return d


def _from_headers(s: SeriesData) -> dt.datetime | None:
    ds = s.first
    for dk, tk in (("StudyDate", "StudyTime"), ("AcquisitionDate", "AcquisitionTime"), ("SeriesDate", "SeriesTime")):
        got = acquired(str(ds.get(dk, "") or ""), str(ds.get(tk, "") or ""))
        if got is not None:
            return got
    return None


def load_priors(extra: dict, load: Callable[[list[str]], SeriesData]) -> list[PriorStudy]:
    """``load`` reads one series from its instance locators (the worker's load_series)."""
    out = []
    for p in extra.get("priors", []):
        series = [load(paths) for paths in p["series"].values()]
        when = acquired(p.get("study_date", ""), p.get("study_time", ""))
        if series and (when is None or not p.get("study_time")):
            when = _from_headers(series[0]) or when  # the index keeps the date; the header has the time
        out.append(PriorStudy(study_uid=p["study_uid"], acquired=when, series=series, source=p["source"]))
    return sorted(out, key=lambda p: p.acquired or dt.datetime.min, reverse=True)
