"""Post-inference checks of a model's result against its card (``plausibility``): each label's volume
within its declared range (a missing lung is a volume of 0 ml), solid structures continuous from slice
to slice, and the network's confidence above the card's floor. ``plausibility_from_truth`` derives the
declaration from training truth for ``hilum train``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from node.models.card import LabelPlausibility, ModelCard, Plausibility, Range
from node.models.inference import Confidence
from node.quality_checks import slice_gaps
from node.results import QualityFlag
from node.volume import value_counts

__all__ = ["output_flags", "plausibility_from_truth", "VOLUME_MARGIN", "CONFIDENCE_MARGIN"]

VOLUME_MARGIN = 0.5  # truth volumes widened to [min * 0.5, max * 1.5]: new anatomy varies more than 20 cases
CONFIDENCE_MARGIN = 0.03  # the floor sits this far below the lowest validation case


def output_flags(card: ModelCard, labels: np.ndarray, voxel_ml: float, score: Confidence) -> list[QualityFlag]:
    """Plausibility and confidence flags of ``labels`` (uint8, source grid, slices on axis 0)."""
    p = card.plausibility
    if p is None:
        return []
    flags = []
    counts = value_counts(labels, 256)
    for lab in card.labels:
        rule: LabelPlausibility | None = p.labels.get(lab.name)
        if rule is None:
            continue
        volume = float(counts[lab.value]) * voxel_ml
        if rule.volume_ml is not None and volume not in rule.volume_ml:
            what = "not found" if volume == 0 else f"volume {volume:.0f} ml"
            flags.append(QualityFlag("label_volume", f"{what}, expected {rule.volume_ml.describe('ml')}",
                                     structure=lab.name))
        if rule.continuous and counts[lab.value]:
            gaps = slice_gaps(labels == lab.value)
            if gaps:
                flags.append(QualityFlag("label_slice_gap", f"absent on {gaps} slice(s) between slices where it is "
                                         "present (expected continuous)", structure=lab.name))
    if p.min_confidence is not None and score.overall is not None and score.overall < p.min_confidence:
        flags.append(QualityFlag("model_confidence", f"mean max-softmax inside the predicted labels "
                                 f"{score.overall:.3f}, below the card's {p.min_confidence:.3f}", kind="confidence"))
    return flags


def plausibility_from_truth(names: dict[int, str], truths: Sequence[tuple[np.ndarray, float]],
                            confidences: Sequence[float]) -> Plausibility:
    """Volume ranges and continuity of each label in ``truths`` ((label array, voxel ml) per case), and a
    confidence floor just under the lowest of ``confidences`` (the validation cases')."""
    labels = {}
    for value, name in names.items():
        volumes = [float((t == value).sum()) * ml for t, ml in truths]
        continuous = all(slice_gaps(t == value) == 0 for t, _ in truths)
        labels[name] = LabelPlausibility(
            volume_ml=Range(min=round(min(volumes) * (1 - VOLUME_MARGIN), 1),
                            max=round(max(volumes) * (1 + VOLUME_MARGIN), 1)),
            continuous=continuous)
    floor = round(max(0.0, min(confidences) - CONFIDENCE_MARGIN), 3) if confidences else None
    return Plausibility(labels=labels, min_confidence=floor)
