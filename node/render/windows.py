"""Window (level/width) presets and grey-scale mapping to 8-bit display values."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Window", "CT_WINDOWS", "auto_window", "apply_window", "resolve_window"]


@dataclass(frozen=True)
class Window:
    center: float
    width: float

    def __post_init__(self) -> None:
        if not np.isfinite(self.center) or not np.isfinite(self.width) or self.width <= 0:
            raise ValueError(f"window needs a finite center and a positive width, got {self.center}, {self.width}")


# Hounsfield-unit presets (centre, width) as commonly used on CT consoles.
CT_WINDOWS: dict[str, Window] = {
    "soft_tissue": Window(40, 400),
    "mediastinum": Window(50, 350),
    "lung": Window(-600, 1500),
    "bone": Window(400, 1800),
    "vascular": Window(150, 600),
    "brain": Window(40, 80),
}


def auto_window(array: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.5) -> Window:
    """A window spanning the central percentiles (for MR, whose intensities have no fixed scale)."""
    sample = array.ravel()[:: max(1, array.size // 2_000_000)]  # a strided sample is plenty
    lo, hi = np.percentile(sample, [low_pct, high_pct])
    if hi <= lo:
        hi = lo + 1.0
    return Window(float((lo + hi) / 2), float(hi - lo))


def resolve_window(spec, modality: str, array: np.ndarray) -> Window:
    """A ``Window`` from a preset name, "auto", or an explicit Window/(center, width)."""
    if isinstance(spec, Window):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return Window(float(spec[0]), float(spec[1]))
    if spec == "auto":
        return auto_window(array)
    if isinstance(spec, str) and spec in CT_WINDOWS:
        if modality != "CT":
            raise ValueError(f"window preset {spec!r} is in Hounsfield units and only fits CT, not {modality}")
        return CT_WINDOWS[spec]
    raise ValueError(f"unknown window {spec!r}; presets: auto, {', '.join(CT_WINDOWS)}")


def apply_window(image: np.ndarray, window: Window) -> np.ndarray:
    """Linear VOI mapping of ``image`` to uint8 (0 below the window, 255 above)."""
    lo = window.center - window.width / 2
    scaled = (np.asarray(image, dtype=np.float32) - lo) * (255.0 / window.width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
