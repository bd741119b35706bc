"""Nodule identities from a prior study's own `lung-nodules` report (its TID 1500 SR).

A nodule keeps its Tracking Identifier and UID across any number of studies only if each
follow-up takes them from the report of the study before, not from a rule it could re-derive
(the prior may itself have been a follow-up, its nodules named after an even earlier study's).
Each nodule's key-slice group in that SR holds an outline on an image of the prior series: its
centre on that image is where the nodule was, which is what a re-detected prior nodule is
matched against.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from node.encoders.sr import KEY_SLICE_PREFIX
from node.volume import SeriesData

__all__ = ["PriorIdentity", "prior_identities"]

_GROUP, _TRACKING_ID, _TRACKING_UID, _FINDING, _NODULE = "125007", "112039", "112040", "121071", "27925004"


@dataclass(frozen=True)
class PriorIdentity:
    tracking_id: str
    tracking_uid: str
    center_mm: np.ndarray | None  # the outline's centre on its key slice, None without an outline


def _code(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _walk(items):
    for item in items or ():
        yield item
        yield from _walk(item.get("ContentSequence"))


def _outline_centre(group: Dataset, image: SeriesData) -> np.ndarray | None:
    slices = {str(ds.SOPInstanceUID): k for k, ds in enumerate(image.datasets)}
    for item in _walk(group.get("ContentSequence")):
        if item.get("ValueType") != "SCOORD":
            continue
        for ref in _walk(item.get("ContentSequence")):
            sop = ref.get("ReferencedSOPSequence")
            if sop and str(sop[0].ReferencedSOPInstanceUID) in slices:
                xy = np.asarray(item.GraphicData, float).reshape(-1, 2) - 0.5  # (column, row) pixel centres
                k = slices[str(sop[0].ReferencedSOPInstanceUID)]
                return image.volume.geometry.index_to_patient((k, xy[:, 1].mean(), xy[:, 0].mean()))
    return None


def prior_identities(series: list[SeriesData], image: SeriesData) -> list[PriorIdentity]:
    """The nodules named by any lung-nodules SR among ``series`` that measured ``image``."""
    found: dict[str, PriorIdentity] = {}
    for s in series:
        if s.modality != "SR":
            continue
        for ds in s.datasets:
            for group in _walk(ds.get("ContentSequence")):
                if _code(group) != _GROUP:
                    continue
                fields = {_code(i): i for i in group.get("ContentSequence") or ()}
                finding = fields.get(_FINDING)
                if _TRACKING_ID not in fields or _TRACKING_UID not in fields or finding is None \
                        or str(finding.ConceptCodeSequence[0].CodeValue) != _NODULE:
                    continue  # not a nodule group (another handler's report)
                name = str(fields[_TRACKING_ID].TextValue)
                uid = str(fields[_TRACKING_UID].UID)
                if name.startswith(KEY_SLICE_PREFIX):
                    found[name.removeprefix(KEY_SLICE_PREFIX)] = PriorIdentity(
                        name.removeprefix(KEY_SLICE_PREFIX), uid, _outline_centre(group, image))
                else:
                    found.setdefault(name, PriorIdentity(name, uid, None))
    return list(found.values())
