"""``hilum pacs``: echo a source, query it, queue retrieves in the node's index and follow them."""
from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path

from node.config import ConfigError, load_settings
from node.pacs.model import PacsError, StudyQuery, date_range, parse_span
from node.store.retrieves import TERMINAL


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hilum pacs", description="query and retrieve from PACS sources")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--config", help="YAML config file")
        sp.add_argument("--data-dir", dest="data_dir", type=Path)
        return sp

    e = common(sub.add_parser("echo", help="C-ECHO (DIMSE) or a QIDO-RS ping (DICOMweb) to a source"))
    e.add_argument("source")
    q = common(sub.add_parser("query", help="find studies on a source; marks those already in Hilum"))
    q.add_argument("source")
    q.add_argument("--patient-id", default="")
    q.add_argument("--accession", default="")
    q.add_argument("--modality", default="")
    q.add_argument("--study-date", default="", help="DICOM date or range, e.g. 20240101-20240131")
    q.add_argument("--description", default="", help="StudyDescription, * and ? wildcards")
    q.add_argument("--since", help="studies of the last 24h, 7d, 2w, 1y")
    q.add_argument("--limit", type=int, default=0)
    q.add_argument("--series", action="store_true", help="also list each study's series")
    q.add_argument("--json", action="store_true")
    r = common(sub.add_parser("retrieve", help="queue durable retrieves in the node's index (prints their ids)"))
    r.add_argument("source")
    r.add_argument("study_uids", nargs="+", metavar="STUDY_UID")
    r.add_argument("--series", action="append", help="only this series (repeatable)")
    r.add_argument("--wait", action="store_true", help="follow the retrieves until they end")
    r.add_argument("--timeout", type=float, default=3600.0)
    j = common(sub.add_parser("jobs", help="retrieve jobs and their progress"))
    j.add_argument("--status")
    j.add_argument("--limit", type=int, default=50)
    j.add_argument("--json", action="store_true")
    v = common(sub.add_parser("provenance", help="which retrieves (who or which rule) brought a study's instances in"))
    v.add_argument("study_uid")
    v.add_argument("--json", action="store_true")
    for name, text in (("cancel", "cancel a retrieve"), ("retry", "retry a failed, partial or cancelled retrieve")):
        c = common(sub.add_parser(name, help=text))
        c.add_argument("retrieve_id", type=int)
    return p


def _settings(args):
    return load_settings(args.config, **({"data_dir": args.data_dir} if args.data_dir else {}))


def _store(settings):
    from node.runtime import open_index
    from node.store.retrieves import RetrieveStore

    return RetrieveStore(open_index(settings))


def _audit(settings):
    from node.audit import open_audit

    return open_audit(settings)


def cmd_echo(args) -> int:
    from node.pacs.sources import source_client

    settings = _settings(args)
    rtt = source_client(settings, args.source).echo()
    print(f"{args.source}: ok ({rtt * 1000:.0f} ms)")
    return 0


def cmd_query(args) -> int:
    from node.pacs.audit import query_audit
    from node.pacs.sources import source_client

    settings = _settings(args)
    client = source_client(settings, args.source)
    date = args.study_date or (date_range(parse_span(args.since)) if args.since else "")
    q = StudyQuery(patient_id=args.patient_id, accession=args.accession, modality=args.modality, study_date=date,
                   study_description=args.description)
    who = f"cli {getpass.getuser()}"
    try:
        matches, bad = client.find_studies(q, args.limit)
    except PacsError as exc:
        query_audit(_audit(settings), who=who, source=args.source, keys=q.keys(), matches=0, error=str(exc))
        raise
    query_audit(_audit(settings), who=who, source=args.source, keys=q.keys(), matches=len(matches),
                warnings=client.warnings)
    held = _store(settings).held_studies([m.study_uid for m in matches])
    rows = []
    for m in matches:
        d = m.as_dict() | {"in_hilum": m.study_uid in held}
        if args.series:
            d["series"] = [s.as_dict() for s in client.find_series(m.study_uid)[0]]
        rows.append(d)
    if args.json:
        print(json.dumps({"matches": rows, "malformed": bad, "warnings": client.warnings}, indent=1))
        return 0
    print(f"{'':1} {'date':<8} {'patient':<12} {'accession':<12} {'mod':<6} {'n':>5}  {'description':<24} study")
    for d in rows:
        print(f"{'*' if d['in_hilum'] else ' ':1} {d['study_date']:<8} {d['patient_id'][:12]:<12} "
              f"{d['accession'][:12]:<12} {'/'.join(d['modalities'])[:6]:<6} "
              f"{d['instances'] if d['instances'] is not None else '?':>5}  {d['description'][:24]:<24} "
              f"{d['study_uid']}")
        for s in d.get("series", []):
            print(f"{'':40}   series {s['number']:>3} {s['modality']:<3} {s['instances'] or '?':>5} "
                  f"{s['description'][:30]:<30} {s['series_uid']}")
    print(f"{len(rows)} stud{'y' if len(rows) == 1 else 'ies'} (* already in Hilum)"
          + (f"; {bad} malformed answer(s) skipped" if bad else ""))
    for w in client.warnings:
        print(f"warning: {w}")
    return 0


