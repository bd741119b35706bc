"""The ``hilum`` command."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import tempfile
import sys
import time
from pathlib import Path

from node.config import ConfigError, Settings, load_settings
from node.web.auth import ROLES, TOKEN_ROLES


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: getattr(args, k, None) for k in Settings.model_fields}
    return load_settings(getattr(args, "config", None), **overrides)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--data-dir", dest="data_dir", type=Path)


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def cmd_up(args: argparse.Namespace) -> int:
    import uvicorn

    from node import logs
    from node.runtime import Node
    from node.tls import uvicorn_tls_options
    from node.web.app import create_app

    settings = _settings(args)
    logs.configure(settings.log_level)
    node = Node(settings)
    try:
        node.start()
    except Exception as exc:  # noqa: BLE001 - start-up errors are reported, not dumped
        print(f"hilum: cannot start: {exc}", file=sys.stderr)
        node.stop()
        return 1
    server = uvicorn.Server(uvicorn.Config(create_app(node), host=settings.web_host, port=settings.web_port,
                                           log_level="warning", access_log=False,
                                           **uvicorn_tls_options(settings.web_tls)))
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down; with the default handler that
    # would kill the process before node.stop() runs, so turn it into an exception here.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        server.run()  # returns on SIGINT/SIGTERM
    except SystemExit:
        pass
    finally:
        node.stop()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from node.runtime import open_index
    from node.web.auth import create_token

    from node.audit import open_audit

    settings = _settings(args)
    token = create_token(open_index(settings), args.role, args.label)
    open_audit(settings).token_created(args.role, args.label, by=f"cli {getpass.getuser()}")
    print(token)
    return 0


def _read_password() -> str:
    """From the terminal (asked twice), or the first line of standard input when it is not one."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def cmd_user(args: argparse.Namespace) -> int:
    from node.runtime import open_index
    from node.web.users import set_user

    index = open_index(_settings(args))
    if args.ucmd == "list":
        for row in index.users():
            print(f"{row['name']}\t{row['role']}")
        return 0
    if args.ucmd == "remove":
        if not index.delete_user(args.name):
            print(f"hilum: no user {args.name!r}", file=sys.stderr)
            return 1
        return 0
    try:
        created = set_user(index, args.name, _read_password(), args.role)
    except ValueError as exc:
        print(f"hilum: {exc}", file=sys.stderr)
        return 2
    print(f"user {args.name} {'created' if created else 'updated'} ({args.role})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from node.runtime import open_index
    from node.web.views import cluster_summary, job_view, study_summary

    settings = _settings(args)
    index = open_index(settings)
    if args.study:
        return _study_status(index, args.study, args.json)
    cluster = cluster_summary(index, settings.executor.kind, _queue_lengths(settings, index))
    studies = []
    for row in index.studies(args.limit, 0):
        s = study_summary(row)
        s["jobs"] = [job_view(index, j) for j in index.jobs(study_uid=row["study_uid"])]
        studies.append(s)
    if args.json:
        out = {"studies": studies, "duplicates": index.stat("duplicates"), "quarantined": index.stat("quarantined")}
        if settings.executor.kind == "celery":
            out["cluster"] = cluster
        print(json.dumps(out, indent=1))
        return 0
    print(f"{'study':<48} {'inst':>5} {'stable':<6} jobs")
    for s in studies:
        jobs = ", ".join([f"{j['handler']}:{j['status']}" + (f" ({len(j['quality_warnings'])} quality warning(s))"
                                                               if j["quality_warnings"] else "")
                          for j in s["jobs"]] + [
            f"{p['handler'] or p['rule']}:waiting until {time.strftime('%H:%M:%S', time.localtime(p['fires_at']))}"
            for p in s["pending_rules"]]) or s.get("route_note") or "-"
        print(f"{s['study_uid'][:48]:<48} {s['instances_received']:>5} {str(s['stable']).lower():<6} {jobs}")
    print(f"duplicates {index.stat('duplicates')}, quarantined {index.stat('quarantined')}")
    if settings.executor.kind == "celery":
        import time

        queues = cluster["queues"]
        print("queues: " + (", ".join(f"{q} {n}" for q, n in sorted(queues.items())) if queues is not None
                            else "unknown (broker unreachable)"))
        for w in cluster["workers"]:
            print(f"worker {w['name']} on {w['host']} [{','.join(w['queues'])}] "
                  f"{'job ' + str(w['current_job']) if w['current_job'] is not None else 'idle'}, "
                  f"last heartbeat {time.time() - w['last_seen']:.0f} s ago")
    return 0


def _study_status(index, study_uid: str, as_json: bool) -> int:
    """One study: its series, where each came from (pushed by which AE, or retrieved by which pull
    rule or user from which source), and its jobs."""
    from node.web.views import job_view, origin_lines, series_views, study_summary

    row = index.study(study_uid)
    if row is None:
        print(f"hilum: study {study_uid} not found", file=sys.stderr)
        return 1
    s = study_summary(row)
    s["series"] = series_views(index, study_uid)
    s["jobs"] = [job_view(index, j) for j in index.jobs(study_uid=study_uid)]
    if as_json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"study {study_uid}: {s['instances_received']} instance(s), {'stable' if s['stable'] else 'receiving'}")
    for x in s["series"]:
        print(f"  series {x['series_uid']} {x['modality'] or ''} {x['description'] or ''} ({x['instances']})")
        for line in origin_lines(x["origin"]):
            print(f"    {line}")
    for j in s["jobs"]:
        print(f"  job {j['id']} {j['rule']} -> {j['handler']}: {j['status']}")
    return 0


