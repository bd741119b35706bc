"""The ``hilum`` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from node.config import ConfigError, Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: getattr(args, k, None) for k in Settings.model_fields}
    return load_settings(getattr(args, "config", None), **overrides)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--data-dir", dest="data_dir", type=Path)


def cmd_up(args: argparse.Namespace) -> int:
    import uvicorn

    from node import logs
    from node.runtime import Node
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
                                           log_level="warning", access_log=False))
    try:
        server.run()  # returns on SIGINT/SIGTERM
    finally:
        node.stop()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from node.runtime import open_index
    from node.web.auth import create_token

    settings = _settings(args)
    token = create_token(open_index(settings), args.role, args.label)
    print(token)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from node.runtime import open_index
    from node.web.views import job_view, study_summary

    settings = _settings(args)
    index = open_index(settings)
    studies = []
    for row in index.studies(args.limit, 0):
        s = study_summary(row)
        s["jobs"] = [job_view(index, j) for j in index.jobs(study_uid=row["study_uid"])]
        studies.append(s)
    if args.json:
        print(json.dumps({"studies": studies, "duplicates": index.stat("duplicates"),
                          "quarantined": index.stat("quarantined")}, indent=1))
        return 0
    print(f"{'study':<48} {'inst':>5} {'stable':<6} jobs")
    for s in studies:
        jobs = ", ".join(f"{j['handler']}:{j['status']}" for j in s["jobs"]) or "-"
        print(f"{s['study_uid'][:48]:<48} {s['instances_received']:>5} {str(s['stable']).lower():<6} {jobs}")
    print(f"duplicates {index.stat('duplicates')}, quarantined {index.stat('quarantined')}")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from node.send import send_paths

    ok, failed = send_paths(args.paths, args.host, args.port, args.aet, args.calling_aet)
    print(f"sent {ok}, failed {failed}")
    return 0 if failed == 0 else 1


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
    create.add_argument("--role", choices=("admin", "viewer"), required=True)
    create.add_argument("--label")
    create.set_defaults(func=cmd_token)

    st = sub.add_parser("status", help="studies, jobs and deliveries")
    _add_common(st)
    st.add_argument("--json", action="store_true")
    st.add_argument("--limit", type=int, default=20)
    st.set_defaults(func=cmd_status)

    send = sub.add_parser("send", help="send DICOM files or folders by C-STORE")
    send.add_argument("paths", nargs="+", type=Path)
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=11112)
    send.add_argument("--aet", default="HILUM", help="called AE title")
    send.add_argument("--calling-aet", dest="calling_aet", default="HILUMSCU")
    send.set_defaults(func=cmd_send)

    sub.add_parser("phantom", help="write a synthetic study with ground truth (see `hilum phantom -h`)",
                   add_help=False)
    sub.add_parser("rules", help="test and simulate routing rules (see `hilum rules -h`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Sub-tools with their own argument parsers.
    if argv and argv[0] == "phantom":
        return cmd_phantom(argv[1:])
    if argv and argv[0] == "rules":
        from node.rules.cli import cli as rules_cli

        return rules_cli(argv[1:])
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
