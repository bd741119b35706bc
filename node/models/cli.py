"""``hilum model list|show|add|promote|shadow|retire``: the model registry from the command line.

Changes are files under the data directory (``node.models.versions``), so the CLI works beside a
running node: the next job a worker takes runs what was promoted, no restart. Every change is
audited with the operating-system user who made it.
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from node.config import ConfigError, load_settings
from node.models.card import CardError
from node.models.shadow import agreement_summary
from node.models.versions import ModelRegistry, RegistryError, change_state

__all__ = ["cli", "register_folder", "register_trained"]


def _stamp(t: float | None) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M") if t else "-"


def _list(registry: ModelRegistry, args) -> int:
    rows = [info.view() for name in registry.names() for info in registry.versions(name)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'model':<24} {'version':<12} {'state':<10} {'registered':<17} {'mean Dice':>9}")
    for r in rows:
        dice = (r["validation"] or {}).get("mean_dice")
        print(f"{r['name']:<24} {r['version']:<12} {r['state']:<10} {_stamp(r['registered_at']):<17} "
              f"{dice if dice is not None else '-':>9}")
    return 0


def _show(registry: ModelRegistry, args) -> int:
    versions = [i.view() for i in registry.versions(args.name)]
    out = {"model": args.name, "active": registry.resolve(args.name).version, "versions": versions,
           "shadow_agreement": {v: agreement_summary(registry.agreements(args.name, v))
                                for v in {r.get("shadow_version") for r in registry.agreements(args.name)}}}
    print(json.dumps(out, indent=1))
    return 0


def register_folder(registry: ModelRegistry, audit, folder: Path, by: str, version: str | None = None,
                    trace: dict | None = None) -> None:
    """Register a trained model folder as a candidate version, audited (``hilum model add``, ``hilum train
    --register``, a project's training run)."""
    info = registry.register(folder, by, version, trace)
    audit.model_changed(by, info.name, info.version, before=None, after=info.state,
                        detail={"sha256": info.sha256, "source": str(folder)})
    print(f"registered {info.name} {info.version} as candidate (sha256 {info.sha256[:12]})")


def register_trained(folder: Path, config: Path | None, data_dir: Path | None) -> int:
    """``hilum train --register``: the model just trained becomes a candidate version of the node."""
    from node.audit import open_audit

    try:
        settings = load_settings(config, data_dir=data_dir)
        register_folder(ModelRegistry.for_data_dir(settings.data_dir), open_audit(settings), folder,
                        f"train {getpass.getuser()}")
    except (ConfigError, RegistryError, CardError) as exc:
        print(f"hilum: not registered: {exc}", file=sys.stderr)
        return 1
    return 0


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hilum model", description="model versions: list, register, promote, "
                                "shadow, retire (changes are audited and reach the next job without a restart)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--config", help="YAML config file")
        sp.add_argument("--data-dir", dest="data_dir", type=Path)
        return sp

    ls = common(sub.add_parser("list", help="every model version and its state"))
    ls.add_argument("--json", action="store_true")
    common(sub.add_parser("show", help="one model: versions, metrics, shadow agreement")).add_argument("name")
    add = common(sub.add_parser("add", help="register a trained model folder as a candidate version"))
    add.add_argument("folder", type=Path)
    add.add_argument("--version", help="version name (default: the card's version)")
    for action, text in (("promote", "make VERSION the active one (the previous active is retired)"),
                         ("shadow", "run VERSION beside the active one, results kept on the node"),
                         ("retire", "stop running VERSION (kept for the record)")):
        sp = common(sub.add_parser(action, help=text))
        sp.add_argument("name")
        sp.add_argument("version")
    args = p.parse_args(argv)
    try:
        settings = load_settings(args.config, data_dir=args.data_dir)
    except ConfigError as exc:
        print(f"hilum: {exc}", file=sys.stderr)
        return 2
    registry = ModelRegistry.for_data_dir(settings.data_dir)
    by = f"cli {getpass.getuser()}"
    try:
        if args.cmd == "list":
            return _list(registry, args)
        if args.cmd == "show":
            return _show(registry, args)
        from node.audit import open_audit

        audit = open_audit(settings)
        if args.cmd == "add":
            register_folder(registry, audit, args.folder, by, args.version)
            return 0
        out = change_state(registry, audit, args.name, args.version, args.cmd, by)
        print(f"{out['model']} {out['version']}: {out['before']} -> {out['after']}"
              + (f"; retired {', '.join(out['retired'])}" if out["retired"] else "")
              + (f"; active version now {out['active']}" if out["active"] else ""))
        return 0
    except (RegistryError, CardError, KeyError) as exc:
        print(f"hilum: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1