def _queue_lengths(settings: Settings, index) -> dict[str, int] | None:
    if settings.executor.kind != "celery":
        return None
    from node.jobs.broker import BrokerView

    ex = settings.executor
    queues = {ex.default_queue, *ex.queues.values(), *(q for w in index.workers() for q in json.loads(w["queues"]))}
    view = BrokerView(ex.broker_url)
    try:
        return view.queue_lengths(sorted(queues))
    finally:
        view.close()


def cmd_retry(args: argparse.Namespace) -> int:
    from node.jobs.admin import retry
    from node.runtime import open_index

    try:
        print(retry(open_index(_settings(args)), args.job_id, who="cli"))
    except KeyError as exc:
        print(f"hilum: {exc.args[0]}", file=sys.stderr)
        return 1
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from node.send import send_paths

    ok, failed = send_paths(args.paths, args.host, args.port, args.aet, args.calling_aet)
    print(f"sent {ok}, failed {failed}")
    return 0 if failed == 0 else 1


def cmd_worker(args: argparse.Namespace) -> int:
    import socket

    from node import logs
    from node.jobs.remote import serve, serve_many

    logs.configure("INFO")
    token = Path(args.token_file).read_text().strip()
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    if args.concurrency > 1:
        base = ["--node", args.node, "--token-file", str(args.token_file), "--queues", args.queues,
                "--work-dir", str(args.work_dir)] + (["--ca-file", str(args.ca_file)] if args.ca_file else [])
        return serve_many(base, name, args.concurrency)
    import httpx

    try:
        serve(args.node, token, queues, name, Path(args.work_dir), verify=str(args.ca_file) if args.ca_file else True)
    except httpx.HTTPError as exc:  # the node unreachable, untrusted, or refusing the token: said plainly
        print(f"hilum: worker cannot use the node at {args.node}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_phantom(argv: list[str]) -> int:
    from node.phantom import cli

    return cli(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hilum", description="Hilum DICOM AI node")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run the node in the foreground")
    _add_common(up)
    up.add_argument("--ae-title", dest="ae_title")
    up.add_argument("--dicom-port", dest="dicom_port", type=int)
    up.add_argument("--web-port", dest="web_port", type=int)
    up.add_argument("--orthanc-http-port", dest="orthanc_http_port", type=int)
    up.add_argument("--orthanc-dicom-port", dest="orthanc_dicom_port", type=int)
    up.add_argument("--rules-dir", dest="rules_dir", type=Path)
    up.add_argument("--stable-after", dest="stable_after", type=float, help="quiet seconds before complete")
    up.set_defaults(func=cmd_up)

    tok = sub.add_parser("token", help="API tokens").add_subparsers(dest="tcmd", required=True)
    create = tok.add_parser("create", help="create a token (printed once)")
    _add_common(create)
    create.add_argument("--role", choices=TOKEN_ROLES, required=True)
    create.add_argument("--label")
    create.set_defaults(func=cmd_token)

    usr = sub.add_parser("user", help="console users").add_subparsers(dest="ucmd", required=True)
    add = usr.add_parser("add", help="create a user or reset its password and role (password from stdin or prompt)")
    _add_common(add)
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    add.set_defaults(func=cmd_user)
    for name, text in (("list", "list users"), ("remove", "remove a user")):
        u = usr.add_parser(name, help=text)
        _add_common(u)
        if name == "remove":
            u.add_argument("name")
        u.set_defaults(func=cmd_user)

    st = sub.add_parser("status", help="studies, jobs and deliveries")
    _add_common(st)
    st.add_argument("--json", action="store_true")
    st.add_argument("--limit", type=int, default=20)
    st.add_argument("--study", metavar="STUDY_UID", help="one study: its series, where each came from, its jobs")
    st.set_defaults(func=cmd_status)

    rt = sub.add_parser("retry", help="re-run a failed job or re-send its failed deliveries")
    _add_common(rt)
    rt.add_argument("job_id", type=int)
    rt.set_defaults(func=cmd_retry)

    send = sub.add_parser("send", help="send DICOM files or folders by C-STORE")
    send.add_argument("paths", nargs="+", type=Path)
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=11112)
    send.add_argument("--aet", default="HILUM", help="called AE title")
    send.add_argument("--calling-aet", dest="calling_aet", default="HILUMSCU")
    send.set_defaults(func=cmd_send)

    wk = sub.add_parser("worker", help="run jobs for a node from its Celery queues (executor.kind: celery)")
    wk.add_argument("--node", required=True, help="the node's web URL, e.g. https://node:8443")
    wk.add_argument("--token-file", dest="token_file", type=Path, required=True, help="a worker-role token")
    wk.add_argument("--queues", default="cpu", help="comma-separated queues to take jobs from")
    wk.add_argument("--concurrency", type=int, default=1, help="jobs at once (one process each)")
    wk.add_argument("--name", help="worker name in job histories (default host-pid)")
    wk.add_argument("--work-dir", dest="work_dir", type=Path, default=Path(tempfile.gettempdir()) / "hilum-worker",
                    help="where a job's inputs and results live while it runs")
    wk.add_argument("--ca-file", dest="ca_file", type=Path, help="CA bundle to verify the node's certificate")
    wk.set_defaults(func=cmd_worker)

    sub.add_parser("phantom", help="write a synthetic study with ground truth (see `hilum phantom -h`)",
                   add_help=False)
    sub.add_parser("rules", help="test and simulate routing rules (see `hilum rules -h`)", add_help=False)
    sub.add_parser("train", help="train a segmentation model from a config file (see `hilum train -h`)",
                   add_help=False)
    sub.add_parser("model", help="model versions: list, add, promote, shadow, retire (see `hilum model -h`)",
                   add_help=False)
    sub.add_parser("project", help="learning-loop projects: create, list, show, accept (see `hilum project -h`)",
                   add_help=False)
    sub.add_parser("audit", help="verify, search and export the audit trail (see `hilum audit -h`)",
                   add_help=False)
    sub.add_parser("cert", help="development TLS certificates (see `hilum cert -h`)", add_help=False)
    sub.add_parser("deid", help="de-identification keys and files (see `hilum deid -h`)", add_help=False)
    sub.add_parser("keys", help="spool encryption keys: rotate, rewrap, status, retire (see `hilum keys -h`)",
                   add_help=False)
    sub.add_parser("pacs", help="PACS sources: echo, query, retrieve, jobs (see `hilum pacs -h`)", add_help=False)
    sub.add_parser("spool", help="read a spooled object, verified and decrypted (`hilum spool read LOCATOR`)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Sub-tools with their own argument parsers.
    if argv and argv[0] == "phantom":
        return cmd_phantom(argv[1:])
    if argv and argv[0] == "train":
        from node.models.train import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] == "project":
        from node.projects.cli import cli as project_cli

        return project_cli(argv[1:])
    if argv and argv[0] == "model":
        from node.models.cli import cli as model_cli

        return model_cli(argv[1:])
    if argv and argv[0] == "rules":
        from node.rules.cli import cli as rules_cli

        return rules_cli(argv[1:])
    if argv and argv[0] == "audit":
        from node.audit.cli import cli as audit_cli

        return audit_cli(argv[1:])
    if argv and argv[0] == "cert":
        from node.tls.certs import cli as cert_cli

        return cert_cli(argv[1:])
    if argv and argv[0] == "deid":
        from node.deid.cli import cli as deid_cli

        return deid_cli(argv[1:])
    if argv and argv[0] == "pacs":
        from node.pacs.cli import cli as pacs_cli

        return pacs_cli(argv[1:])
    if argv and argv[0] in ("keys", "spool"):
        from node.store.cli import cli as store_cli

        return store_cli(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"hilum: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
