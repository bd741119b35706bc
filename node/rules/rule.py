"""A loaded rule and the action it asks of the spine when it matches."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from node.rules.conditions import Condition

__all__ = ["Action", "Rule"]


@dataclass(frozen=True)
class Action:
    """What one matching rule asks for. The same object is returned on every match: do not mutate ``params``."""

    rule: str
    level: str  # "series" or "study"
    handler: str | None  # None: route-only, the originals are forwarded
    params: dict = field(default_factory=dict, hash=False)  # as validated by the handler's Params
    destinations: tuple[str, ...] = ()
    forward_originals: bool = False
    priority: str = "normal"  # "urgent", "normal" or "offpeak"
    timeout: float | None = None  # seconds
    stable_after: float | None = None  # seconds
    on_quality_failure: str = "refuse"  # or "deliver_with_warnings"
    priors: dict | None = field(default=None, hash=False)  # PriorsSpec as a dict (node/rules/priors.py)
    queue: str | None = None  # the Celery queue its jobs go to (default: by handler, executor.queues)

    def describe(self, only: Mapping[str, Sequence[str]] | None = None) -> str:
        """In words. ``only``: the modalities a destination is limited to (its config's
        ``modalities``), named beside it: "results to tps" would say a SEG goes where it does not."""
        only = only or {}
        names = ", ".join(f"{d} ({', '.join(only[d])} only)" if only.get(d) else d for d in self.destinations)
        parts = []
        if self.handler:
            params = json.dumps(self.params, sort_keys=True, separators=(", ", ": ")) if self.params else ""
            parts.append(f"run {self.handler}{' ' + params if params else ''}")
            if self.destinations:
                parts.append("results to " + names)
        if self.forward_originals:
            parts.append("forward originals to " + names)
        extras = [f"priority {self.priority}"] if self.priority != "normal" else []
        if self.timeout:
            extras.append(f"timeout {self.timeout:g} s")
        if self.stable_after:
            extras.append(f"stable after {self.stable_after:g} s")
        if self.handler and self.on_quality_failure != "refuse":
            extras.append("delivered with warnings when a quality check fails")
        if self.priors:
            extras.append(f"up to {self.priors['max']} prior(s) from {self.priors['source'] or 'the node'}")
        return "; ".join(parts) + (f" ({', '.join(extras)})" if extras else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["destinations"] = list(self.destinations)
        return d


@dataclass(frozen=True, eq=False)
class Rule:
    name: str
    description: str
    file: str
    line: int | None
    index: int  # position in its file
    enabled: bool
    order: int
    exclusive: bool
    fallback: bool
    level: str
    condition: Condition
    action: Action

    def sort_key(self) -> tuple:
        return (self.order, self.file, self.index)

    def where(self) -> str:
        return self.file + (f":{self.line}" if self.line else "")
