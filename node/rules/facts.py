"""Facts a rule is evaluated against: one instance's header plus what the node knows about arrival.

The header is kept as DICOM JSON (PS3.18 F.2) without bulk data, so the spine can store it in
its index and ``simulate`` can replay routing months later without the files. Rule evaluation
reads only these facts, never pixel data.

Values are looked up as a tuple of elements (empty when the attribute is absent or empty):
numbers for numeric VRs (DS/IS strings converted, so ``"1.6000"`` is 1.6), text otherwise.
"""
from __future__ import annotations

import base64
import json
import math
from datetime import date, datetime
from typing import Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.rules.attributes import NUMERIC_VRS, WEEKDAYS, AttrRef, resolve_attribute

__all__ = ["SeriesFacts", "StudyFacts", "to_number", "parse_time_of_day", "format_value"]

BULK_LIMIT = 1024  # bytes; binary values above this are bulk data (pixels, icons, vendor blobs)
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN", "OB or OW", "US or OW"})
_PER_FRAME = 0x52009230  # PerFrameFunctionalGroupsSequence: one item per frame, keep the first
_FACTS_FORMAT = 1
_COS_30 = math.cos(math.radians(30))


def to_number(v: object) -> float | None:
    """A finite number from a number or a numeric string (DS/IS style), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def parse_time_of_day(v: object) -> float | None:
    """Seconds since midnight from 'HH:MM[:SS]' or DICOM TM 'HHMMSS.frac', else None."""
    if not isinstance(v, str):
        return None
    s = v.strip()
    if ":" in s:
        parts = s.split(":")
        if not 2 <= len(parts) <= 3 or not all(p.replace(".", "", 1).isdigit() for p in parts):
            return None
        hh, mm, ss = (parts + ["0"])[:3]
    else:
        head, _, frac = s.partition(".")
        if not head.isdigit() or len(head) not in (2, 4, 6) or (frac and not frac.isdigit()):
            return None
        hh, mm, ss = head[:2], head[2:4] or "0", (head[4:6] or "0") + ("." + frac if frac else "")
    h, m, sec = int(hh), int(mm), float(ss)
    if h > 23 or m > 59 or sec >= 61:
        return None
    return h * 3600 + m * 60 + sec


def format_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


class SeriesFacts:
    """What is known about one series when it is routed."""

    __slots__ = ("study_uid", "series_uid", "header", "omitted", "instance_count", "calling_ae",
                 "called_ae", "source_ip", "arrived_at", "is_volume_flag", "_cache")

    def __init__(self, *, study_uid: str, series_uid: str, header: dict, instance_count: int,
                 arrived_at: datetime, calling_ae: str = "", called_ae: str = "", source_ip: str = "",
                 is_volume: bool | None = None, omitted: Iterable[str] = ()) -> None:
        self.study_uid = study_uid
        self.series_uid = series_uid
        self.header = header
        self.omitted = frozenset(omitted)
        self.instance_count = int(instance_count)
        self.calling_ae = calling_ae
        self.called_ae = called_ae
        self.source_ip = source_ip
        self.arrived_at = arrived_at
        self.is_volume_flag = is_volume
        self._cache: dict[str, tuple] = {}

    @classmethod
    def from_dataset(cls, ds: Dataset, *, instance_count: int, calling_ae: str, called_ae: str,
                     source_ip: str, arrived_at: datetime, study_uid: str, series_uid: str,
                     is_volume: bool | None = None) -> "SeriesFacts":
        """Facts from one instance's header (read it with ``stop_before_pixels=True``)."""
        header, omitted = _header_json(ds)
        return cls(study_uid=study_uid, series_uid=series_uid, header=header, omitted=omitted,
                   instance_count=instance_count, calling_ae=calling_ae, called_ae=called_ae,
                   source_ip=source_ip, arrived_at=arrived_at, is_volume=is_volume)

    # -- persistence -------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({
            "format": _FACTS_FORMAT, "study_uid": self.study_uid, "series_uid": self.series_uid,
            "instance_count": self.instance_count, "calling_ae": self.calling_ae,
            "called_ae": self.called_ae, "source_ip": self.source_ip,
            "arrived_at": self.arrived_at.isoformat(), "is_volume": self.is_volume_flag,
            "omitted": sorted(self.omitted), "header": self.header,
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | dict) -> "SeriesFacts":
        d = json.loads(text) if isinstance(text, (str, bytes)) else text
        if d.get("format") != _FACTS_FORMAT:
            raise ValueError(f"series facts: unknown format {d.get('format')!r}, expected {_FACTS_FORMAT}")
        return cls(study_uid=d["study_uid"], series_uid=d["series_uid"], header=d["header"],
                   instance_count=d["instance_count"], arrived_at=datetime.fromisoformat(d["arrived_at"]),
                   calling_ae=d["calling_ae"], called_ae=d["called_ae"], source_ip=d["source_ip"],
                   is_volume=d["is_volume"], omitted=d["omitted"])

    # -- lookup ------------------------------------------------------------------------------

    def get(self, name: str) -> tuple:
        """Values of a keyword, tag ('0018,0050') or derived attribute; () when absent."""
        return self.values(resolve_attribute(name, level="series"))

    def values(self, ref: AttrRef) -> tuple:
        key = ref.key
        try:
            return self._cache[key]
        except KeyError:
            pass
        vals = self._derived(key) if ref.derived else self._dicom(key)
        self._cache[key] = vals
        return vals

    def _dicom(self, key: str) -> tuple:
        entry = self.header.get(key)
        if entry is None:
            return ("(bulk data, not kept)",) if key in self.omitted else ()
        return _entry_values(entry)

    def _derived(self, name: str) -> tuple:
        if name == "instance_count":
            return (self.instance_count,)
        if name == "orientation":
            o = self._orientation()
            return (o,) if o else ()
        if name == "is_volume":
            return (self._is_volume(),)
        if name == "patient_age":
            age = self._patient_age()
            return () if age is None else (age,)
        if name in ("calling_ae", "called_ae", "source_ip"):
            v = getattr(self, name)
            return (v,) if v else ()
        local = self.arrived_at.astimezone() if self.arrived_at.tzinfo else self.arrived_at
        if name == "arrival_time":
            return (local.strftime("%H:%M:%S"),)
        if name == "arrival_weekday":
            return (WEEKDAYS[local.weekday()],)
        return ()  # series_count: a study fact only

    def _first(self, key: str) -> object:
        vals = self._dicom(key)
        return vals[0] if vals else None

    def _orientation_vector(self) -> tuple | None:
        iop = self._dicom("00200037")
        if len(iop) != 6:  # enhanced multi-frame: Shared (or first per-frame) Plane Orientation
            for seq in ("52009229", _PER_FRAME_KEY):
                iop = _nested(self.header, seq, "00209116", "00200037")
                if len(iop) == 6:
                    break
        nums = [to_number(v) for v in iop]
        return tuple(nums) if len(nums) == 6 and None not in nums else None

    def _orientation(self) -> str | None:
        iop = self._orientation_vector()
        if iop is None:
            return None
        r, c = iop[:3], iop[3:]
        n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
        norm = math.sqrt(sum(x * x for x in n))
        if norm == 0:
            return None
        comps = [abs(x) / norm for x in n]
        axis = max(range(3), key=comps.__getitem__)
        if comps[axis] < _COS_30:
            return "oblique"
        return ("sagittal", "coronal", "axial")[axis]

    def _is_volume(self) -> bool:
        if self.is_volume_flag is not None:
            return bool(self.is_volume_flag)
        if any(str(v).upper() == "LOCALIZER" for v in self._dicom("00080008")):
            return False
        frames = to_number(self._first("00280008")) or 1
        has_position = bool(self._dicom("00200032")) or frames > 1
        return self._orientation_vector() is not None and has_position and (self.instance_count > 1 or frames > 1)

    def _patient_age(self) -> float | None:
        age = self._first("00101010")
        if isinstance(age, str) and len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
            per_year = {"D": 365.25, "W": 365.25 / 7, "M": 12, "Y": 1}[age[3]]
            return int(age[:3]) / per_year
        born = _parse_date(self._first("00100030"))
        if born is None:
            return None
        ref = _parse_date(self._first("00080020")) or _parse_date(self._first("00080021")) or self.arrived_at.date()
        years = ref.year - born.year - ((ref.month, ref.day) < (born.month, born.day))
        return float(years) if years >= 0 else None

    # -- display -----------------------------------------------------------------------------

    def label(self) -> str:
        """Short description for explanations: 'series 1.2.3 (CT, Thorax 1.0, 120 instances)'."""
        bits = [format_value(v) for v in (self._first("00080060"), self._first("0008103E")) if v]
        bits.append(f"{self.instance_count} instance{'s' if self.instance_count != 1 else ''}")
        return f"series {self.series_uid} ({', '.join(bits)})"


