"""A model's validated domain: what an input looks like (``InputFacts``), whether it lies inside the
card's ``validated_domain`` (``domain_flags``, run by the handler before inference), and the domain
that a set of training cases spans (``domain_from_facts``, run by ``hilum train``).

Ranges measured on training data are widened a little (``GEOMETRY_MARGIN``, ``INTENSITY_MARGIN_HU``):
twenty phantoms do not show the full spread of the family they were drawn from, and a new seed of
that family must not be refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from node.models.card import MEASURED_PERCENTILES, PLANES, IntensityProfile, ModelCard, OrientationDomain, Range, ValidatedDomain
from node.models.inference import network_grid, resample
from node.results import QualityFlag
from node.volume import Volume

__all__ = ["InputFacts", "measure_input", "domain_flags", "domain_from_facts", "PERCENTILES",
           "GEOMETRY_MARGIN", "INTENSITY_MARGIN_HU"]

PERCENTILES = MEASURED_PERCENTILES  # a card may only state ranges for these (card.IntensityProfile)
GEOMETRY_MARGIN = 0.1  # ranges of spacing, thickness, FOV and coverage widened by 10 % each way
INTENSITY_MARGIN_HU = 40.0  # plus a quarter of the observed spread
_MAX_SAMPLES = 1_000_000  # body percentiles from a strided subsample: the same answer, a fraction of the time


@dataclass(frozen=True)
class InputFacts:
    """What the domain checks compare, measured on one input series."""

    modality: str | None
    body_region: str | None
    pixel_spacing_mm: tuple[float, float]  # (column, row) spacing
    slice_thickness_mm: float
    fov_mm: float
    coverage_mm: float
    plane: str
    tilt_deg: float
    patient_position: str | None
    body_percentiles: dict[int, float]  # empty when no voxel lies above the body threshold


def _header_value(header, keyword: str) -> str | None:
    value = header.get(keyword) if header is not None else None
    return str(value).strip().upper() or None if value not in (None, "") else None


def measure_input(volume: Volume, header=None, modality: str | None = None,
                  body_above: float = -500.0, grid_mm: float = 4.0) -> InputFacts:
    """Facts of ``volume`` (and its first DICOM header, when there is one); intensities on a
    ``grid_mm`` isotropic grid, so a 0.7 mm and a 3 mm scan of one body have the same profile."""
    g = volume.geometry
    sx, sy, sz = g.spacing
    thickness = sz
    if header is not None and header.get("SliceThickness") not in (None, ""):
        try:
            thickness = float(header.SliceThickness)
        except (TypeError, ValueError):
            pass  # an unreadable attribute: the slice spacing says as much
    normal = np.asarray(g.normal, dtype=float)
    axis = int(np.argmax(np.abs(normal)))  # patient x: sagittal slices, y: coronal, z: axial
    tilt = math.degrees(math.acos(min(1.0, abs(float(normal[axis])) / float(np.linalg.norm(normal)))))
    arr = resample(volume.array, g, network_grid(g, (grid_mm,) * 3, "LPS"), linear=True, antialias=True)
    stride = max(1, round((arr.size / _MAX_SAMPLES) ** (1 / 3)))
    sample = arr[::stride, ::stride, ::stride].astype(np.float32, copy=False)
    body = sample[sample > body_above]
    pct = {p: float(v) for p, v in zip(PERCENTILES, np.percentile(body, PERCENTILES))} if body.size else {}
    return InputFacts(
        modality=modality or _header_value(header, "Modality"),
        body_region=_header_value(header, "BodyPartExamined"),
        pixel_spacing_mm=(float(sx), float(sy)), slice_thickness_mm=float(thickness),
        fov_mm=float(max(g.shape[2] * sx, g.shape[1] * sy)), coverage_mm=float(g.shape[0] * sz),
        plane=("sagittal", "coronal", "axial")[axis], tilt_deg=tilt,
        patient_position=_header_value(header, "PatientPosition"), body_percentiles=pct)


def _flag(check: str, reason: str) -> QualityFlag:
    return QualityFlag(check, f"outside the validated domain: {reason}", kind="domain")


def domain_flags(card: ModelCard, facts: InputFacts) -> list[QualityFlag]:
    """One ``domain`` quality flag per way ``facts`` leave the card's validated domain."""
    d = card.validated_domain
    if d is None:
        return []
    flags = []
    if d.modality and facts.modality and facts.modality != d.modality:
        flags.append(_flag("modality_out_of_domain", f"modality {facts.modality}, validated {d.modality}"))
    # No validated regions listed: the card's input.body_region is still what the model was made
    # for, so a head CT given to a chest model is flagged either way. Both are compared upper-cased,
    # as _header_value reads BodyPartExamined; an input without one is not flagged.
    regions = d.body_regions or [card.input.body_region.strip().upper()]
    if facts.body_region and facts.body_region not in regions:
        flags.append(_flag("body_region_out_of_domain",
                           f"body part {facts.body_region}, validated {', '.join(regions)}"))
    if d.pixel_spacing_mm and not all(s in d.pixel_spacing_mm for s in facts.pixel_spacing_mm):
        flags.append(_flag("pixel_spacing_out_of_domain", "pixel spacing "
                           + " x ".join(f"{s:.2f}" for s in facts.pixel_spacing_mm)
                           + f" mm, validated {d.pixel_spacing_mm.describe('mm')}"))
    for field, what, value in (("slice_thickness_mm", "slice thickness", facts.slice_thickness_mm),
                               ("fov_mm", "field of view", facts.fov_mm),
                               ("coverage_mm", "coverage along the slices", facts.coverage_mm)):
        accepted: Range | None = getattr(d, field)
        if accepted is not None and value not in accepted:
            flags.append(_flag(f"{field.removesuffix('_mm')}_out_of_domain",
                               f"{what} {value:.1f} mm, validated {accepted.describe('mm')}"))
    o = d.orientation
    if o is not None:
        if facts.plane not in o.planes:
            flags.append(_flag("orientation_out_of_domain", f"{facts.plane} slices, validated {', '.join(o.planes)}"))
        elif facts.tilt_deg > o.max_tilt_deg:
            flags.append(_flag("orientation_out_of_domain", f"slices tilted {facts.tilt_deg:.0f} degrees from "
                               f"{facts.plane}, validated up to {o.max_tilt_deg:g}"))
        if o.patient_positions and facts.patient_position and facts.patient_position not in o.patient_positions:
            flags.append(_flag("patient_position_out_of_domain", f"patient position {facts.patient_position}, "
                               f"validated {', '.join(o.patient_positions)}"))
    if d.intensity is not None:
        flags += _intensity_flags(d.intensity, facts)
    return flags


