"""``hilum audit verify|search|export``."""
from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from node.audit import open_log, search, verify
from node.audit.query import matches
from node.audit.trail import AuditTrail
from node.config import ConfigError, load_settings
from node.keyfile import KeyFileError


def _when(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or date-time (2024-05-01, 2024-05-01T10:00)")
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", help="active participant: user name, AE title or 'handler:NAME'")
    p.add_argument("--study", dest="study_uid", help="StudyInstanceUID")
    p.add_argument("--event", help="event name, e.g. association, study-received, delivery, login")
    p.add_argument("--since", type=_when, help="ISO date/time (UTC unless it says otherwise)")
    p.add_argument("--until", type=_when, help="ISO date/time, exclusive")


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hilum audit")
    p.add_argument("--config")
    p.add_argument("--data-dir", dest="data_dir", type=Path)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("verify", help="check the HMAC chain; names every modified, removed or reordered entry")
    s = sub.add_parser("search", help="matching entries as JSON lines, newest first")
    _filters(s)
    s.add_argument("--limit", type=int, default=200)
    e = sub.add_parser("export", help="entries as JSON lines (file or stdout) or to a syslog collector (RFC 5424)")
    _filters(e)
    where = e.add_mutually_exclusive_group()
    where.add_argument("--jsonl", default="-", help="output file; '-' for standard output (default)")
    where.add_argument("--syslog", metavar="HOST:PORT")
    e.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    args = p.parse_args(argv)
    try:
        settings = load_settings(args.config, data_dir=args.data_dir)
        chain = open_log(settings)
    except (ConfigError, KeyFileError) as exc:
        print(f"hilum audit: {exc}", file=sys.stderr)
        return 2

    if args.cmd == "verify":
        verdict = verify(chain)
        for problem in verdict.problems:
            print(f"{chain.path}: {problem}")
        print(f"{chain.path}: {verdict.entries} entries, " + ("chain intact" if verdict.ok else
                                                              f"{len(verdict.problems)} problem(s)"))
        return 0 if verdict.ok else 1

    criteria = {k: getattr(args, k) for k in ("user", "study_uid", "event", "since", "until")}
    who = f"cli {getpass.getuser()}"
    trail = AuditTrail(chain, settings.ae_title)
    if args.cmd == "search":
        found = search(chain.entries(), limit=args.limit, **criteria)
        for entry in found:
            print(json.dumps(entry, ensure_ascii=False))
        trail.audit_log_used(who, {"search": _shown(criteria), "results": len(found)})
        return 0

    selected = (entry for entry in chain.entries() if matches(entry, **criteria))
    if args.syslog:
        from node.audit import syslog

        try:
            host, port = syslog.parse_target(args.syslog)
            n = syslog.send(selected, host, port, args.transport)
        except (OSError, ValueError) as exc:
            print(f"hilum audit: export to {args.syslog} failed: {exc}", file=sys.stderr)
            return 1
        target = f"syslog {args.transport}://{host}:{port}"
    else:
        out = sys.stdout if args.jsonl == "-" else open(args.jsonl, "w", encoding="utf-8")
        try:
            n = 0
            for entry in selected:
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                n += 1
        finally:
            if out is not sys.stdout:
                out.close()
        target = "stdout" if args.jsonl == "-" else args.jsonl
    trail.audit_log_used(who, {"export": target, "criteria": _shown(criteria), "entries": n})
    print(f"exported {n} entries to {target}", file=sys.stderr)
    return 0


def _shown(criteria: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in criteria.items() if v is not None}
