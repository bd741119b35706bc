"""`hilum rules test|simulate|validate`: explain and replay routing without running anything."""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from node.config import ConfigError, load_settings
from node.handler_api import get_handler
from node.rules.errors import RuleErrors
from node.rules.explain import render_text
from node.rules.facts import StudyFacts
from node.rules.from_files import facts_from_paths
from node.rules.ruleset import RuleSet
from node.rules.simulate import simulate


def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 90m")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _limited(settings) -> dict[str, list[str]]:
    """The modalities of each destination that takes only some (its config's ``modalities``)."""
    return {name: d.modalities for name, d in settings.destinations.items() if d.modalities}


def _load(rules_dir: Path, settings) -> RuleSet:
    return RuleSet.load(rules_dir, handlers=get_handler, destinations=settings.destination_names,
                        sources=settings.sources)


def _index_studies(settings, since_s: float | None = None, study_uid: str | None = None) -> list[StudyFacts]:
    from node.route.router import series_facts
    from node.runtime import open_index

    index = open_index(settings)
    grouped: dict[str, list] = {}
    rows = index.series_of_study(study_uid) if study_uid else index.all_series(time.time() - since_s if since_s else 0.0)
    for row in rows:
        grouped.setdefault(row["study_uid"], []).append(series_facts(row))
    return [StudyFacts(series, uid) for uid, series in grouped.items()]


def _explain_pull(rule, settings, as_json: bool) -> int:
    import datetime as dt

    from node.pacs.explain import explain_pull, render_pull
    from node.runtime import open_index
    from node.store.retrieves import RetrieveStore

    state = RetrieveStore(open_index(settings)).pull_state(rule.name)  # None until the node has scheduled it
    e = explain_pull(rule, settings.rules_dir, state, dt.datetime.now())
    print(json.dumps(e, indent=1) if as_json else render_pull(e))
    return 0


def cli(argv: list[str]) -> int:
    # The node options go before or after the subcommand (`hilum rules test X --config F`, like
    # every other command): SUPPRESS keeps the one not given from overwriting the one given.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS)
    common.add_argument("--data-dir", dest="data_dir", type=Path, default=argparse.SUPPRESS)
    common.add_argument("--rules-dir", dest="rules_dir", type=Path, default=argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="hilum rules", parents=[common])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("test", parents=[common],
                       help="explain each rule against files/folders or a study in the index, "
                            "or what a pull rule would query and when it runs next")
    t.add_argument("target", help="a DICOM file or folder, a StudyInstanceUID known to the node, "
                                  "or the name of a pull rule")
    t.add_argument("--json", action="store_true")
    s = sub.add_parser("simulate", parents=[common], help="replay a proposed rule set over past studies")
    s.add_argument("--since", type=_duration, default=_duration("30d"))
    s.add_argument("--rules", type=Path, required=True, help="the proposed rules directory")
    s.add_argument("--json", action="store_true")
    sub.add_parser("validate", parents=[common], help="validate the rules directory")
    args = p.parse_args(argv)
    try:
        settings = load_settings(getattr(args, "config", None), data_dir=getattr(args, "data_dir", None),
                                 rules_dir=getattr(args, "rules_dir", None))
        active = _load(settings.rules_dir, settings)
        if args.cmd == "validate":
            print(f"{settings.rules_dir}: {len(active.rules)} rule(s), valid")
            return 0
        if args.cmd == "test":
            pull = next((r for r in active.rules if r.level == "pull" and r.name == args.target), None)
            if pull is not None:
                return _explain_pull(pull, settings, args.json)
            target = Path(args.target)
            if target.exists():
                read = facts_from_paths([target])
                studies = read.studies
                for skipped in read.skipped:
                    print(f"skipped (not a DICOM instance): {skipped}", file=sys.stderr)
            else:
                studies = _index_studies(settings, study_uid=args.target)
            if not studies:
                print(f"no DICOM series found for {args.target}", file=sys.stderr)
                return 1
            explanations = []
            for st in studies:
                explanations.extend(active.explain_series(s) for s in st.series)
                explanations.append(active.explain_study(st))
            if args.json:
                print(json.dumps([e.to_dict() for e in explanations], indent=1, default=str))
            else:
                print(render_text(explanations, only=_limited(settings)))
            return 0
        proposed = _load(args.rules, settings)
        report = simulate(active, proposed, _index_studies(settings, since_s=args.since))
        print(json.dumps(report.to_dict(), indent=1) if args.json else report.text(_limited(settings)))
        return 0
    except RuleErrors as exc:
        print(exc.text(), file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"hilum: {exc}", file=sys.stderr)
        return 2
