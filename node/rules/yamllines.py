"""YAML parsing that remembers where each value was written.

PyYAML's ``safe_load`` forgets line numbers and silently keeps the last of two equal keys.
Composing the node tree ourselves keeps a ``path -> line`` map for error messages and turns
duplicate keys into errors. Two YAML 1.1 surprises are turned off, as YAML 1.2 does: unquoted
times such as ``18:00`` stay text (1.1 reads base-60 integers, 1080), and only ``true``/``false``
are booleans (1.1 also reads yes/no/on/off, so a rule named ``off`` or ``Modality: NO`` would
silently become a boolean). Numbers only YAML 1.1 reads as numbers (``0123`` octal 83, ``0x1F``,
``0b101``, ``1_000``) stay the text written, so ``PatientID: 0123`` means '0123', not 83.
Aliases are expanded, so a file of nested aliases (a "billion laughs") would build billions of
values from a few hundred bytes: building stops with a problem past ``MAX_NODES`` values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["MAX_NODES", "ParsedYaml", "YamlProblem", "parse_yaml"]

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~10x faster, same marks
_DECIMAL_INT = re.compile(r"^[-+]?(0|[1-9][0-9]*)$")  # the only integers kept as numbers
_LEADING_ZERO = re.compile(r"^[-+]?0[0-9_]")  # 012.5: an identifier's digits, not a float
MAX_NODES = 100_000  # values built per file, aliases expanded; real rule files build a few hundred


class _TooBig(Exception):
    pass


@dataclass
class YamlProblem:
    line: int | None
    path: tuple
    message: str


@dataclass
class ParsedYaml:
    data: Any
    lines: dict[tuple, int] = field(default_factory=dict)  # path -> 1-based line
    problems: list[YamlProblem] = field(default_factory=list)

    def line_of(self, path: tuple) -> int | None:
        """Line of ``path`` or of its nearest written ancestor (a default has no line of its own)."""
        path = tuple(path)
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]


class _Scalars(yaml.constructor.SafeConstructor):
    pass


def parse_yaml(text: str) -> ParsedYaml:
    """Parse one YAML document; syntax errors come back as problems, never as exceptions."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        msg = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        return ParsedYaml(None, problems=[YamlProblem(line, (), f"not valid YAML: {msg}")])
    except yaml.YAMLError as exc:
        return ParsedYaml(None, problems=[YamlProblem(None, (), f"not valid YAML: {exc}")])
    out = ParsedYaml(None)
    if root is not None:
        try:
            out.data = _build(root, (), out, _Scalars(), set(), [0])
        except _TooBig as exc:
            line = exc.args[0]
            return ParsedYaml(None, problems=[YamlProblem(line, (), f"the file expands to more than {MAX_NODES} "
                                                                   "values (nested YAML aliases?); refused")])
    return out


def _build(node: yaml.Node, path: tuple, out: ParsedYaml, scalars: _Scalars, active: set[int],
           count: list[int]) -> Any:
    count[0] += 1
    if count[0] > MAX_NODES:  # each alias is expanded anew: nested ones multiply (alias bomb)
        raise _TooBig(node.start_mark.line + 1)
    out.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        if node.tag == "tag:yaml.org,2002:int" and not _DECIMAL_INT.match(node.value):
            return node.value  # 1.1-only forms: 0123 (octal), 0x1F, 0b101, 1_000, 18:00 (base 60)
        if node.tag == "tag:yaml.org,2002:float" and ("_" in node.value or ":" in node.value
                                                     or _LEADING_ZERO.match(node.value)):
            return node.value
        if node.tag == "tag:yaml.org,2002:bool" and node.value.lower() not in ("true", "false"):
            return node.value
        return scalars.construct_object(node, deep=True)
    if id(node) in active:  # an alias that contains itself
        out.problems.append(YamlProblem(node.start_mark.line + 1, path, "a YAML alias refers to itself"))
        return None
    active.add(id(node))
    try:
        if isinstance(node, yaml.SequenceNode):
            return [_build(child, path + (i,), out, scalars, active, count) for i, child in enumerate(node.value)]
        result: dict = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                out.problems.append(YamlProblem(line, path, "a key must be a plain word, not a list or mapping"))
                continue
            key = key_node.value  # keys are names: keep them as written (`on`, `yes` are not booleans here)
            if key in result:
                out.problems.append(YamlProblem(line, path + (key,), f"'{key}' is written twice"))
                continue
            out.lines[path + (key,)] = line
            result[key] = _build(value_node, path + (key,), out, scalars, active, count)
        return result
    finally:
        active.discard(id(node))
