"""``hilum project create|list|show|accept``: learning-loop projects from the command line."""
from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path

import yaml

from node.config import ConfigError, load_settings
from node.projects.intake import complete_studies
from node.projects.store import ProjectError, ProjectStore

__all__ = ["cli"]


def _complete_studies(settings) -> list:
    """The studies complete in the node (none where no node has run on this data folder yet)."""
    if not (settings.data_dir / "index.db").is_file():
        return []
    from node.runtime import open_index  # the node's index: only when there is one to read

    return complete_studies(open_index(settings))


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hilum project", description="learning-loop projects: a model to train, "
                                "its task labels, its cases (studies in the archive) and annotators")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--config", help="YAML config file")
        sp.add_argument("--data-dir", dest="data_dir", type=Path)
        return sp

    create = common(sub.add_parser("create", help="create a project"))
    create.add_argument("name")
    create.add_argument("--model-card", dest="model_card", type=Path, required=True,
                        help="card.yaml (or its folder) of the model the project trains")
    create.add_argument("--train-config", dest="train_config", type=Path, required=True,
                        help="training configuration (labels with codes and data names)")
    create.add_argument("--study", dest="studies", action="append", default=[],
                        help="a case's StudyInstanceUID (repeat)")
    create.add_argument("--select", type=yaml.safe_load, default=None,
                        help="a study-level rule condition (YAML, e.g. '{Modality: CT, BodyPartExamined: CHEST}'): "
                             "the studies complete in the node that match become cases now, and those "
                             "completing later as they complete")
    create.add_argument("--new-only", dest="new_only", action="store_true",
                        help="with --select: only studies completing from now on, not those already in the node")
    create.add_argument("--annotator", dest="annotators", action="append", default=[], help="user name (repeat)")
    create.add_argument("--viewer", dest="viewers", action="append", default=None,
                        help="user who may only view the project (repeat); without any, every signed-in user may")
    common(sub.add_parser("list", help="projects and their case counts"))
    common(sub.add_parser("show", help="one project: labels, cases, states, label versions")).add_argument("name")
    acc = common(sub.add_parser("accept", help="accept a case's latest label as final"))
    acc.add_argument("name")
    acc.add_argument("study")
    args = p.parse_args(argv)
    try:
        settings = load_settings(args.config, data_dir=args.data_dir)
        store = ProjectStore.for_data_dir(settings.data_dir)
    except ConfigError as exc:
        print(f"hilum: {exc}", file=sys.stderr)
        return 2
    by = f"cli {getpass.getuser()}"
    try:
        if args.cmd == "create":
            if args.new_only and args.select is None:
                raise ProjectError("--new-only: goes with --select (it says which studies the condition looks at)")
            existing = [] if args.select is None or args.new_only else _complete_studies(settings)
            project = store.create(args.name, model_card=args.model_card, train_config=args.train_config,
                                   study_uids=args.studies, annotators=args.annotators, by=by,
                                   select=args.select, viewers=args.viewers, existing=existing)
            selected = len(set(store.cases(project.name)) - set(project.study_uids))
            print(f"project {project.name}: model {project.model}, {len(project.study_uids)} listed case(s)"
                  + (f", {selected} of the {len(existing)} complete studies in the node match {args.select} "
                     "and studies completing later that match will be added" if args.select and not args.new_only
                     else f", the studies completing from now on that match {args.select}" if args.select else "")
                  + f", labels {', '.join(lab.name for lab in project.labels)}")
        elif args.cmd == "list":
            for name in store.names():
                counts = store.summary(name)["counts"]
                print(f"{name}\t" + ", ".join(f"{k} {v}" for k, v in counts.items()))
        elif args.cmd == "show":
            print(json.dumps(store.summary(args.name), indent=1))
        else:
            case = store.accept(args.name, args.study, by)
            print(f"{args.study}: {case['state']}")
        return 0
    except (ProjectError, KeyError) as exc:
        print(f"hilum: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1
