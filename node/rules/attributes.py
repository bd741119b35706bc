"""What a rule can name: DICOM keywords, tags (private ones too) and derived attributes.

Names are resolved once when the rules load, so evaluation is a dictionary lookup. The kind of
an attribute (text, number, time, yes/no, sequence) lets the loader reject a comparison that
could never be true, e.g. ``SliceThickness: {equals: thin}``, with a message instead of a
silent non-match.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache

from pydicom.datadict import dictionary_has_tag, get_entry, keyword_dict

__all__ = ["AttrRef", "Derived", "DERIVED", "WEEKDAYS", "ORIENTATIONS", "resolve_attribute", "NUMERIC_VRS"]

NUMERIC_VRS = frozenset({"DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "US or SS"})
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique")
_TAG = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")


@dataclass(frozen=True)
class Derived:
    kind: str  # "text", "number", "bool" or "time"
    doc: str
    choices: tuple[str, ...] = ()  # allowed operands for equals/in, when the value is one of a few words
    study_only: bool = False


DERIVED: dict[str, Derived] = {
    "instance_count": Derived("number", "number of instances received for the series (study level: for the study)"),
    "series_count": Derived("number", "number of series in the study", study_only=True),
    "orientation": Derived("text", "slice orientation from ImageOrientationPatient, within 30 degrees of an axis",
                           choices=ORIENTATIONS),
    "is_volume": Derived("bool", "a stack of parallel slices (a 3-D volume) rather than single images"),
    "patient_age": Derived("number", "patient age in years, from PatientAge or birth date and study date"),
    "calling_ae": Derived("text", "AE title of the sender"),
    "called_ae": Derived("text", "AE title the sender called (this node's)"),
    "source_ip": Derived("text", "IP address the series came from"),
    "arrival_time": Derived("time", "local time of day the series arrived, HH:MM:SS"),
    "arrival_weekday": Derived("text", "local weekday the series arrived: Mon .. Sun", choices=WEEKDAYS),
}


@dataclass(frozen=True)
class AttrRef:
    name: str  # as the rule writer wrote it
    key: str  # derived name, or 8 upper-case hex digits (the DICOM JSON key)
    kind: str  # "text", "number", "time", "bool", "sequence"
    multi: bool | None  # dictionary allows several values; None: unknown (private tag)
    derived: bool = False
    choices: tuple[str, ...] = ()


def resolve_attribute(name: str, *, level: str) -> AttrRef:
    """Resolve a keyword, ``gggg,eeee`` tag or derived name; ValueError says what is wrong."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("an attribute name must be a DICOM keyword, a tag like '0018,0050' or a derived name")
    if name in DERIVED:
        d = DERIVED[name]
        if d.study_only and level != "study":
            raise ValueError(f"'{name}' is only known for a whole study: use it in a rule with level: study")
        return AttrRef(name, name, d.kind, False, derived=True, choices=d.choices)
    m = _TAG.match(name)
    if m:
        tag = int(m.group(1) + m.group(2), 16)
        key = f"{tag:08X}"
        if dictionary_has_tag(tag):
            vr, vm = get_entry(tag)[:2]
            return AttrRef(name, key, _kind_of_vr(vr), vm != "1")
        return AttrRef(name, key, "text", None)
    tag = keyword_dict.get(name)
    if tag is None:
        raise ValueError(_unknown_name_message(name))
    vr, vm = get_entry(tag)[:2]
    return AttrRef(name, f"{tag:08X}", _kind_of_vr(vr), vm != "1")


def _kind_of_vr(vr: str) -> str:
    if vr in NUMERIC_VRS:
        return "number"
    if vr == "SQ":
        return "sequence"
    if vr == "TM":
        return "time"
    return "text"


def _unknown_name_message(name: str) -> str:
    msg = f"unknown attribute '{name}': not a DICOM keyword, a tag like '0018,0050' or a derived attribute"
    exact_case = {k.lower(): k for k in _all_names()}.get(name.lower())
    guesses = [exact_case] if exact_case else difflib.get_close_matches(name, _all_names(), n=3, cutoff=0.75)
    if guesses:
        msg += " (did you mean " + " or ".join(f"'{g}'" for g in guesses) + "?)"
    return msg


@lru_cache(maxsize=1)
def _all_names() -> tuple[str, ...]:
    return tuple(keyword_dict) + tuple(DERIVED)
