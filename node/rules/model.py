"""The schema of one rule as an admin writes it (the condition itself is compiled by conditions.py)."""
from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from node.rules.priors import PriorsSpec

__all__ = ["RuleSpec", "HandlerSpec", "parse_duration", "MAX_DURATION_S", "RULE_FIELDS"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$")
_UNIT = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


MAX_DURATION_S = 7 * 86400  # timeout, stable_after: a week is already far past any real job or series


def parse_duration(v: Any, max_s: float = MAX_DURATION_S) -> float:
    """Seconds from 90, 2.5, '90s', '5m', '1h'; ValueError with the accepted forms otherwise."""
    if isinstance(v, bool):
        raise ValueError("expected a duration like 90, '90s', '5m' or '1h', not true/false")
    if isinstance(v, (int, float)):
        seconds = float(v)
    else:
        m = _DURATION.match(v) if isinstance(v, str) else None
        if not m:
            raise ValueError(f"expected a duration like 90, '90s', '5m' or '1h', got {v!r}")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    # YAML reads .nan and .inf as floats: NaN passes every `<=` check and later crashes whatever
    # turns it into a date or timer (the pull scheduler's thread died of it), so refuse it here.
    if not math.isfinite(seconds):
        raise ValueError(f"expected a duration like 90, '90s', '5m' or '1h', not {v!r}")
    if seconds <= 0:
        raise ValueError("a duration must be more than zero seconds")
    if seconds > max_s:
        raise ValueError(f"a duration must be at most {_words(max_s)} ({max_s:g} s), got {seconds:g} s")
    return seconds


def _words(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:g} day{'s' if days != 1 else ''}" if days >= 1 else f"{seconds / 3600:g} h"


class HandlerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class RuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    description: str = ""
    enabled: StrictBool = True
    order: int = 100  # lower runs first; equal orders run in file-name order
    exclusive: StrictBool = False  # when it matches, later rules of the same level are not evaluated
    fallback: StrictBool = False  # applies only when no non-fallback rule of the same level matched
    level: Literal["series", "study"] = "series"
    match: dict[str, Any]
    handler: HandlerSpec | None = None
    destinations: list[str] = Field(default_factory=list)
    forward_originals: StrictBool | None = None  # default: true for route-only rules, false otherwise
    stable_after: float | None = None  # seconds without new instances before the series/study counts as complete
    priority: Literal["urgent", "normal", "offpeak"] = "normal"
    timeout: float | None = None  # seconds a job may run
    # A result that fails a quality check (plausibility, validated domain, confidence): refuse the job
    # (nothing delivered), or deliver with the warning in every object and on the console.
    on_quality_failure: Literal["refuse", "deliver_with_warnings"] = "refuse"
    priors: PriorsSpec | None = None  # the patient's earlier studies the job is handed (node/rules/priors.py)
    queue: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_.\-]{0,63}$")  # executor queue (gpu, cpu…), celery only

    @field_validator("handler", mode="before")
    @classmethod
    def _handler_by_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("stable_after", "timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @field_validator("destinations")
    @classmethod
    def _unique_destinations(cls, v: list[str]) -> list[str]:
        dupes = sorted({d for d in v if v.count(d) > 1})
        if dupes:
            raise ValueError(f"destination {', '.join(dupes)} is listed twice")
        return v

    @model_validator(mode="after")
    def _does_something(self) -> "RuleSpec":
        if self.handler is None and not self.destinations:
            raise ValueError("the rule does nothing: give it a handler, destinations, or both")
        if self.handler is None and self.forward_originals is False:
            raise ValueError("a rule without a handler forwards the originals; forward_originals: false "
                             "leaves it nothing to do")
        if self.priors is not None and self.handler is None:
            raise ValueError("priors: only a rule with a handler can use priors")
        if self.forward_originals and not self.destinations:
            raise ValueError("forward_originals needs at least one destination")
        return self


RULE_FIELDS = tuple(RuleSpec.model_fields)
