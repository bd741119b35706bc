"""Errors an admin reads: which file, which line, which field, and what is wrong, in words.

A rule set is never half-loaded: every problem found in every file is collected into one
``RuleErrors`` so an admin can fix them all in one edit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

__all__ = ["RuleError", "RuleErrors", "format_path"]


def format_path(path: Iterable[object]) -> str:
    """("match", "all", 2, "SliceThickness") -> "match.all[2].SliceThickness"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


@dataclass(frozen=True)
class RuleError:
    file: str  # file name inside the rules directory
    line: int | None  # 1-based; None when the problem is the file as a whole
    field: str | None  # dotted path inside the rule, e.g. "match.all[1].SliceThickness.le"
    message: str
    rule: str | None = None  # the rule's name when it is known

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "")
        what = []
        if self.rule:
            what.append(f"rule '{self.rule}'")
        if self.field:
            what.append(f"field '{self.field}'")
        return f"{where}: " + (", ".join(what) + ": " if what else "") + self.message

    def to_dict(self) -> dict:
        return asdict(self)


class RuleErrors(Exception):
    """The rule set was refused; ``errors`` lists every problem found."""

    def __init__(self, errors: Iterable[RuleError]) -> None:
        self.errors = list(errors)
        super().__init__(self.text())

    def text(self) -> str:
        n = len(self.errors)
        head = f"{n} problem{'s' if n != 1 else ''} in the rules:"
        return "\n".join([head, *("  " + str(e) for e in self.errors)])