class StudyFacts:
    """All series of one study, for study-level rules.

    A plain attribute of a study is the union of its series' values, so ``Modality: CT`` on a
    study means "some series is CT"; ``instance_count`` is the study total and ``series_count``
    the number of series.
    """

    __slots__ = ("series", "study_uid", "_cache")

    def __init__(self, series: list[SeriesFacts], study_uid: str | None = None) -> None:
        self.series = list(series)
        self.study_uid = study_uid or (self.series[0].study_uid if self.series else "")
        self._cache: dict[str, tuple] = {}

    def get(self, name: str) -> tuple:
        return self.values(resolve_attribute(name, level="study"))

    def values(self, ref: AttrRef) -> tuple:
        key = ref.key
        try:
            return self._cache[key]
        except KeyError:
            pass
        if key == "series_count":
            vals: tuple = (len(self.series),)
        elif key == "instance_count":
            vals = (sum(s.instance_count for s in self.series),)
        else:
            seen: dict = {}
            for s in self.series:
                for v in s.values(ref):
                    seen.setdefault((type(v) is str, v), v)
            vals = tuple(seen.values())
        self._cache[key] = vals
        return vals

    def label(self) -> str:
        return f"study {self.study_uid} ({len(self.series)} series)"


# -- header conversion -----------------------------------------------------------------------

