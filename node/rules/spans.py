"""Lengths of time as admins write them in rules: ``90s``, ``30m``, ``24h``, ``7d``, ``2w``, ``5y``."""
from __future__ import annotations

import math
import re
from typing import Any

_SPAN = re.compile(r"^\s*(\d+)\s*([smhdwy])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}

MAX_SPAN_S = 50 * 365 * 86400  # longer than any patient's record: a typo, or .inf


def parse_span_s(v: Any) -> float:
    """Seconds from a number or a span like '30m', '24h', '7d', '2w', '5y' (at most 50 years)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
        seconds = float(v)  # NaN fails `v > 0` (refused below); .inf passes it, hence the bound
    else:
        m = _SPAN.match(v) if isinstance(v, str) else None
        if not m or int(m.group(1)) == 0:
            raise ValueError(f"expected a span like '90s', '30m', '24h', '7d', '2w' or '5y', got {v!r}")
        seconds = float(int(m.group(1)) * _SECONDS[m.group(2)])
    if not math.isfinite(seconds) or seconds > MAX_SPAN_S:
        raise ValueError(f"a span must be at most 50 years (50y), got {v!r}")
    return seconds
