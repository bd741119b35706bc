"""``hilum deid key FILE`` (a new project key) and ``hilum deid apply`` (de-identify files)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pydicom

from node.deid import Deidentifier, ProfileError, Refused, load_profile
from node.keyfile import KeyFileError, read_key, write_new_key


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hilum deid", description="PS3.15 Annex E de-identification")
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("key", help="create a project pseudonym key (0600); give the same file to every site")
    k.add_argument("file", type=Path)
    a = sub.add_parser("apply", help="de-identify DICOM files into a folder")
    a.add_argument("paths", nargs="+", type=Path, help="files or folders")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--key", type=Path, required=True, help="project key file")
    a.add_argument("--profile", default="basic")
    a.add_argument("--option", action="append", default=[], dest="options",
                   help="option overlay, e.g. retain-longitudinal-modified-dates (repeatable)")
    a.add_argument("--allow-burned-in", action="append", default=[], dest="allow",
                   help="modality (or SC) sent even if it may carry burned-in text (repeatable)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "key":
            write_new_key(args.file, "key file")
            print(f"project key written to {args.file} (mode 0600)")
            return 0
        deid = Deidentifier(load_profile(args.profile, args.options), read_key(args.key, "--key"),
                            frozenset(args.allow))
    except (KeyFileError, ProfileError) as exc:
        print(f"hilum deid: {exc}", file=sys.stderr)
        return 2
    files = [f for p_ in args.paths for f in ([p_] if p_.is_file() else sorted(p_.rglob("*")) if p_.is_dir() else [])
             if f.is_file()]
    args.out.mkdir(parents=True, exist_ok=True)
    done = refused = 0
    for f in files:
        try:
            ds = deid.apply(pydicom.dcmread(f))
        except Refused as exc:
            print(f"{f}: refused: {exc}", file=sys.stderr)
            refused += 1
            continue
        except pydicom.errors.InvalidDicomError:
            continue
        ds.save_as(args.out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        done += 1
    print(f"de-identified {done}, refused {refused}")
    return 0 if refused == 0 else 1
