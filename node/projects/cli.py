"""``hilum project create|list|show|accept``: learning-loop projects from the command line."""
from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path

import yaml

from node.config import ConfigError, load_settings
from node.projects.store import ProjectError, ProjectStore

__all__ = ["cli"]


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
                             "studies completing from now on that match become cases")
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
        store = ProjectStore.for_data_dir(load_settings(args.config, data_dir=args.data_dir).data_dir)
    except ConfigError as exc:
        print(f"hilum: {exc}", file=sys.stderr)
        return 2
    by = f"cli {getpass.getuser()}"
    try:
        if args.cmd == "create":
            project = store.create(args.name, model_card=args.model_card, train_config=args.train_config,
                                   study_uids=args.studies, annotators=args.annotators, by=by,
                                   select=args.select, viewers=args.viewers)
            print(f"project {project.name}: model {project.model}, {len(project.study_uids)} case(s)"
                  + (f" and the studies matching {args.select}" if args.select else "") + ", "
                  f"labels {', '.join(lab.name for lab in project.labels)}")
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
