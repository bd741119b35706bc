"""The model registry: versions of each model, with states, under ``<data_dir>/models/``.

A *version* is an immutable folder ``<data_dir>/models/<name>/<version>/`` holding what it takes to
run it and to trace it: ``model.onnx``, ``card.yaml``, and, when training wrote them,
``metrics.json`` (validation Dice, curves, the training data list) and ``train.yaml`` (the
configuration), plus ``version.json`` (SHA-256 of the ONNX file, the code version, who registered it
and when). Folders are written once and never changed, so a job that started on a version finishes
on exactly that version whatever is promoted meanwhile.

States, kept per model in ``states.json`` (written atomically under a lock, since the CLI may change
them beside a running node):

- ``candidate``: registered, runs nowhere;
- ``shadow``: runs next to the active version on the same inputs, results kept on the node;
- ``active``: what a rule naming ``model:<name>`` runs (at most one);
- ``retired``: kept for the record, runs nowhere.

The shipped ``models/<name>/`` folder is the version-less default, the implicit version
``built-in``: it is active whenever no registered version is (else ``standby``). Promoting
``built-in`` retires the active registered version (a roll-back). Jobs resolve the version when a worker takes them
(``resolve``), so a promotion reaches the next job without a restart.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from node import __version__
from node.models.card import CARD_FILE, CardError, load_card
from node.models.digest import file_sha256
from node.models.inference import load_model

__all__ = ["BUILT_IN", "STATES", "ModelRegistry", "RegistryError", "Resolved", "VersionInfo", "code_version",
           "job_model", "param_models", "change_state", "registry_handlers"]

BUILT_IN = "built-in"
STATES = ("candidate", "shadow", "active", "retired")
# What the state changes are called on the command line and in the API.
ACTIONS = {"promote": "active", "shadow": "shadow", "retire": "retired"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,47}$")
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,15}$")
STATE_FILE = "states.json"
INFO_FILE = "version.json"
AGREEMENT_FILE = "shadow-agreement.jsonl"
# Files a version folder may carry besides the card and the model file.
TRACE_FILES = ("metrics.json", "train.yaml")


class RegistryError(ValueError):
    """A registry request that cannot be honoured; the message says why."""


@dataclass(frozen=True)
class Resolved:
    """The version a job runs: its folder (card + ONNX) and its exact version string."""

    name: str
    version: str  # "built-in" or a registered version
    folder: Path
    state: str


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    state: str
    folder: Path
    card_version: str
    registered_at: float | None
    registered_by: str | None
    sha256: str | None
    code_version: str | None
    validation: dict | None  # the card's validation block (per-label Dice) when training measured it
    training_cases: list[str]

    def view(self) -> dict:
        return {"name": self.name, "version": self.version, "state": self.state, "card_version": self.card_version,
                "registered_at": self.registered_at, "registered_by": self.registered_by, "sha256": self.sha256,
                "code_version": self.code_version, "validation": self.validation,
                "training_cases": self.training_cases}


def code_version() -> str:
    """Hilum's version and, in a git checkout, the commit (what produced or registered a model)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def _write_json(path: Path, data) -> None:
    """Atomically (temporary file + rename), so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_sr_findings(card) -> None:
    """A version that emits SR must have its structures in the SR template (``sr_templates/model.yaml``),
    as the node checks the shipped models at start-up: otherwise its jobs would fail at encoding."""
    if "SR" not in card.emit:
        return
    from node.encoders.sr_templates import validate_all
    from node.models.handler import SR_TEMPLATE

    template = validate_all().get(SR_TEMPLATE)
    missing = sorted({lab.finding_key for lab in card.labels} - set(template.findings if template else ()))
    if missing:
        raise RegistryError(f"labels: the SR template {SR_TEMPLATE!r} has no findings {missing}: add them to "
                            f"sr_templates/{SR_TEMPLATE}.yaml or emit no SR")


class ModelRegistry:
    """Versions and states of the models under ``root`` (``<data_dir>/models``); ``builtin_dir`` holds
    the shipped, version-less models (``models/``)."""

    def __init__(self, root: str | Path, builtin_dir: str | Path | None = None) -> None:
        from node.models.registry import DEFAULT_MODELS_DIR  # the shipped models' folder

        self.root = Path(root)
        self.builtin_dir = Path(builtin_dir or DEFAULT_MODELS_DIR)

    @classmethod
    def for_data_dir(cls, data_dir: str | Path, builtin_dir: str | Path | None = None) -> "ModelRegistry":
        return cls(Path(data_dir) / "models", builtin_dir)

    # -- reading --------------------------------------------------------------------------
    def _check_name(self, name: str) -> str:
        name = name.removeprefix("model:")
        if not _NAME_RE.match(name):
            raise RegistryError(f"{name!r} is not a model name (lower-case letters, digits, '.', '_', '-')")
        return name

    def _states(self, name: str) -> dict[str, dict]:
        path = self.root / name / STATE_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}

    def builtin_folder(self, name: str) -> Path | None:
        folder = self.builtin_dir / name
        return folder if (folder / CARD_FILE).is_file() else None

    def names(self) -> list[str]:
        """Every model with a built-in folder or a registered version."""
        found = set()
        for root in (self.builtin_dir, self.root):
            if root.is_dir():
                found |= {d.name for d in root.iterdir() if d.is_dir() and _NAME_RE.match(d.name) and
                          ((d / CARD_FILE).is_file() or (d / STATE_FILE).is_file())}
        return sorted(found)

    def versions(self, name: str) -> list[VersionInfo]:
        """The built-in version (if shipped) and every registered one, oldest first."""
        name = self._check_name(name)
        states = self._states(name)
        active = any(s["state"] == "active" for s in states.values())
        out = []
        builtin = self.builtin_folder(name)
        if builtin is not None:
            out.append(self._info(name, BUILT_IN, "standby" if active else "active", builtin, {}))
        for version, entry in sorted(states.items(), key=lambda kv: kv[1].get("registered_at", 0)):
            out.append(self._info(name, version, entry["state"], self.root / name / version, entry))
        return out

    def _info(self, name: str, version: str, state: str, folder: Path, entry: dict) -> VersionInfo:
        try:
            card = load_card(folder)
            card_version, validation = card.version, (card.validation.model_dump() if card.validation else None)
        except CardError:
            card_version, validation = "?", None
        extra = {}
        if (folder / INFO_FILE).is_file():
            extra = json.loads((folder / INFO_FILE).read_text())
        cases: list[str] = []
        if (folder / "metrics.json").is_file():
            cases = list(json.loads((folder / "metrics.json").read_text()).get("training", {}).get("train_cases", []))
        return VersionInfo(name, version, state, folder, card_version, extra.get("registered_at"),
                           extra.get("registered_by"), extra.get("sha256"), extra.get("code_version"), validation,
                           cases)

    def version(self, name: str, version: str) -> VersionInfo:
        for info in self.versions(name):
            if info.version == version:
                return info
        known = ", ".join(i.version for i in self.versions(name)) or "none"
        raise RegistryError(f"model {name!r} has no version {version!r} (known: {known})")

    def resolve(self, name: str) -> Resolved:
        """The version a new job of ``model:<name>`` runs: the active registered one, else the built-in.

        KeyError when the model is unknown or nothing is active (every version retired, none shipped).
        """
        name = self._check_name(name)
        for version, entry in self._states(name).items():
            if entry["state"] == "active":
                return Resolved(name, version, self.root / name / version, "active")
        builtin = self.builtin_folder(name)
        if builtin is None:
            known = ", ".join(self.names()) or "none"
            raise KeyError(f"model {name!r} has no active version (known models: {known}); "
                           f"promote one with `hilum model promote {name} VERSION`")
        return Resolved(name, BUILT_IN, builtin, "active")

    def pinned(self, name: str, version: str) -> Resolved:
        """A named version whatever its state (a shadow job runs the version it was created for)."""
        name = self._check_name(name)
        if version == BUILT_IN:
            folder = self.builtin_folder(name)
            if folder is None:
                raise KeyError(f"model {name!r} has no built-in version")
            return Resolved(name, BUILT_IN, folder, "active")
        entry = self._states(name).get(version)
        if entry is None:
            raise KeyError(f"model {name!r} has no version {version!r}")
        return Resolved(name, version, self.root / name / version, entry["state"])

    def shadows(self, name: str) -> list[str]:
        """Versions in shadow mode for ``model:<name>`` (each gets a second job per matching rule)."""
        try:
            name = self._check_name(name)
        except RegistryError:
            return []
        return sorted(v for v, e in self._states(name).items() if e["state"] == "shadow")

    # -- writing --------------------------------------------------------------------------
    @contextmanager
    def _locked(self, name: str) -> Iterator[dict[str, dict]]:
        """The model's states under an exclusive lock; written back atomically on success."""
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            states = self._states(name)
            yield states
            _write_json(d / STATE_FILE, states)

    def register(self, folder: str | Path, by: str, version: str | None = None,
                 trace: dict | None = None) -> VersionInfo:
        """Copy a model folder (a training run's output) in as a ``candidate`` version.

        The version is the card's ``version`` unless given; it must be new for this model. ``trace``
        (e.g. the label versions it was trained on) is kept in ``version.json``.
        """
        src = Path(folder)
        card = load_card(src)  # CardError names the file and field
        name = self._check_name(card.name)
        version = version or card.version
        if not _VERSION_RE.match(version) or version == BUILT_IN:
            raise RegistryError(f"version {version!r}: use 1-16 letters, digits, '.', '+', '_', '-' "
                                f"(and not {BUILT_IN!r})")
        builtin = self.builtin_folder(name)
        if builtin is not None and version == load_card(builtin).version:
            raise RegistryError(f"version {version!r} is the built-in model's version; give the new one its own")
        metrics = json.loads((src / "metrics.json").read_text()) if (src / "metrics.json").is_file() else {}
        with self._locked(name) as states:
            dest = self.root / name / version
            if version in states or dest.exists():
                raise RegistryError(f"model {name!r} already has a version {version!r}; versions never change")
            tmp = Path(tempfile.mkdtemp(dir=self.root / name, prefix=f".{version}."))
            try:
                mc_graph = (card.mc_dropout.model_file,) if card.mc_dropout else ()
                for f in (CARD_FILE, card.model_file, *mc_graph, *TRACE_FILES):
                    if (src / f).is_file():
                        shutil.copy2(src / f, tmp / f)
                now = time.time()
                info = {"registered_at": now, "registered_by": by, "sha256": file_sha256(tmp / card.model_file),
                        "code_version": metrics.get("code_version") or code_version(), "source": str(src.resolve()),
                        **(trace or {})}
                _write_json(tmp / INFO_FILE, info)
                load_model(tmp, load_card(tmp), "cpu")  # a valid card whose ONNX model loads and fits it
                _check_sr_findings(card)
                os.replace(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            states[version] = {"state": "candidate", "registered_at": now,
                               "history": [{"at": now, "by": by, "state": "candidate"}]}
        return self.version(name, version)

    def set_state(self, name: str, version: str, action: str, by: str) -> tuple[str, str, list[str]]:
        """Apply ``promote`` / ``shadow`` / ``retire``; returns (before, after, versions retired by a promotion).

        Promoting retires the previously active registered version; promoting ``built-in`` retires
        the active registered version (roll back to the shipped model).
        """
        name = self._check_name(name)
        if action not in ACTIONS:
            raise RegistryError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
        target = ACTIONS[action]
        with self._locked(name) as states:
            now = time.time()
            active = [v for v, e in states.items() if e["state"] == "active"]
            if version == BUILT_IN:
                if self.builtin_folder(name) is None:
                    raise RegistryError(f"model {name!r} has no built-in version")
                if target != "active":
                    raise RegistryError(f"the built-in version can only be promoted (it is the default whenever "
                                        f"no registered version is active)")
                for v in active:
                    self._move(states[v], "retired", now, by, f"{BUILT_IN} promoted")
                return ("standby" if active else "active"), "active", active
            if version not in states:
                known = ", ".join(states) or "none"
                raise RegistryError(f"model {name!r} has no registered version {version!r} (registered: {known})")
            before = states[version]["state"]
            if before == target:
                return before, target, []
            if before == "active" and self.builtin_folder(name) is None:
                raise RegistryError(f"{name} {version} is the active version and no built-in model stands behind "
                                    f"it: promote another version first")
            others = []
            if target == "active":
                for v in active:
                    self._move(states[v], "retired", now, by, f"{version} promoted")
                    others.append(v)
            self._move(states[version], target, now, by, action)
            return before, target, others

    @staticmethod
    def _move(entry: dict, state: str, now: float, by: str, why: str) -> None:
        entry["state"] = state
        entry.setdefault("history", []).append({"at": now, "by": by, "state": state, "why": why})

    # -- shadow agreement -----------------------------------------------------------------
    def add_agreement(self, name: str, record: dict) -> bool:
        """Append one shadow-vs-active comparison (once per shadow job); False if already recorded."""
        name = self._check_name(name)
        path = self.root / name / AGREEMENT_FILE
        with self._locked(name):
            if any(r.get("shadow_job") == record.get("shadow_job") for r in self.agreements(name)):
                return False
            with open(path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return True

    def agreements(self, name: str, version: str | None = None) -> list[dict]:
        path = self.root / self._check_name(name) / AGREEMENT_FILE
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []
        return [r for r in rows if version is None or r.get("shadow_version") == version]


def job_model(registry: ModelRegistry, handler: str, options: dict) -> Resolved | None:
    """The version a job of ``handler`` runs now: pinned in its options (shadow jobs), else the active one.

    None for handlers that are not models; KeyError when the model has no runnable version.
    """
    if not handler.startswith("model:"):
        return None
    pinned = options.get("model_version")
    return registry.pinned(handler, pinned) if pinned else registry.resolve(handler)


def param_models(registry: ModelRegistry, handler: str, params: dict) -> dict[str, Resolved]:
    """The versions the models named by a job's params run now (``Handler.model_params``, e.g.
    lung-nodules' ``detector``): the active one of each, like ``model:`` jobs; KeyError when one has none."""
    if handler.startswith("model:"):
        return {}
    from node.handler_api import get_handler

    cls = get_handler(handler)
    return {p: registry.resolve(params[p]) for p in sorted(cls.model_params) if params.get(p)}


def change_state(registry: ModelRegistry, audit, name: str, version: str, action: str, by: str) -> dict:
    """An admin's ``promote`` / ``shadow`` / ``retire`` of a version, audited; the CLI and the API share it."""
    before, after, others = registry.set_state(name, version, action, by)
    name = name.removeprefix("model:")
    if before != after:
        audit.model_changed(by, name, version, before=before, after=after, detail={"action": action})
        for other in others:
            audit.model_changed(by, name, other, before="active", after="retired",
                                detail={"action": f"retired by the promotion of {version}"})
    return {"model": name, "version": version, "before": before, "after": after, "retired": others,
            "active": registry.resolve(name).version if after == "active" or before == "active" else None}


def registry_handlers(registry: ModelRegistry):
    """``get_handler`` for a node with a registry: ``model:<name>`` is the active version's handler, so a
    rule may name a model that exists only as registered versions (none shipped)."""
    from node.handler_api import get_handler
    from node.models.registry import handler_at

    def lookup(name: str):
        if not name.startswith("model:"):
            return get_handler(name)
        resolved = registry.resolve(name)  # KeyError naming the model when nothing is active
        return handler_at(resolved.folder, None if resolved.version == BUILT_IN else resolved.version)

    return lookup
