"""`hilum keys …` (spool encryption keys) and `hilum spool read` (an admin's look at a spooled object).

Rotation is carried out by the running node (its housekeeping thread takes the request from
the index), so reception never stops; a request made while the node is down runs at its next
start. `keys status` and `keys retire` read the spool directly.
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path

from node.config import ConfigError, load_settings
from node.store.envelope import IntegrityError
from node.store.keys import load_keyring, remove_key, rotate_key_file


def _settings(args):
    return load_settings(args.config, **({"data_dir": args.data_dir} if args.data_dir else {}))


def _index(settings):
    from node.runtime import open_index

    return open_index(settings)


def _vault(settings):
    from node.store.vault import Vault

    return Vault(settings.data_dir, load_keyring(settings.spool_encryption))


def cmd_rotate(args) -> int:
    settings = _settings(args)
    ring = rotate_key_file(settings.spool_encryption)
    req = _index(settings).request_maintenance("rewrap", f"cli {getpass.getuser()}")
    print(f"new active key {ring.active}; re-wrap request {req} queued for the node "
          f"(`hilum keys status` shows its progress)")
    return _wait(settings, req) if args.wait else 0


def cmd_rewrap(args) -> int:
    settings = _settings(args)
    if settings.spool_encryption is None:
        raise ConfigError("spool_encryption: not configured, nothing to re-wrap")
    req = _index(settings).request_maintenance("rewrap", f"cli {getpass.getuser()}")
    print(f"re-wrap request {req} queued for the node")
    return _wait(settings, req) if args.wait else 0


def _wait(settings, req_id: int, timeout: float = 3600) -> int:
    index = _index(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = next((r for r in index.maintenance(100) if r["id"] == req_id), None)
        if row is not None and row["status"] in ("done", "failed"):
            print(f"request {req_id}: {row['status']} {row['detail'] or ''}")
            return 0 if row["status"] == "done" else 1
        time.sleep(0.5)
    print(f"request {req_id}: still not done (is the node running?)", file=sys.stderr)
    return 1


def cmd_status(args) -> int:
    from node.store.rewrap import keys_in_use

    settings = _settings(args)
    ring = load_keyring(settings.spool_encryption)
    used = keys_in_use(_vault(settings))
    out = {"encrypted": ring is not None, "active": ring.active if ring else None,
           "keys": sorted(ring.keys) if ring else [], "objects_by_key": dict(used),
           "requests": [dict(r) for r in _index(settings).maintenance(5)]}
    print(json.dumps(out, indent=1))
    return 0


def cmd_retire(args) -> int:
    from node.store.rewrap import drop_key, jobs_holding_old_keys, keys_in_use

    settings = _settings(args)
    vault = _vault(settings)
    if args.key_id == vault.keyring.active:
        print(f"hilum: {args.key_id} is the active key; rotate first", file=sys.stderr)
        return 1
    # Checked before the objects: a job dispatched before the rotation still holds the old keyring and
    # seals its results under the old key when it finishes, after keys_in_use counted nothing.
    busy = jobs_holding_old_keys(_index(settings))
    if busy:
        ids = ", ".join(f"{j['id']} ({j['status']})" for j in busy[:20]) + (" …" if len(busy) > 20 else "")
        print(f"hilum: job(s) {ids} started before the last re-wrap and may still seal results under "
              f"{args.key_id}; wait until they are done or failed, run `hilum keys rewrap --wait`, then retire",
              file=sys.stderr)
        return 1
    used = keys_in_use(vault).get(args.key_id, 0)
    if used:
        print(f"hilum: {used} object(s) can only be opened with {args.key_id}; run `hilum keys rewrap --wait` "
              "with the node running first", file=sys.stderr)
        return 1
    dropped = drop_key(vault, args.key_id)
    remove_key(settings.spool_encryption, args.key_id)
    from node.audit import open_audit

    open_audit(settings).spool_keys(f"cli {getpass.getuser()}", "retire", {"key": args.key_id})
    print(f"key {args.key_id} removed from {settings.spool_encryption.key_file} ({dropped} wrap(s) cleared)")
    return 0


def cmd_read(args) -> int:
    settings = _settings(args)
    try:
        data = _vault(settings).read(args.locator)
    except (IntegrityError, ValueError) as exc:
        print(f"hilum: {args.locator}: {exc}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
    return 0


def cli(argv: list[str], prog: str = "hilum") -> int:
    ap = argparse.ArgumentParser(prog=f"{prog} keys|spool")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--config")
        p.add_argument("--data-dir", dest="data_dir", type=Path)
        return p

    p = common(sub.add_parser("rotate", help="add a new active key to the key file and re-wrap everything under it"))
    p.add_argument("--wait", action="store_true", help="wait until the node has re-wrapped the spool")
    p.set_defaults(func=cmd_rotate)
    p = common(sub.add_parser("rewrap", help="re-wrap everything under the active key (after an external rotation)"))
    p.add_argument("--wait", action="store_true")
    p.set_defaults(func=cmd_rewrap)
    common(sub.add_parser("status", help="keys, and how many spooled objects each one wraps")).set_defaults(
        func=cmd_status)
    p = common(sub.add_parser("retire", help="remove an old key once nothing is wrapped under it"))
    p.add_argument("key_id")
    p.set_defaults(func=cmd_retire)
    p = common(sub.add_parser("read", help="write a spooled object's DICOM bytes (verified, decrypted)"))
    p.add_argument("locator", help="a locator from the index (log:…) or a result/quarantine file path")
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_read)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"hilum: {exc}", file=sys.stderr)
        return 2
