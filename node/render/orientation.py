"""Display convention and orientation labels.

Hilum shows every render in the radiological convention, in DICOM patient coordinates (LPS:
+x = patient left, +y = posterior, +z = head):

=========  ===================  ===================  ==============================
view       image right (+col)   image down (+row)    so the viewer sees
=========  ===================  ===================  ==============================
axial      +x (patient left)    +y (posterior)       from the feet; R on the left, A on top
coronal    +x (patient left)    -z (feet)            from the front; R on the left, H on top
sagittal   +y (posterior)       -z (feet)            from the patient's left; A on the left, H on top
=========  ===================  ===================  ==============================

The volume-rendering camera follows the same rule: at azimuth 0 it looks from anterior to
posterior (the coronal view), at azimuth +90 from the patient's left (the sagittal view).
Labels are always computed from these patient-space directions, never from array order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PlaneView", "PLANES", "direction_label", "edge_labels"]

# Letter for the positive and negative direction of each LPS axis.
_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))
# A component enters an oblique label when it is at least this large (about 17 degrees off-axis).
_OBLIQUE_MIN = 0.3


@dataclass(frozen=True)
class PlaneView:
    """A display plane: the patient directions of image right and image down."""

    name: str
    right: tuple[float, float, float]
    down: tuple[float, float, float]

    @property
    def normal(self) -> np.ndarray:
        """Direction from one slice of a stack to the next (right x down, points away from the viewer)."""
        return np.cross(self.right, self.down)


PLANES: dict[str, PlaneView] = {
    "axial": PlaneView("axial", (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": PlaneView("coronal", (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": PlaneView("sagittal", (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


def direction_label(vec) -> str:
    """Patient-direction letters of a vector, dominant first: (1,0,0) → "L", (0.7,0.7,0) → "LP"."""
    v = np.asarray(vec, dtype=float)
    n = np.linalg.norm(v)
    if v.shape != (3,) or n == 0:
        raise ValueError(f"direction must be a non-zero 3-vector, got {vec!r}")
    v = v / n
    order = np.argsort(-np.abs(v), kind="stable")
    letters = [_LETTERS[a][0 if v[a] > 0 else 1] for a in order if abs(v[a]) >= _OBLIQUE_MIN]
    return "".join(letters)


def edge_labels(right, down) -> dict[str, str]:
    """Labels for the four image edges given the patient directions of image right and down."""
    r, d = np.asarray(right, float), np.asarray(down, float)
    return {
        "left": direction_label(-r),
        "right": direction_label(r),
        "top": direction_label(-d),
        "bottom": direction_label(d),
    }
