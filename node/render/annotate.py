"""Burn orientation labels, a scale bar and a caption into rendered images.

Secondary Captures carry no plane geometry, so the orientation (patient L/R, A/P, H/F at the
image edges) and the scale must be visible in the pixels themselves. Text is white with a
black outline so it reads on any background.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.render.font import GLYPH_H, text_mask

__all__ = ["Overlay", "overlay", "annotate", "scale_bar_length_mm", "text_scale"]

_NICE_MM = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500)


def text_scale(rows: int, cols: int) -> int:
    """Glyph enlargement for an image size: 7-pixel glyphs up to 255 px, 14 at 512, ..."""
    return max(1, min(rows, cols) // 256)


def scale_bar_length_mm(cols: int, pixel_spacing_mm: float, fraction: float = 0.25) -> int | None:
    """The longest round length (mm) that fits in ``fraction`` of the image width, or None."""
    fits = [mm for mm in _NICE_MM if mm / pixel_spacing_mm <= fraction * cols]
    return fits[-1] if fits else None


@dataclass(frozen=True, eq=False)
class Overlay:
    """Annotation pixels of one image size: ``white`` text and ``black`` outlines around it.

    Made once and burned into every frame of a stack, so a 100-image series costs one layout.
    """

    white: np.ndarray
    black: np.ndarray

    def burn(self, images: np.ndarray) -> np.ndarray:
        """A copy of ``images`` ((..., rows, cols) or (..., rows, cols, 3) uint8) with the overlay."""
        rgb = images.ndim >= 3 and images.shape[-1] == 3 and images.shape[-3:-1] == self.white.shape
        plane = images.shape[-3:-1] if rgb else images.shape[-2:]
        if images.dtype != np.uint8 or plane != self.white.shape:
            raise ValueError(
                f"overlay for {self.white.shape} images needs uint8 (..., rows, cols[, 3]), "
                f"got {images.dtype} {images.shape}"
            )
        out = images.copy()
        if rgb:
            out[..., self.black, :] = 0
            out[..., self.white, :] = 255
        else:
            out[..., self.black] = 0
            out[..., self.white] = 255
        return out


def _stamp(white: np.ndarray, black: np.ndarray, mask: np.ndarray, top: int, left: int) -> None:
    """Draw ``mask`` at (top, left) with a one-pixel black outline, clipped to the image."""
    pad = np.pad(mask, 1)
    outline = ndimage.binary_dilation(pad, structure=np.ones((3, 3), bool)) & ~pad
    top, left = top - 1, left - 1
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + pad.shape[0], white.shape[0]), min(left + pad.shape[1], white.shape[1])
    if r1 <= r0 or c1 <= c0:
        return
    sub = (slice(r0 - top, r1 - top), slice(c0 - left, c1 - left))
    w, b = white[r0:r1, c0:c1], black[r0:r1, c0:c1]
    w[outline[sub]], b[outline[sub]] = False, True
    w[pad[sub]], b[pad[sub]] = True, False


def overlay(rows: int, cols: int, labels: dict[str, str] | None = None, pixel_spacing_mm: float | None = None,
            caption: str | None = None) -> Overlay:
    """The annotation overlay for (rows, cols) images.

    ``labels`` maps "left"/"right"/"top"/"bottom" to patient-direction letters (see
    ``orientation.edge_labels``); ``pixel_spacing_mm`` (square pixels) adds a scale bar at the
    bottom left; ``caption`` goes top left where it fits beside the top label.
    """
    white, black = np.zeros((rows, cols), bool), np.zeros((rows, cols), bool)
    s = text_scale(rows, cols)
    margin = 3 * s
    h = GLYPH_H * s
    for edge, text in (labels or {}).items():
        m = text_mask(text, s)
        if edge == "left":
            pos = ((rows - h) // 2, margin)
        elif edge == "right":
            pos = ((rows - h) // 2, cols - margin - m.shape[1])
        elif edge == "top":
            pos = (margin, (cols - m.shape[1]) // 2)
        elif edge == "bottom":
            pos = (rows - margin - h, (cols - m.shape[1]) // 2)
        else:
            raise ValueError(f"unknown label edge {edge!r}; edges: left, right, top, bottom")
        _stamp(white, black, m, *pos)
    if caption:
        # Top left, only where it clears the centred top label: the SeriesDescription says it too.
        m = text_mask(caption, s)
        top_w = text_mask((labels or {}).get("top", ""), s).shape[1]
        if margin + m.shape[1] + 2 * margin <= (cols - top_w) // 2:
            _stamp(white, black, m, margin, margin)
    if pixel_spacing_mm:
        mm = scale_bar_length_mm(cols, pixel_spacing_mm)
        if mm is not None:
            length = max(1, int(round(mm / pixel_spacing_mm)))
            thick = max(2, s)
            bar = np.zeros((3 * thick, length), bool)  # a bar with end ticks pointing up
            bar[-thick:] = True
            bar[:, :thick] = bar[:, -thick:] = True
            bar_top = rows - margin - bar.shape[0]
            _stamp(white, black, bar, bar_top, margin)
            _stamp(white, black, text_mask(f"{mm} mm", s), bar_top - h - 2 * s, margin)
    return Overlay(white, black)


def annotate(image: np.ndarray, labels: dict[str, str] | None = None, pixel_spacing_mm: float | None = None,
             caption: str | None = None) -> np.ndarray:
    """A copy of one image ((rows, cols) or (rows, cols, 3) uint8) with ``overlay`` burned in."""
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(
            f"annotate needs a uint8 (rows, cols) or (rows, cols, 3) image, got {image.dtype} {image.shape}"
        )
    return overlay(image.shape[0], image.shape[1], labels, pixel_spacing_mm, caption).burn(image)
