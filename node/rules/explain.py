"""Why each rule did or did not match, and what would be done (``hilum rules test``).

The explanation follows exactly the semantics of ``RuleSet.match_*`` (order, exclusive,
fallback) but also evaluates rules that routing would skip, so an admin sees that a disabled
or shadowed rule *would* have matched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from node.rules.conditions import Failure
from node.rules.rule import Action, Rule

__all__ = ["RuleOutcome", "Explanation", "explain_rules", "render_text"]


@dataclass(frozen=True)
class RuleOutcome:
    rule: str
    where: str  # file:line
    order: int
    flags: tuple[str, ...]  # "exclusive", "fallback", "disabled"
    status: str  # "matched", "not_matched", "disabled", "skipped"
    holds: bool  # whether the condition holds, even when the rule was not applied
    reason: str  # one line in words
    failure: Failure | None  # the first condition that failed, with the actual value
    action: Action  # what the rule does when it applies

    def to_dict(self) -> dict:
        return {
            "rule": self.rule, "where": self.where, "order": self.order, "flags": list(self.flags),
            "status": self.status, "holds": self.holds, "reason": self.reason,
            "failure": None if self.failure is None else {
                "path": self.failure.path, "condition": self.failure.condition, "actual": self.failure.actual},
            "action": self.action.to_dict(),
        }


@dataclass(frozen=True)
class Explanation:
    level: str
    uid: str  # series or study instance UID
    subject: str  # a short label, e.g. "series 1.2.3 (CT, Thorax, 120 instances)"
    outcomes: tuple[RuleOutcome, ...] = field(default_factory=tuple)
    actions: tuple[Action, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"level": self.level, "uid": self.uid, "subject": self.subject,
                "rules": [o.to_dict() for o in self.outcomes], "actions": [a.to_dict() for a in self.actions]}

    def text(self) -> str:
        return render_text([self])


def explain_rules(rules: Sequence[Rule], level: str, facts) -> Explanation:
    main = [r for r in rules if not r.fallback]
    fallbacks = [r for r in rules if r.fallback]
    outcomes, actions = _pass(main, facts, None)
    if actions:
        names = ", ".join(a.rule for a in actions)
        more, _ = _pass(fallbacks, facts, f"fallback not needed: {names} matched")
    else:
        more, actions = _pass(fallbacks, facts, None)
    uid = facts.series_uid if level == "series" else facts.study_uid
    return Explanation(level, uid, facts.label(), tuple(outcomes + more), tuple(actions))


def _pass(rules: Sequence[Rule], facts, skip_reason: str | None) -> tuple[list[RuleOutcome], list[Action]]:
    outcomes: list[RuleOutcome] = []
    actions: list[Action] = []
    for rule in rules:
        holds = rule.condition.test(facts)
        failure = None if holds else rule.condition.failure(facts)
        would = "its condition holds" if holds else f"it would not match: {failure}"
        if not rule.enabled:
            status, reason = "disabled", f"disabled; {would}"
        elif skip_reason:
            status, reason = "skipped", f"{skip_reason}; {would}"
        elif holds:
            status, reason = "matched", rule.condition.evidence(facts)
            actions.append(rule.action)
            if rule.exclusive:
                skip_reason = f"not evaluated: exclusive rule '{rule.name}' matched first"
        else:
            status, reason = "not_matched", str(failure)
        flags = tuple(f for f, on in (("exclusive", rule.exclusive), ("fallback", rule.fallback),
                                      ("disabled", not rule.enabled)) if on)
        outcomes.append(RuleOutcome(rule.name, rule.where(), rule.order, flags, status, holds, reason,
                                    failure, rule.action))
    return outcomes, actions


_MARK = {"matched": "[match]   ", "not_matched": "[no match]", "disabled": "[disabled]", "skipped": "[skipped] "}


def render_text(explanations: Sequence[Explanation], only: Mapping[str, Sequence[str]] | None = None) -> str:
    """Plain text for a terminal: one block per series or study. ``only``: the modalities each
    destination limited to some takes (``Action.describe``)."""
    lines: list[str] = []
    for ex in explanations:
        lines.append(f"{ex.level.capitalize()} rules for {ex.subject}")
        if not ex.outcomes:
            lines.append(f"  (no {ex.level}-level rules)")
        for o in ex.outcomes:
            flags = "".join(f", {f}" for f in o.flags if f != "disabled")
            lines.append(f"  {_MARK[o.status]} {o.rule}  ({o.where}, order {o.order}{flags})")
            lines.append(f"               {o.reason}")
            if o.status == "matched":
                lines.append(f"               -> {o.action.describe(only)}")
        if ex.actions:
            lines.append(f"  => {len(ex.actions)} action{'s' if len(ex.actions) != 1 else ''}:")
            lines.extend(f"     {a.rule}: {a.describe(only)}" for a in ex.actions)
        else:
            lines.append("  => nothing to do")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
