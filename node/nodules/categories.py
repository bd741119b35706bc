"""Size categories from published thresholds, reported as computed values (not a diagnosis).

- Volume class (Fleischner Society 2017, solid nodules, by volume): < 100 mm3, 100-250 mm3, > 250 mm3.
- Lung-RADS v2022 size class (baseline screening), by mean diameter: solid < 6, 6-<8, 8-<15, >= 15 mm;
  part-solid by total mean diameter < 6 mm, else by the solid part < 6, 6-<8, >= 8 mm; ground
  glass < 30 mm or >= 30 mm. The class is named by its Lung-RADS number, the measurement that put
  the nodule there, and the threshold: no clinical context (history, growth, features) enters it.
"""
from __future__ import annotations

__all__ = ["size_category", "volume_class", "CATEGORIES"]

CATEGORIES = ("lung_rads_2", "lung_rads_3", "lung_rads_4a", "lung_rads_4b")


def volume_class(volume_mm3: float) -> str:
    """Fleischner 2017 volume band of a solid nodule."""
    return "lt_100" if volume_mm3 < 100 else "100_250" if volume_mm3 <= 250 else "gt_250"


def size_category(m) -> str:
    """Lung-RADS v2022 baseline size class of a measured nodule (``NoduleMeasurement``)."""
    d = round(m.mean_diameter_mm, 1)
    if m.type == "ground_glass":
        return "lung_rads_2" if d < 30 else "lung_rads_3"
    if m.type == "part_solid":
        if d < 6:
            return "lung_rads_2"
        s = round(m.solid_diameter_mm, 1)
        return "lung_rads_3" if s < 6 else "lung_rads_4a" if s < 8 else "lung_rads_4b"
    return "lung_rads_2" if d < 6 else "lung_rads_3" if d < 8 else "lung_rads_4a" if d < 15 else "lung_rads_4b"