_PER_FRAME_KEY = f"{_PER_FRAME:08X}"


def _header_json(ds: Dataset) -> tuple[dict, list[str]]:
    header: dict = {}
    omitted: list[str] = []
    for tag in list(ds.keys()):
        key = f"{int(tag):08X}"
        if tag.group == 0x0002 or tag.element == 0:  # file meta and group lengths say nothing routable
            continue
        try:
            elem = ds[tag]
        except Exception:  # a value pydicom cannot even parse: the attribute exists, its value is unknown
            omitted.append(key)
            continue
        if elem.VR in _BINARY_VRS and elem.value is not None and len(elem.value) > BULK_LIMIT:
            omitted.append(key)
            continue
        if tag == _PER_FRAME and elem.VR == "SQ" and len(elem.value) > 1:
            elem = DataElement(tag, "SQ", [elem.value[0]])
        try:
            header[key] = elem.to_json_dict(_drop_bulk, BULK_LIMIT)
        except (ValueError, TypeError, AttributeError):  # invalid value, e.g. DS 'ab.c': keep it as text
            vals = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
            header[key] = {"vr": elem.VR, "Value": [str(v) for v in vals]}
    return header, omitted


def _drop_bulk(_elem: DataElement) -> str:
    return ""  # nested bulk data (e.g. an icon's pixels) becomes an empty BulkDataURI


def _entry_values(entry: dict) -> tuple:
    vr = entry.get("vr", "")
    raw = entry.get("Value")
    if raw is None:
        data = entry.get("InlineBinary")
        if not data:
            return ()
        text = base64.b64decode(data).decode("latin-1").rstrip("\x00 ")
        return tuple(p.strip() for p in text.split("\\") if p.strip())
    if vr == "SQ":
        return tuple("(sequence item)" for _ in raw)
    out = []
    numeric = vr in NUMERIC_VRS
    for v in raw:
        if isinstance(v, dict):  # PN
            v = v.get("Alphabetic") or v.get("Ideographic") or v.get("Phonetic") or ""
        if isinstance(v, str):
            v = v.strip()
            if numeric:
                n = to_number(v)
                v = n if n is not None else v
        if v is None or v == "":
            continue
        out.append(v)
    return tuple(out)


def _nested(header: dict, *keys: str) -> tuple:
    """Values at a path of sequences, taking each sequence's first item."""
    node = header
    for key in keys[:-1]:
        items = (node.get(key) or {}).get("Value") or []
        if not items or not isinstance(items[0], dict):
            return ()
        node = items[0]
    entry = node.get(keys[-1])
    return _entry_values(entry) if entry else ()


def _parse_date(v: object) -> date | None:
    if not isinstance(v, str) or len(v) != 8 or not v.isdigit():
        return None
    try:
        return date(int(v[:4]), int(v[4:6]), int(v[6:]))
    except ValueError:
        return None
