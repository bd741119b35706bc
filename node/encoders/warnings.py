"""Quality warnings written into the objects of a job delivered despite a failed quality check.

Applied after encoding, to every object of the job, where a reader of that object type looks:
the series description (every viewer's series list), the SEG content description, the RTSTRUCT
structure set description (what a planning system shows when importing), the SC image comments.
The SR carries each warning as a text finding (``node.jobs.quality.warning_findings``).
"""
from __future__ import annotations

from pydicom.dataset import Dataset

__all__ = ["mark_warnings"]

_RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture, single and multi-frame


def _lo(text: str) -> str:
    return text[:64]


def mark_warnings(datasets: list[Dataset], warnings: tuple[str, ...] | list[str]) -> None:
    """Mark each dataset in place; no-op without warnings."""
    if not warnings:
        return
    summary = f"{len(warnings)} quality warning(s)"
    full = "QUALITY WARNING - not verified, " + summary + ": " + " | ".join(warnings)
    for ds in datasets:
        desc = str(ds.get("SeriesDescription", "") or "")
        if desc.startswith("AI: "):
            desc = desc[4:]
        ds.SeriesDescription = _lo(f"AI WARNING: {desc}")
        modality = str(ds.get("Modality", ""))
        if modality == "SEG":
            ds.ContentDescription = _lo(f"WARNING, {summary}: see the SR")
        elif str(ds.SOPClassUID) == _RTSTRUCT:
            ds.StructureSetDescription = (full + " || " + str(ds.get("StructureSetDescription", "")))[:1024]
        elif str(ds.SOPClassUID).startswith(_SC_PREFIX):
            old = str(ds.get("ImageComments", "") or "")
            ds.ImageComments = (full + (" || " + old if old else ""))[:10240]
