"""Argument checks that name the offending field in their error."""
from __future__ import annotations

import math

import numpy as np


def fail(name: str, expected: str, value) -> ValueError:
    return ValueError(f"{name} must be {expected}, got {value!r}")


def int_in(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise fail(name, f"an integer in [{lo}, {hi}]", value)
    return int(value)


def float_in(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise fail(name, "a number", value) from None
    if isinstance(value, bool) or not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise fail(name, f"a number in {'(' if lo_open else '['}{lo}, {hi}]", value)
    return v


def vector(name: str, value, n: int) -> tuple[float, ...]:
    try:
        v = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise fail(name, f"{n} numbers", value) from None
    if len(v) != n or not all(math.isfinite(x) for x in v):
        raise fail(name, f"{n} finite numbers", value)
    return v


def choice(name: str, value, allowed: tuple) -> object:
    # Type must match too: 1 is not an acceptable spelling of True.
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise fail(name, f"one of {list(allowed)}", value)
    return value
