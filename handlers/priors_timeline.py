"""`priors-timeline`: the patient's earlier studies handed to the job (a rule's ``priors:``), listed
with their dates and the interval to the current study, as a text finding in an SR.

A glance at what a follow-up comparison would have to work with, and the check that priors
reach handlers in order: it refuses when a prior is not earlier than the current study or the
list is not most-recent-first (a wrong comparison is worse than none).
"""
from __future__ import annotations

from node.handler_api import Handler, HandlerInput, HandlerRefusal, register
from node.jobs.priors_input import acquired
from node.results import TextFinding


@register
class PriorsTimeline(Handler):
    name = "priors-timeline"
    version = "1.0"
    description = "Lists the prior studies a rule's priors: brought, with dates and intervals (SR text)"
    needs_pixels = False

    def run(self, inp: HandlerInput, progress) -> list:
        first = inp.primary.first
        current = acquired(str(first.get("StudyDate", "") or ""), str(first.get("StudyTime", "") or ""))
        dates = [p.acquired for p in inp.priors]
        if any(d is None for d in dates):
            raise HandlerRefusal("a prior study has no date: its interval cannot be stated")
        if dates != sorted(dates, reverse=True):
            raise HandlerRefusal("priors are not ordered most recent first")
        if current is not None and any(d >= current for d in dates):
            raise HandlerRefusal("a prior study is not earlier than the current study")
        lines = []
        for p in inp.priors:
            days = f", {(current - p.acquired).days} days earlier" if current else ""
            n = sum(len(s.datasets) for s in p.series)
            lines.append(f"{p.acquired:%Y-%m-%d %H:%M}{days}: {len(p.series)} series from {p.source}"
                         + (f" ({n} instances)" if n else ""))
        text = "Prior studies: " + ("; ".join(lines) if lines else "none")
        if inp.priors_note:
            text += f". Note: {inp.priors_note}"
        self.provenance["priors"] = [{"study_uid": p.study_uid, "acquired": p.acquired.isoformat(),
                                      "source": p.source, "series": len(p.series)} for p in inp.priors]
        self.provenance["priors_note"] = inp.priors_note
        progress(1.0, "listed")
        return [TextFinding(text=text, source_series_uid=inp.primary.series_uid)]