def cmd_retrieve(args) -> int:
    settings = _settings(args)
    if args.source not in settings.sources:
        raise KeyError(f"no source named {args.source!r} (sources: {', '.join(sorted(settings.sources)) or 'none'})")
    store = _store(settings)
    ids = [store.add(args.source, uid, args.series, f"cli {getpass.getuser()}")[0] for uid in args.study_uids]
    print(" ".join(map(str, ids)))
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        rows = [store.get(i) for i in ids]
        if all(r["status"] in TERMINAL for r in rows):
            for r in rows:
                print(_line(r))
            return 0 if all(r["status"] == "done" for r in rows) else 1
        time.sleep(0.5)
    print("hilum: timed out waiting for the retrieves (they go on in the node)", file=sys.stderr)
    return 1


def _line(r) -> str:
    exp = r["expected"] if r["expected"] is not None else "?"
    return (f"{r['id']:>5} {r['status']:<10} {r['source']:<10} {r['received']:>5}/{exp:<5} "
            f"ok {r['completed']} failed {r['failed']} warn {r['warning']}  {r['study_uid']}"
            + (f"  {r['error']}" if r["error"] else ""))


def cmd_jobs(args) -> int:
    rows = _store(_settings(args)).list(args.status, limit=args.limit)
    if args.json:
        print(json.dumps([dict(r) for r in rows], indent=1))
        return 0
    for r in rows:
        print(_line(r))
    return 0


def cmd_provenance(args) -> int:
    rows = _store(_settings(args)).provenance(args.study_uid)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no instance of {args.study_uid} was brought by a retrieve (pushed to the node, or not held)")
        return 0
    for p in rows:
        series = ", ".join(f"{uid} ({n})" for uid, n in p["series"].items())
        print(f"retrieve {p['retrieve']} by {p['requested_by']} from {p['source']} ({p['method']}, {p['status']}): "
              f"{p['instances']} instance(s): {series}")
    return 0


def cmd_cancel_retry(args) -> int:
    store = _store(_settings(args))
    fn = store.cancel if args.cmd == "cancel" else store.retry
    if not fn(args.retrieve_id, f"cli {getpass.getuser()}"):
        print(f"hilum: retrieve {args.retrieve_id} cannot be {'cancelled' if args.cmd == 'cancel' else 'retried'} "
              "(unknown, or not in a state that allows it)", file=sys.stderr)
        return 1
    print(f"retrieve {args.retrieve_id}: {args.cmd} requested")
    return 0


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    fn = {"echo": cmd_echo, "query": cmd_query, "retrieve": cmd_retrieve, "jobs": cmd_jobs,
          "provenance": cmd_provenance,
          "cancel": cmd_cancel_retry, "retry": cmd_cancel_retry}[args.cmd]
    try:
        return fn(args)
    except ConfigError as exc:
        print(f"hilum: {exc}", file=sys.stderr)
        return 2
    except (KeyError, ValueError) as exc:
        print(f"hilum: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except PacsError as exc:
        print(f"hilum: {exc}", file=sys.stderr)
        return 1
