"""Projects on disk: ``<data_dir>/projects/<name>/`` holds ``project.yaml`` (what the project is),
``train.yaml`` (its training configuration, copied at creation) and ``cases.json`` (each case's
state and label history, written atomically under a lock: the CLI and the node both write it).

A project names the model it trains (``model:<name>``, whose versions the registry keeps), its
task labels (those of the training configuration, with their codes and the names they may have in
a SEG), its cases (studies in the archive: a list, and/or ``select``, a study-level condition in the
rules' language that makes every arriving study it matches a case), who may annotate it and who may
view it. Case states:

    unlabeled → predicted → in_review → labeled

``predicted``: a model version segmented it (the job and its uncertainty are kept);
``in_review``: an annotator saved a SEG for it (a label version: who, when, from which prediction);
``labeled``: the label was accepted as final. A new SEG for a case adds a version; earlier ones are
kept, and the case goes back to ``in_review`` (the same SEG stored again is no new version).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.models.card import CardError, format_validation_error, load_card
from node.models.train_config import TrainConfig, TrainLabel, load_train_config
from node.rules.conditions import Condition, compile_condition
from node.rules.errors import format_path

__all__ = ["CASE_STATES", "Project", "ProjectError", "ProjectStore"]

CASE_STATES = ("unlabeled", "predicted", "in_review", "labeled")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,47}$")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
EXISTING = " (in the node before the project was created)"  # how a retroactively selected case's history says so


class ProjectError(ValueError):
    """A project request that cannot be honoured; the message names the field or says why."""


class Project(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    model: str  # the model (registry name) the project trains and predicts with
    labels: list[TrainLabel] = Field(min_length=1)  # from the training configuration
    study_uids: list[str] = []  # the cases it starts with
    # a study-level rule condition (docs/rules.md): each study that completes and matches becomes a case
    select: dict | None = None
    annotators: list[str] = []  # users who may save labels and accept them (admins always may)
    # users who may see the project (its annotators and admins always may); None: every signed-in user
    viewers: list[str] | None = None
    created_at: float
    created_by: str

    @field_validator("name", "model")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r}: use 1-48 lower-case letters, digits, '.', '_' or '-'")
        return v

    @field_validator("study_uids")
    @classmethod
    def _uids(cls, v: list[str]) -> list[str]:
        bad = [u for u in v if len(u) > 64 or not _UID.match(u)]
        if bad:
            raise ValueError(f"{bad} are not DICOM UIDs")
        if len(set(v)) != len(v):
            raise ValueError("a study is listed twice")
        return v

    @field_validator("select")
    @classmethod
    def _select(cls, v: dict | None) -> dict | None:
        if v is not None:
            _, problems = compile_condition(v, level="study", path=("select",))
            if problems:
                raise ValueError("; ".join(f"{format_path(path)}: {msg}" for path, msg in problems))
        return v

    @model_validator(mode="after")
    def _some_cases(self) -> "Project":
        if not self.study_uids and self.select is None:
            raise ValueError("study_uids: give the project's studies, a select condition, or both")
        return self

    def condition(self) -> Condition | None:
        return None if self.select is None else compile_condition(self.select, level="study", path=("select",))[0]

    def may_annotate(self, user: str, role: str) -> bool:
        return role == "admin" or (role in ("admin", "annotator") and user in self.annotators)

    def may_view(self, user: str, role: str) -> bool:
        return self.may_annotate(user, role) or self.viewers is None or user in self.viewers

    def why_not(self, user: str, role: str, what: str) -> str:
        """The reason a user is refused ``what`` ("annotate", "view"), for the 403 and the audit trail."""
        if what == "annotate" and role not in ("admin", "annotator"):
            return f"{role} {user} may not annotate: the {role} role never annotates (project {self.name!r})"
        return f"{role} {user} is not {'an annotator' if what == 'annotate' else 'a viewer'} of project {self.name!r}"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ProjectStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_data_dir(cls, data_dir: str | Path) -> "ProjectStore":
        return cls(Path(data_dir) / "projects")

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if (d / "project.yaml").is_file())

    def get(self, name: str) -> Project:
        path = self.root / name / "project.yaml"
        if not _NAME.match(name) or not path.is_file():
            raise KeyError(f"no project named {name!r} (known: {', '.join(self.names()) or 'none'})")
        return Project.model_validate(yaml.safe_load(path.read_text()))

    def train_config(self, name: str) -> TrainConfig:
        return load_train_config(self.root / name / "train.yaml")

    def create(self, name: str, *, model_card: Path, train_config: Path, study_uids: list[str],
               annotators: list[str], by: str, select: dict | None = None,
               viewers: list[str] | None = None, existing: Iterable = ()) -> Project:
        """A new project from a model card (the model it trains) and a training configuration (its labels).

        ``existing``: the ``StudyFacts`` of the studies already complete in the node; those matching
        ``select`` become cases now (the router adds the ones completing later), so a condition means
        the same whether a study came before or after the project.
        """
        try:
            card = load_card(model_card)
        except CardError as exc:
            raise ProjectError(f"--model-card: {exc}") from None
        try:
            cfg = load_train_config(train_config)
        except CardError as exc:
            raise ProjectError(f"--train-config: {exc}") from None
        if cfg.name != card.name:
            raise ProjectError(f"--train-config: name {cfg.name!r} differs from the model card's {card.name!r}")
        card_labels = {(lab.value, lab.name) for lab in card.labels}
        if {(lab.value, lab.name) for lab in cfg.labels} != card_labels:
            raise ProjectError("--train-config: labels differ from the model card's (value and name of each)")
        try:
            project = Project(name=name, model=card.name, labels=cfg.labels, study_uids=study_uids, select=select,
                              annotators=annotators, viewers=viewers, created_at=time.time(), created_by=by)
        except ValidationError as exc:
            raise ProjectError(format_validation_error(exc)) from None
        folder = self.root / name
        if folder.exists():
            raise ProjectError(f"a project named {name!r} exists already")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{name}."))
        try:
            shutil.copy2(train_config, tmp / "train.yaml")
            (tmp / "project.yaml").write_text(yaml.safe_dump(project.model_dump(mode="json"), sort_keys=False))
            cases = {uid: {"state": "unlabeled", "labels": [], "prediction": None, "history": []}
                     for uid in study_uids}
            (tmp / "cases.json").write_text(json.dumps(cases, indent=1))
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        condition = project.condition()
        if condition is not None:
            for facts in existing:
                self._select_case(name, condition, facts, EXISTING)
        return project

    # -- cases ----------------------------------------------------------------------------
    def cases(self, name: str) -> dict[str, dict]:
        self.get(name)
        return json.loads((self.root / name / "cases.json").read_text())

    @contextmanager
    def _cases_locked(self, name: str) -> Iterator[dict[str, dict]]:
        self.get(name)
        with open(self.root / name / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cases = json.loads((self.root / name / "cases.json").read_text())
            yield cases
            _write_atomic(self.root / name / "cases.json", json.dumps(cases, indent=1))

    def has_case(self, name: str, study_uid: str) -> bool:
        """Whether the study is a case: listed at creation, or selected since by the project's condition."""
        return study_uid in self.cases(name)

    def select_study(self, facts) -> list[str]:
        """A study completed: it becomes a case of every project whose ``select`` condition it matches
        (``facts``: its ``node.rules.facts.StudyFacts``). Returns those projects."""
        added = []
        for name in self.names():
            condition = self.get(name).condition()
            if condition is not None and self._select_case(name, condition, facts, ""):
                added.append(name)
        return added

    def _select_case(self, name: str, condition: Condition, facts, when: str) -> bool:
        """The study becomes a case of project ``name`` if it matches and is not one yet; whether it did."""
        if not condition.test(facts):
            return False
        with self._cases_locked(name) as cases:
            if facts.study_uid in cases:
                return False
            cases[facts.study_uid] = {"state": "unlabeled", "labels": [], "prediction": None, "history": [],
                                      "selected_by": condition.evidence(facts)[:500]}
            cases[facts.study_uid]["history"].append(
                {"at": time.time(), "by": "select", "from": None, "to": "unlabeled",
                 "why": f"matched the project's condition: {condition.describe()}{when}"[:500]})
        return True

    def _case(self, cases: dict, name: str, study_uid: str) -> dict:
        if study_uid not in cases:
            raise ProjectError(f"study {study_uid} is not a case of project {name!r}")
        return cases[study_uid]

    def record_prediction(self, name: str, study_uid: str, *, job_id: int, model_version: str,
                          seg_sop_uid: str | None, uncertainty: dict | None) -> None:
        """A model version segmented the case: unlabeled → predicted (a labeled case keeps its state)."""
        with self._cases_locked(name) as cases:
            case = self._case(cases, name, study_uid)
            case["prediction"] = {"job": job_id, "model_version": model_version, "seg_sop_uid": seg_sop_uid,
                                  "uncertainty": uncertainty, "at": time.time()}
            if case["state"] == "unlabeled":
                self._move(case, "predicted", f"model {model_version}", f"predicted by job {job_id}")

    def add_label(self, name: str, study_uid: str, *, sop_uid: str, series_uid: str, segments: dict[str, int],
                  by: str) -> dict:
        """A SEG accepted as this case's label: a new version (earlier ones kept), state in_review.

        The same SEG again (its SOP Instance UID is a version already: a client's retry, OHIF saving twice)
        is that version, not a new one: the case keeps its state (an accepted label stays accepted).
        """
        with self._cases_locked(name) as cases:
            case = self._case(cases, name, study_uid)
            known = next((lab for lab in case["labels"] if lab["sop_uid"] == sop_uid), None)
            if known is not None:
                return known
            pred = case.get("prediction") or {}
            version = {"version": len(case["labels"]) + 1, "sop_uid": sop_uid, "series_uid": series_uid,
                       "segments": segments, "by": by, "at": time.time(),
                       "from_prediction": ({"job": pred.get("job"), "model_version": pred.get("model_version"),
                                            "seg_sop_uid": pred.get("seg_sop_uid")} if pred else None)}
            case["labels"].append(version)
            self._move(case, "in_review", by, f"label version {version['version']} saved")
            return version

    def accept(self, name: str, study_uid: str, by: str) -> dict:
        """The latest label version is final: in_review → labeled."""
        with self._cases_locked(name) as cases:
            case = self._case(cases, name, study_uid)
            if case["state"] != "in_review":
                raise ProjectError(f"case {study_uid} is {case['state']}, not in_review: nothing to accept")
            self._move(case, "labeled", by, f"label version {case['labels'][-1]['version']} accepted")
            return case

    @staticmethod
    def _move(case: dict, state: str, by: str, why: str) -> None:
        case["history"].append({"at": time.time(), "by": by, "from": case["state"], "to": state, "why": why})
        case["state"] = state

    def summary(self, name: str) -> dict:
        project = self.get(name)
        cases = self.cases(name)
        counts = {s: 0 for s in CASE_STATES}
        for c in cases.values():
            counts[c["state"]] += 1
        return {"project": project.model_dump(mode="json", exclude={"labels"}),
                "labels": [{"value": lab.value, "name": lab.name, "source": lab.source} for lab in project.labels],
                "counts": counts, "cases": cases}
