"""Masks that keep the table, the arms' support and the air out of the metric (CT).

The body outline and the lungs come from the classical ``node.anatomy`` segmentation (the one
``ct-anatomy`` delivers), so registration and the SEG a user sees agree on what the body is.
"""
from __future__ import annotations

import numpy as np

from node.volume import Volume

__all__ = ["MASKS", "ct_mask"]

MASKS = ("none", "body", "lungs")


def ct_mask(volume: Volume, which: str) -> np.ndarray | None:
    """Boolean mask on ``volume``'s grid: ``body`` (the External), ``lungs`` (both lungs, grown by
    about 10 mm so the lung borders, where the information is, stay in), or None for ``none``."""
    if which not in MASKS:
        raise ValueError(f"mask {which!r} is not one of {', '.join(MASKS)}")
    if which == "none":
        return None
    from node.anatomy import LUNG_L, LUNG_R, segment_anatomy  # heavy: only when a mask is asked for

    labels = segment_anatomy(volume, airway=False, bone=False).labels
    if which == "body":
        return labels > 0
    lungs = np.isin(labels, (LUNG_L, LUNG_R))
    if not lungs.any():
        return lungs
    from scipy import ndimage

    return ndimage.distance_transform_edt(~lungs, sampling=volume.geometry.spacing[::-1]) <= 10.0