def _intensity_flags(profile: IntensityProfile, facts: InputFacts) -> list[QualityFlag]:
    if not facts.body_percentiles:
        return [_flag("intensity_out_of_domain", f"no voxel above {profile.body_above:g}: no body found")]
    off = [f"P{p} {facts.body_percentiles[p]:.0f} (validated {r.describe()})"
           for p, r in sorted(profile.percentiles.items())
           if p in facts.body_percentiles and facts.body_percentiles[p] not in r]
    if not off:
        return []
    return [_flag("intensity_out_of_domain", f"body intensities above {profile.body_above:g}: " + ", ".join(off))]


# ---------------------------------------------------------------- the domain of training data

def _widen(values: Iterable[float], digits: int = 2) -> Range:
    values = list(values)
    lo, hi = min(values), max(values)
    return Range(min=round(lo * (1 - GEOMETRY_MARGIN), digits), max=round(hi * (1 + GEOMETRY_MARGIN), digits))


def domain_from_facts(facts: Sequence[InputFacts], *, body_region: str | None, tilt_margin_deg: float,
                      trained_on: Sequence[str], validated_on: Sequence[str],
                      body_above: float = -500.0, grid_mm: float = 4.0) -> ValidatedDomain:
    """The domain that ``facts`` (every training and validation case) span.

    ``tilt_margin_deg``: the training augmentation's rotation, which the model has seen on top of
    the cases' own tilt.
    """
    if not facts:
        raise ValueError("no cases to measure a domain from")
    modalities = {f.modality for f in facts if f.modality}
    positions = sorted({f.patient_position for f in facts if f.patient_position})
    planes = [p for p in PLANES if p in {f.plane for f in facts}]
    percentiles = {}
    for p in PERCENTILES:
        seen = [f.body_percentiles[p] for f in facts if p in f.body_percentiles]
        if seen:
            margin = INTENSITY_MARGIN_HU + 0.25 * (max(seen) - min(seen))
            percentiles[p] = Range(min=round(min(seen) - margin, 1), max=round(max(seen) + margin, 1))
    return ValidatedDomain(
        modality=modalities.pop() if len(modalities) == 1 else None,
        body_regions=sorted({f.body_region for f in facts if f.body_region} | ({body_region} if body_region else set())),
        pixel_spacing_mm=_widen(s for f in facts for s in f.pixel_spacing_mm),
        slice_thickness_mm=_widen(f.slice_thickness_mm for f in facts),
        fov_mm=_widen((f.fov_mm for f in facts), 0),
        coverage_mm=_widen((f.coverage_mm for f in facts), 0),
        orientation=OrientationDomain(planes=planes, max_tilt_deg=round(max(f.tilt_deg for f in facts)
                                                                        + tilt_margin_deg, 1),
                                      patient_positions=positions),
        intensity=(IntensityProfile(body_above=body_above, grid_mm=grid_mm, percentiles=percentiles)
                   if percentiles else None),
        trained_on=list(trained_on), validated_on=list(validated_on))
