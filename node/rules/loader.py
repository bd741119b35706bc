"""Rule files -> validated rules, or every problem with its file, line and field.

A file holds one rule (a mapping) or a list of rules. Each rule is checked against the schema,
its condition is compiled, its handler looked up and its parameters validated against the
handler's ``Params`` model, and its destinations checked against the configured names.
"""
from __future__ import annotations

import difflib
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from pydantic import BaseModel, ValidationError

from node.rules.conditions import compile_condition
from node.rules.errors import RuleError, RuleErrors, format_path
from node.rules.model import RULE_FIELDS, HandlerSpec, RuleSpec
from node.rules.pull import load_pull_rule
from node.rules.rule import Action, Rule
from node.rules.yamllines import ParsedYaml, parse_yaml

__all__ = ["RULE_SUFFIXES", "read_rule_files", "load_rules", "files_digest", "is_rule_file_name"]

RULE_SUFFIXES = (".yaml", ".yml")
HandlerLookup = Callable[[str], type]


def is_rule_file_name(name: str) -> bool:
    """Plain names ending in .yaml/.yml; hidden files and editor temporaries are not rules."""
    return (name.endswith(RULE_SUFFIXES) and not name.startswith(".") and "/" not in name
            and "\\" not in name and len(name) <= 128)


def read_rule_files(rules_dir: str | os.PathLike) -> dict[str, str]:
    """Name -> text of every rule file in the directory (not recursive), sorted by name."""
    root = Path(rules_dir)
    if not root.is_dir():
        raise RuleErrors([RuleError(str(root), None, None, "the rules directory does not exist")])
    files: dict[str, str] = {}
    problems: list[RuleError] = []
    for path in sorted(root.iterdir()):
        if not is_rule_file_name(path.name) or not path.is_file():
            continue
        try:
            files[path.name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            problems.append(RuleError(path.name, None, None, "the file is not UTF-8 text"))
        except OSError as exc:
            problems.append(RuleError(path.name, None, None, f"cannot read the file: {exc.strerror or exc}"))
    if problems:
        raise RuleErrors(problems)
    return files


def files_digest(files: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name].encode()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def load_rules(files: Mapping[str, str], *, handlers: HandlerLookup, destinations: Iterable[str],
               sources: Iterable[str] = (), base_dir: Path | None = None) -> list[Rule]:
    """All rules of all files, or ``RuleErrors`` listing every problem found. ``sources``: the PACS
    sources ``kind: pull`` rules may name (node/rules/pull.py); ``base_dir``: the rules directory the
    files came from, against which their cohort CSV files are checked."""
    dests = frozenset(destinations)
    srcs = frozenset(sources)
    rules: list[Rule] = []
    errors: list[RuleError] = []
    seen: dict[str, Rule] = {}
    for name in sorted(files):
        parsed = parse_yaml(files[name])
        errors.extend(RuleError(name, p.line, format_path(p.path) or None, p.message) for p in parsed.problems)
        for index, prefix, raw in _entries(parsed, name, errors):
            if raw.get("kind") == "pull":
                rule, problems = load_pull_rule(raw, name, index, parsed.line_of(prefix), srcs, _pydantic_problems,
                                                base_dir)
            else:
                rule, problems = _load_rule(raw, name, index, parsed.line_of(prefix), handlers, dests, srcs)
            rule_name = raw.get("name") if isinstance(raw.get("name"), str) else None
            for path, message in problems:
                errors.append(RuleError(name, parsed.line_of(prefix + path), format_path(path) or None,
                                        message, rule_name))
            if rule is None:
                continue
            if rule.name in seen:
                first = seen[rule.name]
                errors.append(RuleError(name, parsed.line_of(prefix + ("name",)), "name",
                                        f"another rule is already named '{rule.name}' ({first.where()})", rule.name))
                continue
            seen[rule.name] = rule
            rules.append(rule)
    if errors:
        raise RuleErrors(errors)
    return rules


def _entries(parsed: ParsedYaml, file: str, errors: list[RuleError]):
    data = parsed.data
    if data is None:
        return  # an empty file holds no rules
    if isinstance(data, dict):
        items: list = [((), data)]
    elif isinstance(data, list):
        items = [((i,), item) for i, item in enumerate(data)]
    else:
        errors.append(RuleError(file, parsed.line_of(()), None,
                                "a rule file holds one rule (a mapping with name, match, ...) or a list of rules"))
        return
    for index, (prefix, raw) in enumerate(items):
        if not isinstance(raw, dict):
            errors.append(RuleError(file, parsed.line_of(prefix), None,
                                    f"rule #{index + 1} must be a mapping with name, match, ..."))
            continue
        yield index, prefix, raw


def _load_rule(raw: dict, file: str, index: int, line: int | None, handlers: HandlerLookup,
               dests: frozenset[str], srcs: frozenset[str] = frozenset()) -> tuple[Rule | None, list[tuple[tuple, str]]]:
    problems: list[tuple[tuple, str]] = []
    spec: RuleSpec | None = None
    if raw.get("kind", "route") == "route":
        raw = {k: v for k, v in raw.items() if k != "kind"}  # `kind: route` may be written out
    try:
        spec = RuleSpec.model_validate(raw)
    except ValidationError as exc:
        # The condition is compiled below either way: its messages are more precise than pydantic's.
        problems.extend(p for p in _pydantic_problems(exc, (), RULE_FIELDS)
                        if not (p[0][:1] == ("match",) and "match" in raw))
    level = raw.get("level") if raw.get("level") in ("series", "study") else "series"
    condition = None
    if "match" in raw:
        condition, cond_problems = compile_condition(raw["match"], level=level)
        problems.extend(cond_problems)
    # Handler and destinations are checked even when another field is wrong, so one pass shows all.
    handler = _handler_spec(raw.get("handler"))
    params = _check_handler(handler, handlers, problems) if handler is not None else {}
    if isinstance(raw.get("destinations"), list):
        for i, d in enumerate(raw["destinations"]):
            if isinstance(d, str) and d not in dests:
                known = ", ".join(sorted(dests)) or "none"
                problems.append((("destinations", i), f"unknown destination '{d}'; configured: {known}"))
    priors = raw.get("priors")
    if isinstance(priors, dict) and isinstance(priors.get("source"), str) and priors["source"] not in srcs:
        known = ", ".join(sorted(srcs)) or "none"
        problems.append((("priors", "source"), f"unknown source '{priors['source']}'; configured: {known}"))
    if problems or spec is None or condition is None:
        return None, problems
    action = Action(
        rule=spec.name, level=spec.level, handler=spec.handler.name if spec.handler else None, params=params,
        destinations=tuple(spec.destinations),
        forward_originals=spec.forward_originals if spec.forward_originals is not None else spec.handler is None,
        priority=spec.priority, timeout=spec.timeout, stable_after=spec.stable_after, queue=spec.queue,
        on_quality_failure=spec.on_quality_failure,
        priors=spec.priors.model_dump() if spec.priors else None,
    )
    return Rule(name=spec.name, description=spec.description, file=file, line=line, index=index,
                enabled=spec.enabled, order=spec.order, exclusive=spec.exclusive, fallback=spec.fallback,
                level=spec.level, condition=condition, action=action), problems


def _handler_spec(raw: Any) -> HandlerSpec | None:
    try:
        return HandlerSpec.model_validate({"name": raw} if isinstance(raw, str) else raw)
    except ValidationError:
        return None  # RuleSpec reports what is wrong with it


def _check_handler(spec: HandlerSpec, handlers: HandlerLookup, problems: list) -> dict:
    try:
        cls = handlers(spec.name)
    except KeyError as exc:
        msg = exc.args[0] if exc.args and isinstance(exc.args[0], str) else f"no handler named '{spec.name}'"
        problems.append((("handler", "name"), f"unknown handler: {msg}"))
        return {}
    params_model: type[BaseModel] | None = getattr(cls, "Params", None)
    if params_model is None:
        if spec.params:
            problems.append((("handler", "params"), f"handler '{spec.name}' takes no parameters"))
        return {}
    try:
        params = params_model.model_validate(spec.params)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, ("handler", "params"), tuple(params_model.model_fields),
                                           owner=f"handler '{spec.name}'"))
        return {}
    return params.model_dump(mode="json", exclude_unset=True)


