"""The active rule set, hot reload, validated changes, versions and revert.

How an edit in the rules directory is noticed: ``current()`` — which the spine calls for every
routing decision — rereads the rule files at most every ``check_interval`` seconds and compares
a SHA-256 of their names and contents with the last one seen. Why not modification times:
editors, ``cp -p``, ``git checkout`` and network file systems can leave a changed file with an
old or identical mtime, and two quick edits can share one timestamp; a content hash cannot be
fooled and costs microseconds for a few kilobytes of YAML. Why not inotify: it is not in the
standard library (it would need a new dependency or ctypes), it does not see edits on NFS/SMB
mounts, and a hash checked on demand needs no thread. The cost is a delay of at most
``check_interval`` seconds before an edit takes effect; ``reload()`` applies it at once.

A changed content is read twice, ``settle`` seconds apart, and taken only when both reads agree:
an editor that truncates a file and then writes it would otherwise let a reload catch the empty
file in between — a valid rule set that routes nothing.

An invalid edit is refused: the previous rule set stays active and the errors are kept for the
admin (``errors``). Changes made through ``apply_change`` are validated before anything is
written, then each file is replaced atomically (temporary file + rename). Every accepted rule
set, whichever way it came, is recorded as a version in ``history_dir``.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from node.audit import NULL_AUDIT, AuditTrail
from node.rules.errors import RuleError, RuleErrors
from node.rules.history import VersionInfo, VersionStore
from node.rules.loader import files_digest, is_rule_file_name, read_rule_files
from node.rules.ruleset import RuleSet

__all__ = ["RulesService", "ReloadResult"]

log = logging.getLogger(__name__)

DIRECTORY_AUTHOR = "rules directory"  # author of versions that came from editing the files by hand


@dataclass(frozen=True)
class ReloadResult:
    changed: bool  # a different rule set is active now
    version: int | None  # the version now active, when the reload accepted something
    errors: tuple[RuleError, ...]  # why the directory's content was refused (previous set still active)


class RulesService:
    def __init__(self, rules_dir: str | os.PathLike, history_dir: str | os.PathLike,
                 handlers: Callable[[str], type], destinations: Iterable[str], *,
                 check_interval: float = 2.0, settle: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, audit: AuditTrail = NULL_AUDIT,
                 sources: Iterable[str] = ()) -> None:
        self.audit = audit
        self.rules_dir = Path(rules_dir)
        self.rules_dir.mkdir(parents=True, exist_ok=True)  # no rules yet is a valid, empty rule set
        self.store = VersionStore(history_dir)
        self.handlers = handlers
        self.destinations = frozenset(destinations)
        self.sources = frozenset(sources)  # PACS sources pull rules may name
        self.check_interval = check_interval
        self.settle = settle
        self._clock = clock
        self._lock = threading.RLock()
        self._active = RuleSet([], {})
        self._errors: tuple[RuleError, ...] = ()
        self._seen_digest: str | None = None
        self._last_check = -math.inf
        self._start()

    # -- reading -----------------------------------------------------------------------------

    def current(self) -> RuleSet:
        """The active rule set, after picking up any edit older than ``check_interval`` seconds."""
        if self._clock() - self._last_check >= self.check_interval:
            self.reload()
        return self._active

    @property
    def errors(self) -> tuple[RuleError, ...]:
        """Problems of the rules directory's current content; empty when it is the active set."""
        return self._errors

    def history(self) -> list[VersionInfo]:
        return self.store.versions()

    def diff(self, version: int) -> str:
        return self.store.diff(version)

    def version_files(self, version: int) -> dict[str, str]:
        return self.store.files(version)

    # -- changing ----------------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Load the directory now if its content changed; an invalid content leaves the active set."""
        with self._lock:
            self._last_check = self._clock()
            try:
                files = read_rule_files(self.rules_dir)
            except RuleErrors as exc:
                self._errors = tuple(exc.errors)
                return ReloadResult(False, None, self._errors)
            digest = files_digest(files)
            if digest == self._seen_digest:
                return ReloadResult(False, None, self._errors)
            time.sleep(self.settle)
            try:
                if files_digest(read_rule_files(self.rules_dir)) != digest:
                    return ReloadResult(False, None, self._errors)  # still being written: next check
            except RuleErrors:
                return ReloadResult(False, None, self._errors)
            self._seen_digest = digest
            try:
                ruleset = self._validate(files)
            except RuleErrors as exc:
                self._errors = tuple(exc.errors)
                log.warning("rules directory edit refused, previous rules stay active:\n%s", exc.text())
                return ReloadResult(False, None, self._errors)
            changed = ruleset.digest != self._active.digest
            version = self._activate(ruleset, DIRECTORY_AUTHOR, "edited in the rules directory")
            return ReloadResult(changed, version, ())

    def propose(self, files: Mapping[str, str | None]) -> RuleSet:
        """The rule set a change would give, without writing anything (to simulate or test it)."""
        with self._lock:
            return self._validate(self._proposed(files))

    def validate(self, files: Mapping[str, str | None]) -> list[RuleError]:
        """Dry run of ``apply_change``: the problems the change would be refused for."""
        try:
            self.propose(files)
        except RuleErrors as exc:
            return exc.errors
        return []

    def apply_change(self, files: Mapping[str, str | None], author: str, message: str = "") -> int:
        """Add, replace (name -> text) or delete (name -> None) rule files; returns the version.

        The change is laid over the directory's current content and the whole set is validated
        before anything is written; ``RuleErrors`` if it is refused.
        """
        with self._lock:
            ruleset = self._validate(self._proposed(files))
            self._write(ruleset.files)
            return self._activate(ruleset, author, message or "changed " + ", ".join(sorted(files)))

    def revert(self, version: int, author: str) -> int:
        """Make the rules directory hold exactly the files of ``version`` again; returns the new version."""
        with self._lock:
            ruleset = self._validate(self.store.files(version))
            self._write(ruleset.files)
            return self._activate(ruleset, author, f"revert to version {version}")

    # -- internals ---------------------------------------------------------------------------

    def _start(self) -> None:
        self.reload()
        latest = self.store.latest()
        if not self._errors or latest is None:
            return
        try:  # the last accepted version stays in force across a restart
            self._active = self._validate(self.store.files(latest.version))
        except RuleErrors as exc:
            log.error("the last recorded rules version %d is no longer valid either:\n%s", latest.version, exc.text())

    def _validate(self, files: Mapping[str, str]) -> RuleSet:
        return RuleSet.from_files(files, handlers=self.handlers, destinations=self.destinations,
                                  sources=self.sources, base_dir=self.rules_dir)

    def _proposed(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        bad = [RuleError(name, None, None, "a rule file name is a plain name ending in .yaml or .yml, "
                                           "not starting with a dot")
               for name in changes if not isinstance(name, str) or not is_rule_file_name(name)]
        if bad:
            raise RuleErrors(bad)
        files = read_rule_files(self.rules_dir)
        for name, text in changes.items():
            if text is None:
                if name not in files:
                    raise RuleErrors([RuleError(name, None, None, "cannot delete: there is no such rule file")])
                del files[name]
            else:
                files[name] = text
        return files

    def _write(self, files: Mapping[str, str]) -> None:
        for path in self.rules_dir.iterdir():
            if is_rule_file_name(path.name) and path.name not in files:
                path.unlink()
        for name, text in files.items():
            path = self.rules_dir / name
            data = text.encode("utf-8")
            if path.is_file() and path.read_bytes() == data:
                continue
            tmp = self.rules_dir / f".{name}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def _activate(self, ruleset: RuleSet, author: str, message: str) -> int:
        self._active = ruleset
        self._seen_digest = ruleset.digest
        self._errors = ()
        latest = self.store.latest()
        if latest is not None and latest.digest == ruleset.digest:
            return latest.version
        info = self.store.record(ruleset.files, author, message)
        self.audit.rules_changed(author, message, before=latest and {"version": latest.version, "digest": latest.digest},
                                 after={"version": info.version, "digest": ruleset.digest})
        log.info("rules version %d active (%s: %s)", info.version, author, message)
        return info.version
