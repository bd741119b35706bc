"""Replay a proposed rule set over past series and report what would be routed differently.

Nothing runs: only the routing decisions of the two rule sets are compared, per series (series
rules) and per study (study rules). A job is identified by what it does, handler plus
parameters, so renaming a rule that does the same thing is not a change; forwarding the
originals counts as one more job per subject.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

from node.rules.facts import SeriesFacts, StudyFacts
from node.rules.rule import Action

__all__ = ["Change", "SimulationReport", "simulate"]

_FORWARD = ("forward originals",)


@dataclass(frozen=True)
class Change:
    kind: str  # "new", "lost" or "changed_destinations"
    level: str
    study_uid: str
    series_uid: str | None  # None for a study-level job
    subject: str
    job: str  # "ct-anatomy", "renders {"views": 4}" or "forward originals"
    old_destinations: tuple[str, ...]
    new_destinations: tuple[str, ...]
    old_rules: tuple[str, ...]
    new_rules: tuple[str, ...]

    def text(self, only: Mapping[str, Sequence[str]] | None = None) -> str:
        """One line; ``only``: the modalities each destination limited to some takes."""
        mark = {"new": "+ new ", "lost": "- lost", "changed_destinations": "~ dest"}[self.kind]
        if self.kind == "new":
            what = f"to {_names(self.new_destinations, only)}  [rule {', '.join(self.new_rules)}]"
        elif self.kind == "lost":
            what = f"was to {_names(self.old_destinations, only)}  [rule {', '.join(self.old_rules)}]"
        else:
            what = f"{_names(self.old_destinations, only)} -> {_names(self.new_destinations, only)}"
        return f"{mark}  {self.job} on {self.subject}: {what}"


@dataclass
class SimulationReport:
    studies: int = 0
    series: int = 0
    unchanged_jobs: int = 0
    changes: list[Change] = field(default_factory=list)

    @property
    def new_jobs(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "new"]

    @property
    def lost_jobs(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "lost"]

    @property
    def changed_destinations(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "changed_destinations"]

    def to_dict(self) -> dict:
        return {"studies": self.studies, "series": self.series, "unchanged_jobs": self.unchanged_jobs,
                "new_jobs": len(self.new_jobs), "lost_jobs": len(self.lost_jobs),
                "changed_destinations": len(self.changed_destinations),
                "changes": [asdict(c) for c in self.changes]}

    def text(self, only: Mapping[str, Sequence[str]] | None = None) -> str:
        head = (f"Simulated {self.studies} stud{'y' if self.studies == 1 else 'ies'} ({self.series} series): "
                f"{len(self.new_jobs)} new jobs, {len(self.lost_jobs)} lost jobs, "
                f"{len(self.changed_destinations)} with changed destinations, {self.unchanged_jobs} unchanged")
        return "\n".join([head, *("  " + c.text(only) for c in self.changes)]) + "\n"


def simulate(old, new, facts_iterable: Iterable[SeriesFacts | StudyFacts]) -> SimulationReport:
    """Compare the routing of ``old`` and ``new`` (RuleSets) over past series or whole studies."""
    report = SimulationReport()
    for study in _studies(facts_iterable):
        report.studies += 1
        for s in study.series:
            report.series += 1
            _compare(report, "series", study.study_uid, s.series_uid, s.label(),
                     old.match_series(s), new.match_series(s))
        _compare(report, "study", study.study_uid, None, study.label(), old.match_study(study), new.match_study(study))
    return report


def _studies(items: Iterable[SeriesFacts | StudyFacts]) -> list[StudyFacts]:
    grouped: dict[str, list[SeriesFacts]] = defaultdict(list)
    studies: list[StudyFacts] = []
    for item in items:
        if isinstance(item, StudyFacts):
            studies.append(item)
        else:
            grouped[item.study_uid].append(item)
    studies.extend(StudyFacts(series, uid) for uid, series in grouped.items())
    return studies


def _jobs(actions: list[Action]) -> dict[tuple, tuple[set[str], list[str]]]:
    jobs: dict[tuple, tuple[set[str], list[str]]] = {}
    for a in actions:
        keys = []
        if a.handler:
            keys.append((a.handler, json.dumps(a.params, sort_keys=True)))
        if a.forward_originals:
            keys.append(_FORWARD)
        for key in keys:
            dests, rules = jobs.setdefault(key, (set(), []))
            dests.update(a.destinations)
            rules.append(a.rule)
    return jobs


def _compare(report: SimulationReport, level: str, study_uid: str, series_uid: str | None, subject: str,
             old_actions: list[Action], new_actions: list[Action]) -> None:
    old, new = _jobs(old_actions), _jobs(new_actions)
    for key in sorted(old.keys() | new.keys()):
        o, n = old.get(key), new.get(key)
        if o is not None and n is not None and o[0] == n[0]:
            report.unchanged_jobs += 1
            continue
        kind = "new" if o is None else "lost" if n is None else "changed_destinations"
        report.changes.append(Change(
            kind=kind, level=level, study_uid=study_uid, series_uid=series_uid, subject=subject,
            job=_job_name(key), old_destinations=tuple(sorted(o[0])) if o else (),
            new_destinations=tuple(sorted(n[0])) if n else (), old_rules=tuple(o[1]) if o else (),
            new_rules=tuple(n[1]) if n else ()))


def _job_name(key: tuple) -> str:
    if key == _FORWARD:
        return key[0]
    handler, params = key
    return handler if params == "{}" else f"{handler} {params}"


def _names(dests: tuple[str, ...], only: Mapping[str, Sequence[str]] | None = None) -> str:
    only = only or {}
    named = (f"{d} ({', '.join(only[d])} only)" if only.get(d) else d for d in dests)
    return ", ".join(named) if dests else "(kept on the node)"
