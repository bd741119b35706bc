"""The node's side of quality flags: a job whose results (or input) failed a quality check is refused,
or, where its rule says ``on_quality_failure: deliver_with_warnings``, delivered with the warning in
every object it writes and in the job's history (which the console and the API show).

A handler only reports what it found (``node.results.QualityFlag``); what happens then is the rule's
decision, taken here, so every handler (classical, model, registration, nodules) behaves the same.
"""
from __future__ import annotations

from node.handler_api import HandlerRefusal
from node.results import QualityFlag, TextFinding

__all__ = ["POLICIES", "QualityPolicy", "warning_findings"]

POLICIES = ("refuse", "deliver_with_warnings")
WARNING_PREFIX = "QUALITY WARNING"


class QualityPolicy:
    """What the job's rule asked for; ``refuse`` when the job has no option (older jobs, direct runs)."""

    def __init__(self, options: dict | None) -> None:
        value = (options or {}).get("on_quality_failure", "refuse")
        if value not in POLICIES:
            raise ValueError(f"on_quality_failure must be one of {', '.join(POLICIES)}, got {value!r}")
        self.deliver_with_warnings = value == "deliver_with_warnings"

    def enforce(self, flags: list[QualityFlag], stage: str) -> None:
        """Raise HandlerRefusal naming every failed check, unless the rule delivers with warnings.
        Coverage flags (a structure only partly scanned) never refuse: what was scanned is measured
        right, and the warning is written into every object either way."""
        failed = [f for f in flags if f.kind != "coverage"]
        if failed and not self.deliver_with_warnings:
            listed = "; ".join(f.text for f in failed)
            raise HandlerRefusal(f"{stage} failed {len(failed)} quality check(s), nothing delivered: {listed}")


def warning_findings(flags: list[QualityFlag], series_uid: str) -> list[TextFinding]:
    """One SR text finding per flag, so the report read next to the images says what is wrong."""
    return [TextFinding(text=f"{WARNING_PREFIX}: {f.text}", source_series_uid=series_uid) for f in flags]
