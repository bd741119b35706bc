"""Routing rules: declarative YAML conditions -> handler jobs and destinations (docs/rules.md)."""
from node.rules.errors import RuleError, RuleErrors
from node.rules.explain import Explanation, RuleOutcome, render_text
from node.rules.facts import SeriesFacts, StudyFacts
from node.rules.rule import Action, Rule
from node.rules.ruleset import RuleSet
from node.rules.service import ReloadResult, RulesService
from node.rules.simulate import SimulationReport, simulate

__all__ = [
    "Action", "Explanation", "ReloadResult", "Rule", "RuleError", "RuleErrors", "RuleOutcome", "RuleSet",
    "RulesService", "SeriesFacts", "SimulationReport", "StudyFacts", "render_text", "simulate",
]
