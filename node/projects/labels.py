"""Is this SEG a label for that case? The checks a saved annotation must pass before it is stored.

A SEG counts as a case's label when it belongs to one of the project's studies, was drawn on the
case's input series, and every segment is one of the project's labels (matched by SegmentLabel, or the
property type's meaning or code, against the label's data names, its name and its type code) with every project label present. Anything else is refused
with the reason, and nothing is stored: a label that would silently train the wrong structure, or
train on the wrong images, is worse than none.
"""
from __future__ import annotations

from collections.abc import Collection

import pydicom

from node.models.data import label_lookup
from node.projects.store import Project

__all__ = ["LabelRefused", "check_seg", "project_lookup"]


class LabelRefused(ValueError):
    """The SEG is not a usable label for the case; the message says why."""


def _names(item) -> list[str]:
    names = [str(item.get("SegmentLabel", ""))]
    for code in item.get("SegmentedPropertyTypeCodeSequence", []):
        names += [str(code.get("CodeMeaning", "")), str(code.get("CodeValue", ""))]
    return [n.strip() for n in names if str(n).strip()]


def project_lookup(project: Project) -> dict[str, int]:
    """Lower-cased names a segment may carry → label value: the data names (``source``), and the
    label's own name and property-type meaning and code, which a corrected AI prediction keeps."""
    lookup = label_lookup(project.labels)
    for lab in project.labels:
        for name in (lab.name, lab.type.meaning, lab.type.value):
            lookup.setdefault(name.strip().lower(), lab.value)
    return lookup


def check_seg(project: Project, ds: pydicom.Dataset, study_uid: str, input_series: list[str],
              cases: Collection[str] | None = None) -> dict[str, int]:
    """The SEG's segment labels → project label values, or LabelRefused naming the problem.

    ``input_series``: the case's series the model reads (the archive's series of the input modality);
    ``cases``: the project's case studies (default: those it was created with; the store also knows
    the ones its select condition added since).
    """
    if ds.get("Modality") != "SEG":
        raise LabelRefused(f"not a segmentation: Modality is {ds.get('Modality')!r}, not SEG")
    for attr in ("SOPInstanceUID", "SeriesInstanceUID"):  # a label version is recorded by these two
        if not str(ds.get(attr, "")).strip():
            raise LabelRefused(f"the SEG has no {attr}: a label version must name its instance and series")
    if study_uid not in (project.study_uids if cases is None else cases):
        raise LabelRefused(f"study {study_uid} is not a case of project {project.name!r}")
    if str(ds.get("StudyInstanceUID", "")) != study_uid:
        raise LabelRefused(f"the SEG belongs to study {ds.get('StudyInstanceUID')}, not to case {study_uid}")
    refs = ds.get("ReferencedSeriesSequence")
    if not refs or "SeriesInstanceUID" not in refs[0]:
        raise LabelRefused("the SEG has no ReferencedSeriesSequence: the series it was drawn on is unknown")
    ref = str(refs[0].SeriesInstanceUID)
    if ref not in input_series:
        raise LabelRefused(f"the SEG was drawn on series {ref}, not on the case's input series "
                           f"({', '.join(input_series) or 'none found in the archive'})")
    lookup = project_lookup(project)
    mapped, unknown = {}, []
    for item in ds.get("SegmentSequence", []):
        names = _names(item)
        value = next((lookup[n.lower()] for n in names if n.lower() in lookup), None)
        if value is None:
            unknown.append(names[0] if names else f"segment {item.get('SegmentNumber')}")
        else:
            mapped[names[0]] = value
    if unknown:
        known = sorted({n for lab in project.labels for n in [lab.name, lab.type.meaning, *lab.source]})
        raise LabelRefused(f"unknown segment labels {unknown}; the project's labels are {known}")
    missing = [lab.name for lab in project.labels if lab.value not in mapped.values()]
    if missing:
        raise LabelRefused(f"no segment for {missing}: a label covers every structure of the task")
    return mapped
