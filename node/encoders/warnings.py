"""Quality warnings written into the objects of a job delivered despite a failed quality check.

Applied after encoding, to every object of the job, where a reader of that object type looks:
the series description (every viewer's series list), the SEG content description, the RTSTRUCT
structure set description (what a planning system shows when importing), the SC image comments.
The SR carries each warning as a text finding (``node.jobs.quality.warning_findings``).

A warning names what it is about ("Lungenflügel links"), text the object's character set, chosen
when it was encoded, may not hold: the object then declares ISO_IR 192 (UTF-8), in which pydicom
re-encodes the values it holds decoded.
"""
from __future__ import annotations

from pydicom.dataset import Dataset

from node.encoders.common import charset_fits, clip_text

__all__ = ["mark_warnings"]

_RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture, single and multi-frame


def _lo(text: str) -> str:
    return clip_text(text, 64)


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
        written = [ds.SeriesDescription]
        modality = str(ds.get("Modality", ""))
        if modality == "SEG":
            ds.ContentDescription = _lo(f"WARNING, {summary}: see the SR")
            written.append(ds.ContentDescription)
        elif str(ds.SOPClassUID) == _RTSTRUCT:
            ds.StructureSetDescription = clip_text(full + " || " + str(ds.get("StructureSetDescription", "")), 1024)
            written.append(ds.StructureSetDescription)
        elif str(ds.SOPClassUID).startswith(_SC_PREFIX):
            old = str(ds.get("ImageComments", "") or "")
            ds.ImageComments = clip_text(full + (" || " + old if old else ""), 10240)
            written.append(ds.ImageComments)
        if not charset_fits(ds.get("SpecificCharacterSet"), written):
            ds.SpecificCharacterSet = "ISO_IR 192"