def _pydantic_problems(exc: ValidationError, prefix: tuple, known_fields: tuple[str, ...],
                       owner: str = "a rule") -> list[tuple[tuple, str]]:
    out = []
    for e in exc.errors(include_url=False):
        loc = prefix + tuple(e["loc"])
        last = loc[-1] if loc else ""
        kind = e["type"]
        got = e.get("input")
        if kind == "extra_forbidden":
            near = difflib.get_close_matches(str(last), known_fields, n=1, cutoff=0.6)
            msg = f"{owner} has no field '{last}'" + (f" (did you mean '{near[0]}'?)" if near else "")
            msg += f"; known fields: {', '.join(known_fields)}" if not near else ""
        elif kind == "missing":
            msg = f"'{last}' is required"
        elif kind == "literal_error":
            msg = f"must be one of {e['ctx']['expected']}, not {got!r}"
        elif kind in ("bool_type", "bool_parsing"):
            msg = f"must be true or false, not {got!r}"
        elif kind.startswith("int_"):
            msg = f"must be a whole number, not {got!r}"
        elif kind.startswith(("float_", "decimal_")):
            msg = f"must be a number, not {got!r}"
        elif kind in ("string_type", "string_too_short"):
            msg = f"must be non-empty text, not {got!r}"
        elif kind == "string_pattern_mismatch" and last == "name" and len(loc) == 1:
            msg = f"a rule name is 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit; got {got!r}"
        elif kind in ("list_type", "dict_type", "model_type", "model_attributes_type"):
            want = "a list" if kind == "list_type" else "a mapping"
            if last == "handler":
                want = "a handler name, or a mapping with name and params"
            msg = f"must be {want}, not {_plain(got)}"
        elif kind == "value_error":
            msg = str(e["ctx"]["error"]) if "ctx" in e else e["msg"]
        else:
            msg = e["msg"]
        out.append((loc, msg))
    return out


def _plain(v: Any) -> str:
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return repr(v)
