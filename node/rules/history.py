"""Versions of the rule set, stored as plain files an admin can read without the node.

``history_dir/000042/`` holds ``meta.json`` (version, author, UTC time, message, digest, file
names), ``files/`` (the full content of every rule file) and ``diff.patch`` (unified diff
against the previous version). A version directory is written under a temporary name and
renamed into place, so a crash never leaves a half-written version.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from node.rules.loader import files_digest

__all__ = ["VersionInfo", "VersionStore", "unified_diff"]

_VERSION_DIR = re.compile(r"^\d{6}$")


@dataclass(frozen=True)
class VersionInfo:
    version: int
    author: str
    time: str  # ISO 8601, UTC
    message: str
    digest: str
    files: tuple[str, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = list(self.files)
        return d


def unified_diff(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    out: list[str] = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        lines = difflib.unified_diff(
            _lines(a), _lines(b), fromfile=f"a/{name}" if a is not None else "/dev/null",
            tofile=f"b/{name}" if b is not None else "/dev/null")
        out.extend(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)
    return "".join(out)


def _lines(text: str | None) -> list[str]:
    return [] if text is None else text.splitlines(keepends=True)


class VersionStore:
    def __init__(self, history_dir: str | os.PathLike) -> None:
        self.root = Path(history_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[VersionInfo]:
        out = []
        for d in sorted(self.root.iterdir()):
            if _VERSION_DIR.match(d.name) and (d / "meta.json").is_file():
                meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
                out.append(VersionInfo(meta["version"], meta["author"], meta["time"], meta["message"],
                                       meta["digest"], tuple(meta["files"])))
        return out

    def latest(self) -> VersionInfo | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def _dir(self, version: int) -> Path:
        d = self.root / f"{version:06d}"
        if not (d / "meta.json").is_file():
            raise KeyError(f"no rules version {version}")
        return d

    def files(self, version: int) -> dict[str, str]:
        d = self._dir(version) / "files"
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(d.iterdir()) if p.is_file()}

    def diff(self, version: int) -> str:
        return (self._dir(version) / "diff.patch").read_text(encoding="utf-8")

    def record(self, files: Mapping[str, str], author: str, message: str = "") -> VersionInfo:
        """Store ``files`` as the next version, with its diff against the latest one."""
        prev = self.latest()
        old = self.files(prev.version) if prev else {}
        info = VersionInfo(
            version=(prev.version + 1) if prev else 1, author=author,
            time=datetime.now(timezone.utc).isoformat(timespec="seconds"), message=message,
            digest=files_digest(files), files=tuple(sorted(files)))
        tmp = self.root / f".tmp-{info.version:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "files").mkdir(parents=True)
        for name, text in files.items():
            (tmp / "files" / name).write_text(text, encoding="utf-8")
        (tmp / "diff.patch").write_text(unified_diff(old, files), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(info.to_dict(), indent=2), encoding="utf-8")
        os.rename(tmp, self.root / f"{info.version:06d}")  # fails if that version appeared meanwhile
        return info
