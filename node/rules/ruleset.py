"""A validated, immutable set of rules and the routing decision for a series or a study.

Semantics, per level (series rules route series, study rules route studies; the levels are
independent):
- enabled, non-fallback rules are evaluated by ascending ``order`` (ties: file name, then
  position in the file); every matching rule contributes its action;
- an ``exclusive`` rule that matches stops the evaluation of the rules after it;
- fallback rules are evaluated, in the same order and with the same exclusive behaviour, only
  when no non-fallback rule matched.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

from node.rules.explain import Explanation, explain_rules
from node.rules.facts import SeriesFacts, StudyFacts
from node.rules.loader import files_digest, load_rules, read_rule_files
from node.rules.rule import Action, Rule

__all__ = ["RuleSet"]


class RuleSet:
    def __init__(self, rules: Iterable[Rule], files: Mapping[str, str] | None = None) -> None:
        self.rules: tuple[Rule, ...] = tuple(sorted(rules, key=Rule.sort_key))
        self.files: dict[str, str] = dict(files or {})
        self.digest = files_digest(self.files)
        self._by_level: dict[str, tuple[tuple[Rule, ...], tuple[Rule, ...]]] = {}
        for level in ("series", "study"):
            active = [r for r in self.rules if r.level == level and r.enabled]
            self._by_level[level] = (tuple(r for r in active if not r.fallback),
                                     tuple(r for r in active if r.fallback))

    @classmethod
    def load(cls, rules_dir: str | os.PathLike, *, handlers: Callable[[str], type],
             destinations: Iterable[str], sources: Iterable[str] = ()) -> "RuleSet":
        """Load every rule file of ``rules_dir``; raises ``RuleErrors`` (never a traceback for an admin)."""
        return cls.from_files(read_rule_files(rules_dir), handlers=handlers, destinations=destinations,
                              sources=sources, base_dir=Path(rules_dir))

    @classmethod
    def from_files(cls, files: Mapping[str, str], *, handlers: Callable[[str], type],
                   destinations: Iterable[str], sources: Iterable[str] = (), base_dir: Path | None = None
                   ) -> "RuleSet":
        """Validate rule files given as name -> text (a proposed change, a past version)."""
        return cls(load_rules(files, handlers=handlers, destinations=destinations, sources=sources,
                              base_dir=base_dir), files)

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def pull_rules(self) -> list:
        """The enabled ``kind: pull`` rules (node/rules/pull.py), in order."""
        return [r for r in self.rules if r.level == "pull" and r.enabled]

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(f"no rule named {name!r}")

    def match_series(self, facts: SeriesFacts) -> list[Action]:
        return self._match("series", facts)

    def match_study(self, facts: StudyFacts) -> list[Action]:
        return self._match("study", facts)

    def _match(self, level: str, facts) -> list[Action]:
        main, fallbacks = self._by_level[level]
        actions = _first_pass(main, facts)
        return actions if actions else _first_pass(fallbacks, facts)

    def explain_series(self, facts: SeriesFacts) -> Explanation:
        return explain_rules([r for r in self.rules if r.level == "series"], "series", facts)

    def explain_study(self, facts: StudyFacts) -> Explanation:
        return explain_rules([r for r in self.rules if r.level == "study"], "study", facts)


def _first_pass(rules: tuple[Rule, ...], facts) -> list[Action]:
    actions = []
    for rule in rules:
        if rule.condition.test(facts):
            actions.append(rule.action)
            if rule.exclusive:
                break
    return actions
