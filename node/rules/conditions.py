"""The condition language: plain data compiled once into small evaluator objects (never eval).

A condition is a mapping. Its keys are combinators (``all``, ``any``, ``not``, and at study level
``any_series`` / ``all_series``) or attribute names; several keys in one mapping must all hold.
An attribute's value is an operator mapping (``{le: 2.5}``, ``{contains: LOCALIZER, all: true}``),
a list (shorthand for ``in``) or a single value (shorthand for ``equals``).

Evaluation never raises: a missing attribute makes every operator false except ``missing``
(docs/rules.md has the full table). Each node can also say why it failed (``failure``) or
which values made it hold (``evidence``), which ``explain`` shows to the admin.
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Callable

import regex
from pydicom.datadict import get_entry

from node.rules.attributes import AttrRef, resolve_attribute
from node.rules.errors import format_path
from node.rules.facts import format_value, parse_time_of_day, to_number

__all__ = ["Condition", "Failure", "compile_condition", "OPERATORS", "REGEX_MAX_PATTERN",
           "REGEX_MAX_INPUT", "REGEX_TIMEOUT_S"]

log = logging.getLogger(__name__)

OPERATORS = ("equals", "in", "contains", "matches", "lt", "le", "gt", "ge", "between", "exists", "missing")
_OPTIONS = ("exact", "all")
REGEX_MAX_PATTERN = 512  # characters
REGEX_MAX_INPUT = 4096  # characters; a longer value never matches
REGEX_TIMEOUT_S = 0.02  # per value; a pattern that backtracks longer counts as no match
_MAX_SERIES_SHOWN = 5
_SYMBOL = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
}


@dataclass(frozen=True)
class Failure:
    """Why a condition did not hold: where it is, what it asks and what the value actually was."""

    path: str
    condition: str
    actual: str

    def __str__(self) -> str:
        return f"{self.condition} -- actual: {self.actual}"


class Condition(ABC):
    __slots__ = ("path",)

    def __init__(self, path: tuple) -> None:
        self.path = path

    @abstractmethod
    def test(self, facts) -> bool:
        """Whether the condition holds for these facts (series or study)."""

    @abstractmethod
    def describe(self) -> str:
        """The condition in words."""

    @abstractmethod
    def failure(self, facts) -> Failure:
        """Why it does not hold (call only when ``test`` is false)."""

    @abstractmethod
    def evidence(self, facts) -> str:
        """The values that make it hold (call only when ``test`` is true)."""


class Always(Condition):
    __slots__ = ()

    def test(self, facts) -> bool:
        return True

    def describe(self) -> str:
        return "always"

    def failure(self, facts) -> Failure:
        return Failure(format_path(self.path), "always", "")

    def evidence(self, facts) -> str:
        return "(no condition)"


def _show(v: Any) -> str:
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return format_value(v)


def _actual(ref: AttrRef, vals: tuple) -> str:
    if not vals:
        return f"{ref.name} is missing"
    return f"{ref.name} = " + "\\".join(format_value(v) for v in vals)


def _apply(vals: tuple, pred: Callable[[Any], bool], every: bool) -> bool:
    """Missing (no values) is false; otherwise any value, or with ``all: true`` every value."""
    if not vals:
        return False
    if every:
        for v in vals:
            if not pred(v):
                return False
        return True
    for v in vals:
        if pred(v):
            return True
    return False


class Leaf(Condition):
    """One operator on one attribute; ``pred`` tests a single value."""

    __slots__ = ("ref", "text", "pred", "every")

    def __init__(self, path: tuple, ref: AttrRef, text: str, pred: Callable[[Any], bool], every: bool) -> None:
        super().__init__(path)
        self.ref, self.text, self.pred, self.every = ref, text, pred, every

    def test(self, facts) -> bool:
        return _apply(facts.values(self.ref), self.pred, self.every)

    def describe(self) -> str:
        return self.text

    def failure(self, facts) -> Failure:
        return Failure(format_path(self.path), self.text, _actual(self.ref, facts.values(self.ref)))

    def evidence(self, facts) -> str:
        return _actual(self.ref, facts.values(self.ref))


class Contains(Leaf):
    """``contains``: an element of a multi-valued attribute, else a substring of the text."""

    __slots__ = ("element", "substring")

    def __init__(self, path, ref, text, element, substring, every) -> None:
        pred = element if ref.multi else substring
        super().__init__(path, ref, text, pred, every)
        self.element, self.substring = element, substring

    def test(self, facts) -> bool:
        if self.ref.multi is not None:
            return _apply(facts.values(self.ref), self.pred, self.every)
        vals = facts.values(self.ref)  # private tag: no dictionary entry, so count the values
        return _apply(vals, self.element if len(vals) > 1 else self.substring, self.every)


class Presence(Condition):
    __slots__ = ("ref", "want")

    def __init__(self, path: tuple, ref: AttrRef, want: bool) -> None:
        super().__init__(path)
        self.ref, self.want = ref, want

    def test(self, facts) -> bool:
        return bool(facts.values(self.ref)) is self.want

    def describe(self) -> str:
        return f"{self.ref.name} {'exists' if self.want else 'is missing'}"

    def failure(self, facts) -> Failure:
        return Failure(format_path(self.path), self.describe(), _actual(self.ref, facts.values(self.ref)))

    def evidence(self, facts) -> str:
        return _actual(self.ref, facts.values(self.ref))


class All(Condition):
    __slots__ = ("children",)

    def __init__(self, path: tuple, children: list[Condition]) -> None:
        super().__init__(path)
        self.children = tuple(children)

    def test(self, facts) -> bool:
        for c in self.children:
            if not c.test(facts):
                return False
        return True

    def describe(self) -> str:
        return " and ".join(_paren(c) for c in self.children)

    def failure(self, facts) -> Failure:
        for c in self.children:
            if not c.test(facts):
                return c.failure(facts)
        return Failure(format_path(self.path), self.describe(), "(holds)")

    def evidence(self, facts) -> str:
        return "; ".join(c.evidence(facts) for c in self.children)


class AnyOf(Condition):
    __slots__ = ("children",)

    def __init__(self, path: tuple, children: list[Condition]) -> None:
        super().__init__(path)
        self.children = tuple(children)

    def test(self, facts) -> bool:
        for c in self.children:
            if c.test(facts):
                return True
        return False

    def describe(self) -> str:
        return " or ".join(_paren(c) for c in self.children)

    def failure(self, facts) -> Failure:
        why = "; ".join(c.failure(facts).actual for c in self.children)
        return Failure(format_path(self.path), f"any of: {self.describe()}", f"none holds: {why}")

    def evidence(self, facts) -> str:
        for c in self.children:
            if c.test(facts):
                return c.evidence(facts)
        return ""


class Not(Condition):
    __slots__ = ("child",)

    def __init__(self, path: tuple, child: Condition) -> None:
        super().__init__(path)
        self.child = child

    def test(self, facts) -> bool:
        return not self.child.test(facts)

    def describe(self) -> str:
        return f"not ({self.child.describe()})"

    def failure(self, facts) -> Failure:
        return Failure(format_path(self.path), self.describe(), self.child.evidence(facts))

    def evidence(self, facts) -> str:
        return self.child.failure(facts).actual


class AnySeries(Condition):
    __slots__ = ("child",)

    def __init__(self, path: tuple, child: Condition) -> None:
        super().__init__(path)
        self.child = child

    def test(self, facts) -> bool:
        for s in facts.series:
            if self.child.test(s):
                return True
        return False

    def describe(self) -> str:
        return f"some series: {self.child.describe()}"

    def failure(self, facts) -> Failure:
        if not facts.series:
            return Failure(format_path(self.path), self.describe(), "the study has no series")
        shown = [f"series {s.series_uid}: {self.child.failure(s).actual}" for s in facts.series[:_MAX_SERIES_SHOWN]]
        more = len(facts.series) - len(shown)
        return Failure(format_path(self.path), self.describe(),
                       "no series does; " + "; ".join(shown) + (f"; and {more} more" if more > 0 else ""))

    def evidence(self, facts) -> str:
        for s in facts.series:
            if self.child.test(s):
                return f"series {s.series_uid}: {self.child.evidence(s)}"
        return ""


class AllSeries(Condition):
    __slots__ = ("child",)

    def __init__(self, path: tuple, child: Condition) -> None:
        super().__init__(path)
        self.child = child

    def test(self, facts) -> bool:
        if not facts.series:
            return False  # no vacuous truth: an empty study satisfies nothing
        for s in facts.series:
            if not self.child.test(s):
                return False
        return True

    def describe(self) -> str:
        return f"every series: {self.child.describe()}"

    def failure(self, facts) -> Failure:
        for s in facts.series:
            if not self.child.test(s):
                return Failure(format_path(self.path), self.describe(),
                               f"series {s.series_uid}: {self.child.failure(s).actual}")
        return Failure(format_path(self.path), self.describe(), "the study has no series")

    def evidence(self, facts) -> str:
        return f"all {len(facts.series)} series"


def _paren(c: Condition) -> str:
    return f"({c.describe()})" if isinstance(c, (All, AnyOf)) and len(c.children) > 1 else c.describe()


# -- compiling -------------------------------------------------------------------------------

Problem = tuple[tuple, str]  # (path inside the rule, message)


def compile_condition(data: Any, *, level: str, path: tuple = ("match",)) -> tuple[Condition | None, list[Problem]]:
    """Compile a condition; problems name the path and say what to write instead."""
    problems: list[Problem] = []
    cond = _compile(data, path, level, problems, inside_series=False)
    return (None if problems else cond), problems


def _compile(data: Any, path: tuple, level: str, problems: list[Problem], inside_series: bool) -> Condition | None:
    if not isinstance(data, dict):
        problems.append((path, "a condition must be a mapping, e.g. {Modality: CT} or {all: [...]}"
                               f", not {_kind_word(data)}"))
        return None
    if not data:
        return Always(path)
    terms: list[Condition | None] = []
    for key, value in data.items():
        p = path + (key,)
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                problems.append((p, f"'{key}' needs a list of one or more conditions"))
                continue
            children = [_compile(v, p + (i,), level, problems, inside_series) for i, v in enumerate(value)]
            terms.append((All if key == "all" else AnyOf)(p, children))
        elif key == "not":
            terms.append(Not(p, _compile(value, p, level, problems, inside_series)))
        elif key in ("any_series", "all_series"):
            if level != "study" or inside_series:
                where = "inside another series condition" if inside_series else "in a series-level rule"
                problems.append((p, f"'{key}' is for study-level rules (level: study); it cannot be used {where}"))
                continue
            child = _compile(value, p, "series", problems, inside_series=True)
            terms.append((AnySeries if key == "any_series" else AllSeries)(p, child))
        else:
            try:
                ref = resolve_attribute(key, level=level)
            except ValueError as exc:
                problems.append((p, str(exc)))
                continue
            terms.extend(_attribute_tests(ref, value, p, problems))
    return terms[0] if len(terms) == 1 else All(path, terms)


def _kind_word(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return f"the value {_show(v)}"


def _attribute_tests(ref: AttrRef, spec: Any, path: tuple, problems: list[Problem]) -> list[Condition]:
    if spec is None:
        problems.append((path, f"no value given: write e.g. '{ref.name}: VALUE' or '{ref.name}: {{exists: true}}'"))
        return []
    if isinstance(spec, list):
        spec = {"in": spec}
    elif not isinstance(spec, dict):
        spec = {"equals": spec}
    exact = spec.get("exact", False)
    every = spec.get("all", False)
    for opt, val in (("exact", exact), ("all", every)):
        if not isinstance(val, bool):
            problems.append((path + (opt,), f"'{opt}' must be true or false, not {_kind_word(val)}"))
    ops = [k for k in spec if k not in _OPTIONS]
    if not ops:
        problems.append((path, f"no operator given for {ref.name}: use one of {', '.join(OPERATORS)}"))
    out: list[Condition] = []
    for op in ops:
        p = path + (op,)
        if op not in OPERATORS:
            problems.append((p, f"unknown operator '{op}': use one of {', '.join(OPERATORS)}"))
            continue
        leaf = _leaf(ref, op, spec[op], exact is True, every is True, p, problems)
        if leaf is not None:
            out.append(leaf)
    return out


def _leaf(ref: AttrRef, op: str, operand: Any, exact: bool, every: bool, path: tuple,
          problems: list[Problem]) -> Condition | None:
    n0 = len(problems)

    def bad(msg: str) -> None:
        problems.append((path, msg))

    if ref.kind == "sequence" and op not in ("exists", "missing"):
        bad(f"{ref.name} is a sequence: only 'exists' and 'missing' can test it")
        return None
    if exact and op not in ("equals", "in", "contains", "matches"):
        bad("'exact' applies to text comparisons (equals, in, contains, matches)")
    opts = (" (exact case)" if exact else "") + (" (every value)" if every else "")

    if op in ("exists", "missing"):
        if every:
            bad(f"'all' does not apply to '{op}'")
        if not isinstance(operand, bool):
            bad(f"'{op}' takes true or false, e.g. '{op}: true'")
        if len(problems) > n0:
            return None
        return Presence(path, ref, operand if op == "exists" else not operand)

    if op in ("equals", "contains"):
        value = _scalar_operand(ref, op, operand, bad, check_choices=op == "equals")
        if len(problems) > n0:
            return None
        eq = _time_pred(value) if ref.kind == "time" and op == "equals" else _equals_pred(value, exact)
        if op == "equals":
            return Leaf(path, ref, f"{ref.name} equals {_show(value)}{opts}", eq, every)
        return Contains(path, ref, f"{ref.name} contains {_show(value)}{opts}", eq, _substring_pred(value, exact), every)

    if op == "in":
        if not isinstance(operand, list) or not operand:
            bad("'in' needs a list of one or more values, e.g. 'in: [CT, MR]'")
            return None
        values = [_scalar_operand(ref, op, v, lambda m, i=i: problems.append((path + (i,), m)), True)
                  for i, v in enumerate(operand)]
        if len(problems) > n0:
            return None
        preds = [_time_pred(v) if ref.kind == "time" else _equals_pred(v, exact) for v in values]
        return Leaf(path, ref, f"{ref.name} in {_show(values)}{opts}", lambda v: any(p(v) for p in preds), every)

    if op == "matches":
        pattern = _compile_regex(operand, exact, bad)
        if pattern is None or len(problems) > n0:
            return None
        return Leaf(path, ref, f"{ref.name} matches {_show(operand)}{opts}", _regex_pred(pattern, ref.name), every)

    if ref.kind == "bool":
        bad(f"{ref.name} is true or false: compare it with 'equals', not '{op}'")
        return None
    to_num = parse_time_of_day if ref.kind == "time" else to_number
    if op == "between":
        if not isinstance(operand, list) or len(operand) != 2:
            bad("'between' needs two bounds, e.g. 'between: [1, 3]'")
            return None
        lo = _numeric_operand(ref, operand[0], lambda m: problems.append((path + (0,), m)))
        hi = _numeric_operand(ref, operand[1], lambda m: problems.append((path + (1,), m)))
        if len(problems) > n0:
            return None
        overnight = ref.kind == "time" and lo > hi  # a window such as 18:00 .. 07:00 wraps midnight
        if lo > hi and not overnight:
            bad(f"the first bound ({_show(operand[0])}) is larger than the second ({_show(operand[1])})")
            return None

        def pred(v: Any) -> bool:
            x = to_num(v)
            if x is None:
                return False
            return (x >= lo or x <= hi) if overnight else lo <= x <= hi

        return Leaf(path, ref, f"{ref.name} between {_show(operand[0])} and {_show(operand[1])}{opts}", pred, every)

    bound = _numeric_operand(ref, operand, bad)
    if len(problems) > n0:
        return None
    cmp = _COMPARE[op]

    def compare(v: Any) -> bool:
        x = to_num(v)
        return x is not None and cmp(x, bound)

    return Leaf(path, ref, f"{ref.name} {_SYMBOL[op]} {_show(operand)}{opts}", compare, every)


def _scalar_operand(ref: AttrRef, op: str, v: Any, bad: Callable[[str], None], check_choices: bool) -> Any:
    if isinstance(v, datetime):
        bad("write a date as YYYYMMDD text, e.g. '20240131'")
        return v
    if isinstance(v, date):  # YAML reads 2024-01-31 as a date; DICOM writes DA as YYYYMMDD
        v = v.strftime("%Y%m%d")
    if v is None or isinstance(v, (list, dict)):
        bad(f"'{op}' compares with one value, not {_kind_word(v)}")
        return v
    if ref.kind == "bool":
        if not isinstance(v, bool):
            bad(f"{ref.name} is true or false; {_show(v)} is neither")
        return v
    if isinstance(v, bool):
        bad(f"{ref.name} is not a yes/no attribute; if you mean the word, quote it: '{str(v).lower()}'")
        return v
    if ref.kind == "number" and op != "contains" and to_number(v) is None:
        bad(f"{ref.name} is a number; {_show(v)} is not a number")
    vr = _vr(ref)
    if isinstance(v, str) and "\\" in v and vr not in _FREE_TEXT_VRS:
        # DICOM stores 'ORIGINAL\\PRIMARY' as separate values and each is compared on its own,
        # so a backslash-joined operand can never match.
        parts = [x for x in v.split("\\") if x]
        one = parts[0] if parts else "VALUE"
        bad(f"{_show(v)} joins several values with '\\', but each value of {ref.name} is compared on its "
            f"own, so it never matches: to require them all write "
            f"all: [{{{ref.name}: {{contains: {one}}}}}, ...] (one per value); for any of them, "
            f"a list: {ref.name}: [{', '.join(parts) or 'A, B'}]")
    if ref.kind == "text" and isinstance(v, (int, float)) and vr not in _DATE_VRS and \
            (ref.derived or ref.multi is not None):
        # A number operand compares numerically: AccessionNumber 12345 would match '012345' and
        # '12345.0'. Text attributes compare as text (private tags, VR unknown, keep numbers).
        bad(f"{ref.name} is text, not a number: quote it: '{format_value(v)}'")
    if ref.kind == "time" and op != "contains" and parse_time_of_day(v) is None:
        # DICOM writes TM as HHMMSS: '18:00' compared as text would never equal '180000'.
        bad(f"{ref.name} is a time of day: write it quoted as 'HH:MM' or 'HH:MM:SS', e.g. '18:00'")
    if check_choices and ref.choices and str(v).casefold() not in {c.casefold() for c in ref.choices}:
        bad(f"{ref.name} is one of {', '.join(ref.choices)}; {_show(v)} is not")
    return v


_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})  # single-valued: a backslash is just a character
_DATE_VRS = frozenset({"DA", "DT"})  # compared as numbers YYYYMMDD (docs/rules.md, "Dates")


def _vr(ref: AttrRef) -> str | None:
    """The dictionary VR of a DICOM attribute; None for derived names and unknown (private) tags."""
    if ref.derived or ref.multi is None:
        return None
    return get_entry(int(ref.key, 16))[0]


def _time_pred(operand: str) -> Callable[[Any], bool]:
    """equals on a time attribute: the same time of day, whether written '18:00' or TM '180000'."""
    t = parse_time_of_day(operand)
    return lambda v: (x := parse_time_of_day(v)) is not None and abs(x - t) < 1e-6


def _numeric_operand(ref: AttrRef, v: Any, bad: Callable[[str], None]) -> float:
    if ref.kind == "time":
        t = parse_time_of_day(v) if isinstance(v, str) else None
        if t is None:
            bad(f"{ref.name} is a time of day: write it as 'HH:MM' or 'HH:MM:SS', e.g. '18:00'")
            return 0.0
        return t
    if isinstance(v, date) and not isinstance(v, datetime):
        v = int(v.strftime("%Y%m%d"))
    n = to_number(v)
    if n is None:
        bad(f"expects a number, got {_kind_word(v)}")
        return 0.0
    return n


def _equals_pred(operand: Any, exact: bool) -> Callable[[Any], bool]:
    if isinstance(operand, bool):
        return lambda v: v is operand
    num = to_number(operand)
    if isinstance(operand, (int, float)):  # written as a number: compare numerically, '1.6000' == 1.6
        return lambda v: (x := to_number(v)) is not None and math.isclose(x, num, rel_tol=1e-9, abs_tol=1e-12)
    text = operand if exact else operand.casefold()

    def pred(v: Any) -> bool:
        if isinstance(v, str):
            return (v if exact else v.casefold()) == text
        if isinstance(v, bool) or num is None:
            return False
        return math.isclose(v, num, rel_tol=1e-9, abs_tol=1e-12)

    return pred


def _substring_pred(operand: Any, exact: bool) -> Callable[[Any], bool]:
    needle = format_value(operand)
    if not exact:
        needle = needle.casefold()

    def pred(v: Any) -> bool:
        if isinstance(v, bool):
            return False
        s = format_value(v)
        return needle in (s if exact else s.casefold())

    return pred


def _compile_regex(pattern: Any, exact: bool, bad: Callable[[str], None]):
    if not isinstance(pattern, str) or not pattern:
        bad("'matches' needs a regular expression as text, e.g. matches: '.*chest.*'")
        return None
    if len(pattern) > REGEX_MAX_PATTERN:
        bad(f"the regular expression is {len(pattern)} characters long; the limit is {REGEX_MAX_PATTERN}")
        return None
    try:
        return regex.compile(pattern, 0 if exact else regex.IGNORECASE)
    except regex.error as exc:
        bad(f"the regular expression does not compile: {exc}")
        return None


def _regex_pred(pattern, name: str) -> Callable[[Any], bool]:
    def pred(v: Any) -> bool:
        s = format_value(v)
        if len(s) > REGEX_MAX_INPUT:
            return False
        try:
            return pattern.fullmatch(s, timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            log.warning("regular expression %r on %s gave up after %.0f ms; counted as no match",
                        pattern.pattern, name, REGEX_TIMEOUT_S * 1000)
            return False

    return pred
