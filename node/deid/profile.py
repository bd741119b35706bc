"""De-identification profiles as data: PS3.15 Annex E tables in ``profiles/*.tsv``.

A profile is a base table (``basic``) with option overlays laid over it in order; a later file's
action for a tag replaces an earlier one. Every file may name its CID 7050 code (``@code``), which
goes into the output's De-identification Method Code Sequence. The always-applied Hilum layer
``pseudonyms.tsv`` comes last (the project pseudonym for the patient's ID and name).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
PSEUDONYMS = Path(__file__).resolve().parent / "pseudonyms.tsv"
ACTIONS = frozenset("DZXKCUP")  # P: the project pseudonym of the patient (Hilum)
_TAG = re.compile(r"^\(([0-9A-Fa-fx]{4}),([0-9A-Fa-fx]{4})\)$")
MODIFIED_DATES = "retain-longitudinal-modified-dates"


class ProfileError(ValueError):
    pass


def resolve(action: str) -> str:
    """The action applied for a table entry: the last alternative (keeps every IOD valid)."""
    return action.split("/")[-1].rstrip("*")


@dataclass
class Profile:
    names: list[str] = field(default_factory=list)
    exact: dict[int, str] = field(default_factory=dict)  # tag -> resolved action
    masks: list[tuple[int, int, str]] = field(default_factory=list)  # (mask, value, action): tag & mask == value
    private: str | None = None  # action for attributes of odd groups
    codes: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def shifts_dates(self) -> bool:
        return MODIFIED_DATES in self.names

    def action(self, tag: int) -> str | None:
        if tag in self.exact:
            return self.exact[tag]
        if (tag >> 16) % 2 == 1:
            return self.private
        for mask, value, action in self.masks:
            if tag & mask == value:
                return action
        return None


def profile_path(name: str) -> Path:
    """The file of a built-in profile or option, or ``name`` itself when it is a file."""
    return _path(name)


def _path(name: str) -> Path:
    builtin = PROFILES_DIR / f"{name}.tsv"
    if builtin.is_file():
        return builtin
    p = Path(name)
    if p.is_file():
        return p
    known = ", ".join(sorted(x.stem for x in PROFILES_DIR.glob("*.tsv")))
    raise ProfileError(f"profile {name!r}: neither a built-in profile ({known}) nor a file")


def _mask(group: str, element: str) -> tuple[int, int]:
    text = (group + element).lower()
    mask = int("".join("0" if c == "x" else "f" for c in text), 16)
    value = int(text.replace("x", "0"), 16)
    return mask, value


def read_table(path: Path, into: Profile) -> None:
    """Lay one profile file over ``into``; errors name the file and line."""
    # Within one file a tag written twice is a mistake (the later line silently won); across files
    # a later overlay replacing an earlier file's action is the point of overlays.
    seen: dict[object, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        if cols[0] == "@code":
            if len(cols) != 4:
                raise ProfileError(f"{path}:{n}: @code needs value, scheme and meaning")
            into.codes.append((cols[1], cols[2], cols[3]))
            continue
        if len(cols) < 2:
            raise ProfileError(f"{path}:{n}: expected 'tag<TAB>action<TAB>name'")
        tag, action = cols[0].strip(), cols[1].strip()
        resolved = resolve(action)
        if resolved not in ACTIONS or any(resolve(a) not in ACTIONS for a in action.split("/")):
            raise ProfileError(f"{path}:{n}: action {action!r} is not one of D Z X K C U P (or X/Z, X/Z/D...)")
        if tag == "private":
            _once(seen, "private", tag, path, n)
            into.private = resolved
            continue
        m = _TAG.match(tag)
        if not m:
            raise ProfileError(f"{path}:{n}: tag {tag!r} is not (gggg,eeee) or 'private'")
        if "x" in tag.lower():
            mask, value = _mask(m.group(1), m.group(2))
            if mask & value & 0x10000:
                # Profile.action answers every odd (private) group with the 'private' line before
                # it looks at masks, so this line would load and never apply. Keeping a private
                # element also needs its private creator, which a tag pattern cannot say.
                raise ProfileError(f"{path}:{n}: tag {tag!r} is in an odd (private) group; private attributes "
                                   "follow the 'private' line only")
            _once(seen, (mask, value), tag, path, n)
            into.masks = [t for t in into.masks if (t[0], t[1]) != (mask, value)] + [(mask, value, resolved)]
        else:
            t = int(m.group(1) + m.group(2), 16)
            _once(seen, t, tag, path, n)
            into.exact[t] = resolved


def _once(seen: dict[object, int], key: object, tag: str, path: Path, n: int) -> None:
    if key in seen:
        raise ProfileError(f"{path}:{n}: tag {tag} is already on line {seen[key]} of this file")
    seen[key] = n


def load_profile(base: str = "basic", options: list[str] | tuple[str, ...] = ()) -> Profile:
    profile = Profile()
    for name in (base, *options):
        path = _path(name)
        read_table(path, profile)
        profile.names.append(path.stem)
    read_table(PSEUDONYMS, profile)
    return profile
