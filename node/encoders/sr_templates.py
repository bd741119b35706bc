"""SR templates: how a handler's measurement names map to coded concepts (TID 1500).

One YAML file per handler in ``sr_templates/`` (the file stem is the template name that
``MeasurementReport.template`` names). The file is data, reviewed like code, and checked
when the node starts (``validate_all``): a malformed code, a SNOMED CT identifier with a wrong
check digit or a unit that is not UCUM stops start-up with the file and key named, instead of
failing a job later. Layout::

    procedure: {scheme: LN, value: "25045-6", meaning: CT unspecified body region}   # optional
    findings:                      # MeasurementGroup.finding -> finding type (+ optional site, category)
      lung_left:
        type: {scheme: SCT, value: "44029006", meaning: Left lung}
        site: {scheme: SCT, value: "39607008", meaning: Lung}
    measurements:                  # Measurement.name -> concept, UCUM unit, optional derivation
      volume: {concept: {scheme: SCT, value: "118565006", meaning: Volume}, unit: ml}
    qualitative:                   # MeasurementGroup.qualitative keys (optional)
      concepts: {...}
      values: {...}

Code values must be quoted strings: YAML would turn ``0123`` into an octal integer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from node.results import Code, Measurement, MeasurementReport

__all__ = ["TEMPLATE_DIR", "TemplateError", "SRTemplate", "MeasurementConcept", "FindingConcept",
           "load_template", "validate_all"]

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "sr_templates"

# Display names of the UCUM codes handlers use; other codes display as themselves.
UNIT_MEANINGS = {
    "ml": "milliliter", "mL": "milliliter", "l": "liter", "mm": "millimeter", "cm": "centimeter",
    "mm2": "square millimeter", "cm2": "square centimeter", "mm3": "cubic millimeter",
    "cm3": "cubic centimeter", "[hnsf'U]": "Hounsfield unit", "1": "no units", "%": "percent",
    "{count}": "count", "g/ml": "gram per milliliter", "s": "second", "deg": "degree",
}


class TemplateError(ValueError):
    """A template file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class MeasurementConcept:
    concept: Code
    unit: str
    unit_meaning: str
    derivation: Code | None = None


@dataclass(frozen=True)
class FindingConcept:
    type: Code
    site: Code | None = None
    category: Code | None = None


@dataclass(frozen=True)
class SRTemplate:
    name: str
    path: Path
    findings: dict[str, FindingConcept]
    measurements: dict[str, MeasurementConcept]
    qualitative_concepts: dict[str, Code] = field(default_factory=dict)
    qualitative_values: dict[str, Code] = field(default_factory=dict)
    procedure: Code | None = None

    def _missing(self, section: str, key: str) -> TemplateError:
        return TemplateError(f"{self.path}: no entry {section}.{key!r} (the handler reported it)")

    def finding(self, key: str) -> FindingConcept:
        try:
            return self.findings[key]
        except KeyError:
            raise self._missing("findings", key) from None

    def measurement(self, m: Measurement) -> MeasurementConcept:
        try:
            mc = self.measurements[m.name]
        except KeyError:
            raise self._missing("measurements", m.name) from None
        if m.unit != mc.unit:
            raise TemplateError(
                f"{self.path}: measurements.{m.name} is in {mc.unit!r}, the handler reported {m.unit!r}"
            )
        return mc

    def qualitative(self, concept: str, value: str) -> tuple[Code, Code]:
        if concept not in self.qualitative_concepts:
            raise self._missing("qualitative.concepts", concept)
        if value not in self.qualitative_values:
            raise self._missing("qualitative.values", value)
        return self.qualitative_concepts[concept], self.qualitative_values[value]

    def check(self, report: MeasurementReport) -> None:
        """Raise TemplateError for the first name in ``report`` the template does not map."""
        for g in report.groups:
            self.finding(g.finding)
            for m in g.measurements:
                self.measurement(m)
            for concept, value in g.qualitative:
                self.qualitative(concept, value)


