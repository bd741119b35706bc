"""``hilum phantom OUT_DIR [options]``: write a synthetic study and its ground truth."""
from __future__ import annotations

import argparse
import sys

from node.phantom.dicom_io import TRANSFER_SYNTAXES

_CT_ONLY = ("nodules", "contrast", "arms", "consolidation", "position", "fov", "localizer", "no_blur", "marker",
            "followup_of", "interval_days", "shift", "rotation", "new_nodules", "family")
_SIZE = ("rows", "cols", "slices", "spacing", "thickness")


def _numbers(n: int):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}") from None
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        return values

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hilum phantom",
        description="Write a synthetic DICOM study (chest CT, brain MR or chest CR) with its ground truth "
                    "into the new folder OUT_DIR (dicom/, labels.nii.gz, labels.json, nodules.json, phantom.json).",
    )
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--modality", choices=("CT", "MR", "CR"), default="CT")
    p.add_argument("--seed", type=int, default=None, help="same seed and options, same files (default 0)")
    p.add_argument("--rows", type=int)
    p.add_argument("--cols", type=int)
    p.add_argument("--slices", type=int, help="CT/MR slice count")
    p.add_argument("--spacing", type=float, help="pixel spacing, mm")
    p.add_argument("--thickness", type=float, help="CT/MR slice thickness = spacing between slices, mm")
    p.add_argument("--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES), default="explicit")
    p.add_argument("--family", action="store_true",
                   help="CT: a case of the randomised phantom family (anatomy drawn from --seed; "
                        "sized by --rows and --slices only; the drawn anatomy is in phantom.json's 'family')")
    ct = p.add_argument_group("CT options")
    ct.add_argument("--nodules", type=int, help="number of random lung nodules (default 3)")
    ct.add_argument("--contrast", action="store_true", help="iodinated contrast: blood pools ~300 HU")
    ct.add_argument("--arms", choices=("up", "down"))
    ct.add_argument("--consolidation", choices=("left", "right"), help="dense lower part of one lung")
    ct.add_argument("--position", choices=("HFS", "FFS"), help="patient position (FFS: feet first)")
    ct.add_argument("--fov", type=float, help="reconstruction diameter, mm (overrides --spacing)")
    ct.add_argument("--localizer", action="store_true", help="also write a topogram series")
    ct.add_argument("--no-blur", action="store_true", help="no partial-volume blur at edges")
    ct.add_argument("--marker", action="append", type=_numbers(5), metavar="X,Y,Z,R,HU",
                    help="bright sphere at patient position X,Y,Z (mm), radius R, value HU; repeatable")
    fu = p.add_argument_group("CT follow-up (with --followup-of)")
    fu.add_argument("--followup-of", metavar="DIR", help="write a follow-up of the phantom study in DIR")
    fu.add_argument("--interval-days", type=int)
    fu.add_argument("--shift", type=_numbers(3), metavar="X,Y,Z", help="patient shift, mm")
    fu.add_argument("--rotation", type=_numbers(3), metavar="RX,RY,RZ", help="patient rotation, degrees")
    fu.add_argument("--new-nodules", type=int)
    return p


def _given(args: argparse.Namespace, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n) not in (None, False)}


def _run(args: argparse.Namespace):
    from node.phantom.cr import generate_cr
    from node.phantom.ct import generate_ct, generate_followup
    from node.phantom.mr import generate_mr

    seed = 0 if args.seed is None else args.seed
    size = _given(args, _SIZE)
    if args.modality != "CT":
        extra = sorted(_given(args, _CT_ONLY))
        if extra:
            raise ValueError(f"--{extra[0].replace('_', '-')} applies to CT only, not {args.modality}")
        kw = {"rows": size.get("rows"), "cols": size.get("cols"), "pixel_spacing": size.get("spacing")}
        if args.modality == "MR":
            kw.update(slices=size.get("slices"), slice_thickness=size.get("thickness"))
        elif "slices" in size or "thickness" in size:
            raise ValueError("--slices/--thickness do not apply to a CR (one image)")
        kw = {k: v for k, v in kw.items() if v is not None}
        gen = generate_mr if args.modality == "MR" else generate_cr
        return gen(args.out_dir, seed=seed, transfer_syntax=args.transfer_syntax, **kw)
    if args.family:
        return _family(args, seed, size)
    opts = {"transfer_syntax": args.transfer_syntax}
    for flag, name in (("rows", "rows"), ("cols", "cols"), ("slices", "slices"), ("spacing", "pixel_spacing"),
                       ("thickness", "slice_thickness"), ("nodules", "nodules"), ("arms", "arms"),
                       ("consolidation", "consolidation"), ("position", "patient_position"), ("fov", "fov_mm")):
        if getattr(args, flag) is not None:
            opts[name] = getattr(args, flag)
    if args.contrast:
        opts["contrast"] = True
    if args.localizer:
        opts["localizer"] = True
    if args.no_blur:
        opts["blur"] = False
    if args.marker:
        opts["markers"] = [((x, y, z), r, hu) for x, y, z, r, hu in args.marker]
    if args.followup_of:
        fu = {"interval_days": args.interval_days, "shift_mm": args.shift, "rotation_deg": args.rotation,
              "new_nodules": args.new_nodules, "seed": args.seed}
        fu = {k: v for k, v in fu.items() if v is not None}
        return generate_followup(args.followup_of, args.out_dir, **fu, **opts)
    for name in ("interval_days", "shift", "rotation", "new_nodules"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name.replace('_', '-')} needs --followup-of DIR")
    return generate_ct(args.out_dir, seed=seed, **opts)


def _family(args: argparse.Namespace, seed: int, size: dict):
    from node.phantom.family import generate_family_case

    extra = sorted((set(_given(args, _CT_ONLY)) - {"family"}) | (set(size) - {"rows", "slices"}))
    if extra:
        raise ValueError(f"--{extra[0].replace('_', '-')} does not apply to --family "
                         "(its anatomy is drawn from the seed)")
    kw = {k: size[k] for k in ("rows", "slices") if k in size}
    return generate_family_case(args.out_dir, seed, transfer_syntax=args.transfer_syntax, **kw)


def cli(argv: list[str]) -> int:
    """Entry point of ``hilum phantom``; ``argv`` are the arguments after ``phantom``."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already reported
        return int(exc.code or 0)
    try:
        study = _run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"hilum phantom: error: {exc}", file=sys.stderr)
        return 2
    files = study.series_files()
    print(f"{study.modality} phantom: {len(files)} image file(s) in {study.dicom_dir}")
    print(f"  patient {study.patient_id}  study {study.study_uid}")
    print(f"  series  {study.series_uid}")
    if study.localizer_series_uid:
        print(f"  localizer series {study.localizer_series_uid}")
    truth = [p.name for p in (study.labels, study.label_table_path, study.nodules_path, study.changes_path) if p]
    if truth:
        print(f"  truth: {', '.join(truth)} (manifest {study.manifest_path.name})")
    return 0
