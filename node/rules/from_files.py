"""Facts from DICOM files on disk, for ``hilum rules test PATH`` and for replaying a folder.

Only headers are read (``stop_before_pixels``); files that are not DICOM are skipped and
counted, so a folder with a README or a DICOMDIR still works.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable

import pydicom
from pydicom.errors import InvalidDicomError

from node.rules.facts import SeriesFacts, StudyFacts

__all__ = ["FilesRead", "facts_from_paths"]


@dataclass
class FilesRead:
    studies: list[StudyFacts]
    skipped: list[str]  # paths that are not DICOM instances with study and series UIDs


def facts_from_paths(paths: Iterable[str | os.PathLike], *, calling_ae: str = "", called_ae: str = "",
                     source_ip: str = "", arrived_at: datetime | None = None) -> FilesRead:
    """Group the instances found under ``paths`` (files or folders) into studies and series."""
    first: dict[tuple[str, str], pydicom.Dataset] = {}
    counts: dict[tuple[str, str], int] = defaultdict(int)
    skipped: list[str] = []
    for path in _walk(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            skipped.append(str(path))
            continue
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        if not study or not series or "DirectoryRecordSequence" in ds:
            skipped.append(str(path))
            continue
        first.setdefault((study, series), ds)
        counts[(study, series)] += 1
    when = arrived_at or datetime.now()
    by_study: dict[str, list[SeriesFacts]] = defaultdict(list)
    for (study, series), ds in first.items():
        by_study[study].append(SeriesFacts.from_dataset(
            ds, instance_count=counts[(study, series)], calling_ae=calling_ae, called_ae=called_ae,
            source_ip=source_ip, arrived_at=when, study_uid=study, series_uid=series))
    return FilesRead([StudyFacts(series, uid) for uid, series in by_study.items()], skipped)


def _walk(paths: Iterable[str | os.PathLike]) -> Iterable[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file())
        else:
            yield p
