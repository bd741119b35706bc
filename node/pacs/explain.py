"""What a pull rule would do if it ran now, without contacting the PACS (``hilum rules test RULE``).

The routing rules' explain says why a rule matches a study; a pull rule matches nothing local, so its
explanation is what it would ask the source (the exact study-level keys of each C-FIND / QIDO query,
with the cohort expanded and the watch high-water mark applied), what it keeps of the answers (the
series filter), and when it runs next (the persisted next-run time once the node has scheduled it,
else the first run the scheduler would choose).
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from node.pacs.scheduler import first_run, poll_date, rule_queries
from node.rules.pull import PullRule


def explain_pull(rule: PullRule, rules_dir: Path, state, now: dt.datetime) -> dict:
    """``state``: the rule's pull_state row from the node's index, or None (never scheduled)."""
    spec = rule.spec
    date = poll_date(rule, now, state)
    queries, problem = [], None
    try:
        queries = [q.keys() for q in rule_queries(rule, date, rules_dir)]
    except (OSError, ValueError) as exc:  # e.g. the cohort file changed since the rules were loaded
        problem = str(exc)
    if state is not None:
        next_at, next_from = state["next_at"], "scheduled by the node"
    else:
        next_at, next_from = first_run(rule, now.timestamp()), "first run once the node loads the rule"
    last = state["last_run_at"] if state is not None else None
    return {
        "rule": rule.name, "where": rule.where(), "enabled": rule.enabled, "source": spec.source,
        "queries": queries, "query_problem": problem,
        "series_filter": spec.series,
        "watch": spec.watch, "high_water": state["high_water"] if state is not None else None,
        "every_s": spec.schedule.every, "window": spec.schedule.window,
        "window_open_now": spec.schedule.open_now(now),
        "next_run": dt.datetime.fromtimestamp(next_at).isoformat(timespec="seconds"), "next_run_from": next_from,
        "last_run": dt.datetime.fromtimestamp(last).isoformat(timespec="seconds") if last else None,
        "last_error": state["last_error"] if state is not None else None,
        "studies_per_run": spec.limits.studies_per_run, "instances_per_hour": spec.limits.instances_per_hour,
    }


def render_pull(e: dict) -> str:
    lines = [f"pull rule {e['rule']} ({e['where']}){'' if e['enabled'] else ' - DISABLED: never runs'}",
             f"  source: {e['source']}"]
    if e["query_problem"]:
        lines.append(f"  query: cannot be built now: {e['query_problem']}")
    else:
        lines.append(f"  {len(e['queries'])} study-level quer{'y' if len(e['queries']) == 1 else 'ies'} per run:")
        for keys in e["queries"][:20]:
            lines.append("    " + (", ".join(f"{k}={v}" for k, v in keys.items()) or "(no constraint: every study)"))
        if len(e["queries"]) > 20:
            lines.append(f"    ... and {len(e['queries']) - 20} more (one per cohort value)")
    lines.append("  series kept: " + (json.dumps(e["series_filter"]) if e["series_filter"] else "all (whole studies)"))
    if e["watch"]:
        lines.append(f"  watch: only what is new since the high-water mark {e['high_water'] or '(none yet)'}")
    window = f", only starting within {e['window']} (open now: {'yes' if e['window_open_now'] else 'no'})" \
        if e["window"] else ""
    lines.append(f"  schedule: every {e['every_s']:g} s{window}")
    lines.append(f"  next run: {e['next_run']} ({e['next_run_from']})")
    if e["last_run"]:
        lines.append(f"  last run: {e['last_run']}" + (f", error: {e['last_error']}" if e["last_error"] else ""))
    per_hour = e["instances_per_hour"]
    lines.append(f"  limits: {e['studies_per_run']} studies per run"
                 + (f", {per_hour} instances per hour" if per_hour else ""))
    return "\n".join(lines)
