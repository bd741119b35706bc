"""Run a detection model (card ``task: detection``): object centres, sizes and scores on the source grid.

A heat-map detector runs through the segmentation pipeline up to the class probabilities on the
network grid (same resampling, normalisation, patches and blending, so training and deployment see
the same input); each connected region of its one label at or above the card's threshold is one
detection, centred on the probability-weighted centroid, with the radius of the ball of the
region's volume. A box detector is run patch by patch on the same grid; each box scoring at least
the threshold is one detection, centred in the box. Overlapping detections are merged (the
strongest kept), and only those whose centre lies in ``where`` (e.g. the lungs) count.

What a detection *is* (a nodule or not, its outline and size) is the calling handler's business:
detections here are only where to look.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from node.models.card import ModelCard
from node.models.inference import BOX_COLUMNS, PatchRunner, patch_starts, prepare_input, resample, sliding_window
from node.volume import Geometry, Volume

__all__ = ["Detected", "detect"]

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Detected:
    kji: tuple[float, float, float]  # source-grid index of the centre
    radius_mm: float
    score: float  # heat-map maximum or box score, 0..1


def _grid_mask(where: np.ndarray, source: Geometry, grid: Geometry) -> np.ndarray:
    """``where`` (source grid) on the network grid, nearest neighbour, less its outermost voxel: there
    the anti-aliased image mixes in what lies beyond (the chest wall into the lung's edge), and a heat
    map may fire on that rim in fragments. An object inside keeps all but its edge, so its region stays."""
    inside = resample(where, source, grid, linear=False).astype(bool)
    return ndimage.binary_erosion(inside)


def _heatmap(image: np.ndarray, grid: Geometry, card: ModelCard, run: PatchRunner, inside: np.ndarray | None,
             progress: Progress) -> list[tuple[np.ndarray, float, float]]:
    """(patient centre, radius mm, score) of each region of the heat map at or above the threshold."""
    probs = sliding_window(image, run, card.inference, card.output_channels, progress)
    heat = probs[1] if card.inference.activation == "softmax" else probs[0]
    del probs
    above = heat >= card.detection.threshold
    if inside is not None:
        above &= inside
    regions, n = ndimage.label(above)
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    centres = ndimage.center_of_mass(heat, regions, index)
    sizes = ndimage.sum_labels(np.ones_like(heat), regions, index)
    scores = ndimage.maximum(heat, regions, index)
    voxel_mm3 = float(np.prod(grid.spacing))
    return [(grid.index_to_patient(c), float((3 * s * voxel_mm3 / (4 * np.pi)) ** (1 / 3)), float(p))
            for c, s, p in zip(centres, sizes, scores)]


def _boxes(image: np.ndarray, grid: Geometry, card: ModelCard, run: PatchRunner, inside: np.ndarray | None,
           progress: Progress) -> list[tuple[np.ndarray, float, float]]:
    """(patient centre, radius mm, score) of each box at or above the threshold, patch by patch."""
    patch = card.inference.patch_size
    c, *shape = image.shape
    pads = [max(0, p - s) for s, p in zip(shape, patch)]
    if any(pads):
        floor = image.reshape(c, -1).min(axis=1)
        image = np.stack([np.pad(image[i], [(0, p) for p in pads], constant_values=floor[i]) for i in range(c)])
    steps = [max(1, int(p * (1 - card.inference.overlap))) for p in patch]
    starts = [(z, y, x) for z in patch_starts(image.shape[1], patch[0], steps[0])
              for y in patch_starts(image.shape[2], patch[1], steps[1]) for x in patch_starts(image.shape[3], patch[2], steps[2])]
    spacing_kji = np.asarray(grid.spacing[::-1], float)
    out = []
    for b0 in range(0, len(starts), card.inference.batch_size):
        chunk = starts[b0:b0 + card.inference.batch_size]
        batch = np.stack([image[:, z:z + patch[0], y:y + patch[1], x:x + patch[2]] for z, y, x in chunk])
        rows = run(batch.astype(np.float32, copy=False))
        if rows.ndim != 3 or rows.shape[0] != len(chunk) or rows.shape[2] != BOX_COLUMNS:
            raise RuntimeError(f"the box model returned {rows.shape} for a {batch.shape} batch, "
                               f"expected ({len(chunk)}, N, {BOX_COLUMNS})")
        for start, boxes in zip(chunk, rows):
            for z0, y0, x0, z1, y1, x1, score in boxes:
                if not score >= card.detection.threshold:  # also drops NaN scores
                    continue
                centre = np.array(start) + (np.array([z0, y0, x0]) + np.array([z1, y1, x1])) / 2
                if np.any(centre < 0) or np.any(centre > np.array(shape) - 1):
                    continue  # in the padding
                k = tuple(int(round(v)) for v in centre)
                if inside is not None and not inside[k]:
                    continue
                half = np.abs(np.array([z1 - z0, y1 - y0, x1 - x0])) / 2 * spacing_kji
                out.append((grid.index_to_patient(centre), float(half.mean()), float(score)))
        progress(min(1.0, (b0 + len(chunk)) / len(starts)), f"patch {b0 + len(chunk)}/{len(starts)}")
    return out


def _merge(found: list[Detected], spacing: np.ndarray, min_distance_mm: float, limit: int) -> list[Detected]:
    """Strongest first; a detection within another's radius (or ``min_distance_mm``) is the same object."""
    kept: list[Detected] = []
    for d in sorted(found, key=lambda d: -d.score):
        p = np.asarray(d.kji) * spacing
        if all(np.linalg.norm(p - np.asarray(o.kji) * spacing) > max(min_distance_mm, o.radius_mm) for o in kept):
            kept.append(d)
            if len(kept) >= limit:
                break
    return kept


def detect(volume: Volume, card: ModelCard, run: PatchRunner, where: np.ndarray | None = None,
           progress: Progress | None = None) -> list[Detected]:
    """The detections of ``card``'s model on ``volume``, strongest first, centres inside ``where`` (source grid)."""
    if card.task != "detection" or card.detection is None:
        raise ValueError(f"model {card.name!r} is a {card.task} model, not a detector")
    report = progress or (lambda f, m: None)
    report(0.0, "resampling to the network grid")
    image, grid = prepare_input([volume], card.input, card.preprocessing)
    inside = _grid_mask(where, volume.geometry, grid) if where is not None else None
    xyz = card.input.array_axes == "xyz"
    if xyz:  # the network's own axis order; centres are converted back below
        image = np.ascontiguousarray(image.transpose(0, 3, 2, 1))
        inside = None if inside is None else np.ascontiguousarray(inside.transpose(2, 1, 0))
        grid = Geometry(grid.shape[::-1], grid.origin, grid.spacing[::-1],
                        tuple(np.asarray(grid.direction).reshape(3, 3)[:, ::-1].ravel()))
    step = _heatmap if card.detection.output == "heatmap" else _boxes
    found = step(image, grid, card, run, inside, lambda f, m: report(0.05 + 0.9 * f, m))
    source = volume.geometry
    spacing = np.asarray(source.spacing[::-1], float)
    detections = []
    for centre, radius, score in found:
        kji = source.patient_to_index(centre)
        if np.any(kji < -0.5) or np.any(kji > np.array(source.shape) - 0.5):
            continue
        detections.append(Detected(tuple(float(v) for v in kji), radius, score))
    report(1.0, f"{len(detections)} detections")
    return _merge(detections, spacing, card.detection.min_distance_mm, card.detection.max_candidates)