# Verhoeff tables: SNOMED CT identifiers end in a Verhoeff check digit, so a mistyped code
# is caught at start-up rather than published in a report.
_D = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
      [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
      [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
      [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
_P = [list(range(10))]
for _ in range(7):  # row k is the k-th power of Verhoeff's permutation (1 5 7 6 2 8 3 0 9 4)
    _P.append([[1, 5, 7, 6, 2, 8, 3, 0, 9, 4][x] for x in _P[-1]])


def sctid_is_valid(value: str) -> bool:
    if not re.fullmatch(r"[1-9][0-9]{5,17}", value):
        return False
    c = 0
    for i, ch in enumerate(reversed(value)):
        c = _D[c][_P[i % 8][int(ch)]]
    return c == 0


_CODE_PATTERNS = {"DCM": r"[A-Za-z0-9]+", "LN": r"[0-9]+-[0-9]", "UCUM": r".+", "UMLS": r"C[0-9]{7}"}


def _code(path: Path, key: str, raw: object) -> Code:
    if not isinstance(raw, dict) or set(raw) != {"scheme", "value", "meaning"}:
        raise TemplateError(f"{path}: {key} must be a mapping with exactly scheme, value, meaning; got {raw!r}")
    for part in ("scheme", "value", "meaning"):
        if not isinstance(raw[part], str):
            raise TemplateError(f"{path}: {key}.{part} must be a quoted string, got {raw[part]!r}")
    try:
        code = Code(raw["value"], raw["scheme"], raw["meaning"])
    except ValueError as exc:
        raise TemplateError(f"{path}: {key}: {exc}") from None
    if len(code.meaning) > 64:
        raise TemplateError(f"{path}: {key}.meaning is longer than 64 characters")
    if code.scheme == "SCT" and not sctid_is_valid(code.value):
        raise TemplateError(f"{path}: {key}.value {code.value!r} is not a valid SNOMED CT identifier (check digit)")
    pattern = _CODE_PATTERNS.get(code.scheme)
    if pattern and not re.fullmatch(pattern, code.value):
        raise TemplateError(f"{path}: {key}.value {code.value!r} is not a {code.scheme} code")
    return code


def _mapping(path: Path, key: str, raw: object, allowed: set[str] | None = None) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TemplateError(f"{path}: {key} must be a mapping, got {type(raw).__name__}")
    if allowed is not None and set(raw) - allowed:
        raise TemplateError(f"{path}: {key} has unknown keys {sorted(set(raw) - allowed)}; allowed: {sorted(allowed)}")
    for k in raw:
        if not isinstance(k, str) or not k:
            raise TemplateError(f"{path}: {key} has a key that is not a non-empty string: {k!r}")
    return raw


def _measurement(path: Path, key: str, raw: object) -> MeasurementConcept:
    raw = _mapping(path, key, raw, {"concept", "unit", "unit_meaning", "derivation"})
    if "concept" not in raw or "unit" not in raw:
        raise TemplateError(f"{path}: {key} needs 'concept' and 'unit'")
    unit = raw["unit"]
    if not isinstance(unit, str):
        raise TemplateError(f"{path}: {key}.unit must be a quoted string, got {unit!r}")
    try:
        Measurement(key, 0.0, unit)  # the same UCUM check a handler's result goes through
    except ValueError:
        raise TemplateError(f"{path}: {key}.unit {unit!r} is not a UCUM code") from None
    meaning = raw.get("unit_meaning", UNIT_MEANINGS.get(unit, unit))
    if not isinstance(meaning, str) or not meaning:
        raise TemplateError(f"{path}: {key}.unit_meaning must be a non-empty string")
    derivation = _code(path, f"{key}.derivation", raw["derivation"]) if "derivation" in raw else None
    return MeasurementConcept(_code(path, f"{key}.concept", raw["concept"]), unit, meaning, derivation)


def _finding(path: Path, key: str, raw: object) -> FindingConcept:
    raw = _mapping(path, key, raw, {"type", "site", "category"})
    if "type" not in raw:
        raise TemplateError(f"{path}: {key} needs 'type'")
    return FindingConcept(
        type=_code(path, f"{key}.type", raw["type"]),
        site=_code(path, f"{key}.site", raw["site"]) if "site" in raw else None,
        category=_code(path, f"{key}.category", raw["category"]) if "category" in raw else None,
    )


def parse_template(path: Path) -> SRTemplate:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TemplateError(f"{path}: not valid YAML: {exc}") from None
    doc = _mapping(path, "top level", doc, {"procedure", "findings", "measurements", "qualitative"})
    findings = {
        k: _finding(path, f"findings.{k}", v) for k, v in _mapping(path, "findings", doc.get("findings")).items()
    }
    measurements = {
        k: _measurement(path, f"measurements.{k}", v)
        for k, v in _mapping(path, "measurements", doc.get("measurements")).items()
    }
    if not findings or not measurements:
        raise TemplateError(f"{path}: needs at least one entry in 'findings' and in 'measurements'")
    qual = _mapping(path, "qualitative", doc.get("qualitative"), {"concepts", "values"})
    concepts = {k: _code(path, f"qualitative.concepts.{k}", v)
                for k, v in _mapping(path, "qualitative.concepts", qual.get("concepts")).items()}
    values = {k: _code(path, f"qualitative.values.{k}", v)
              for k, v in _mapping(path, "qualitative.values", qual.get("values")).items()}
    procedure = _code(path, "procedure", doc["procedure"]) if doc.get("procedure") is not None else None
    return SRTemplate(path.stem, path, findings, measurements, concepts, values, procedure)


@lru_cache(maxsize=64)
def _load(path: Path, mtime_ns: int) -> SRTemplate:
    return parse_template(path)


def load_template(name: str, directory: Path | str | None = None) -> SRTemplate:
    """The parsed template ``<directory>/<name>.yaml`` (cached until the file changes)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name or ""):
        raise TemplateError(f"SR template name {name!r} is not a plain file name")
    path = Path(directory or TEMPLATE_DIR) / f"{name}.yaml"
    if not path.is_file():
        raise TemplateError(f"{path}: SR template {name!r} does not exist")
    return _load(path, path.stat().st_mtime_ns)


def validate_all(directory: Path | str | None = None) -> dict[str, SRTemplate]:
    """Parse every template; the first malformed one raises TemplateError naming file and key."""
    directory = Path(directory or TEMPLATE_DIR)
    return {p.stem: load_template(p.stem, directory) for p in sorted(directory.glob("*.yaml"))}
