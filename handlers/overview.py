"""`overview`: a study-overview Secondary Capture — a montage of evenly spaced slices per series.

Useful on its own (a glance at what arrived, in any PACS viewer) and the spine's end-to-end
handler: it runs on any modality with pixel data. Slices are shown in geometric order with
their position along the slice normal, windowed for the modality.
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from node.handler_api import Handler, HandlerInput, HandlerRefusal, register
from node.render.font import glyph, text_mask
from node.results import ImageSeries, safe_text
from node.volume import SeriesData


class OverviewParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tiles: int = Field(16, ge=1, le=64, description="slices per montage")
    tile_size: int = Field(256, ge=64, le=1024, description="pixels per tile side")
    ct_window: tuple[float, float] = Field((40.0, 400.0), description="CT window (center, width) in HU")


def _window(img: np.ndarray, center: float, width: float) -> np.ndarray:
    lo = center - width / 2
    return (np.clip((img.astype(np.float32) - lo) / max(width, 1e-6), 0, 1) * 255).astype(np.uint8)


def _auto_window(series: SeriesData, pixels: np.ndarray, ct_window: tuple[float, float]) -> tuple[float, float]:
    if series.modality == "CT":
        return ct_window
    ds = series.first
    wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
    if wc is not None and ww is not None:
        first = lambda v: float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)  # noqa: E731
        return first(wc), first(ww)
    lo, hi = np.percentile(pixels[:: max(1, pixels.shape[0] // 8)], (1, 99))
    return (lo + hi) / 2, max(hi - lo, 1.0)


def _drawable(ch: str) -> bool:
    try:
        glyph(ch)
        return True
    except ValueError:
        return False


def draw_text(img: np.ndarray, text: str, x: int, y: int, value: int = 255) -> None:
    """Burn ``text`` in at (x, y) with a dark outline so it reads on any background."""
    mask = text_mask("".join(ch if _drawable(ch) else " " for ch in text), scale=2)
    h, w = min(mask.shape[0], img.shape[0] - y), min(mask.shape[1], img.shape[1] - x)
    if h <= 0 or w <= 0:
        return
    mask = mask[:h, :w]
    region = img[y:y + h, x:x + w]
    halo = ndimage.binary_dilation(mask)
    region[halo] = 0
    region[mask] = value


def _fit(img: np.ndarray, size: int, aspect: float) -> np.ndarray:
    """Scale a 2-D image into a size×size tile, keeping the physical aspect ratio (row/col spacing)."""
    h, w = img.shape[0] * aspect, img.shape[1]
    scale = size / max(h, w)
    out = ndimage.zoom(img.astype(np.float32), (scale * aspect, scale), order=1)
    tile = np.zeros((size, size), dtype=np.uint8)
    oh, ow = min(size, out.shape[0]), min(size, out.shape[1])
    y0, x0 = (size - oh) // 2, (size - ow) // 2
    tile[y0:y0 + oh, x0:x0 + ow] = np.clip(out[:oh, :ow], 0, 255).astype(np.uint8)
    return tile


@register
class Overview(Handler):
    name = "overview"
    version = "1.0.0"
    description = "Montage of evenly spaced slices of each series, windowed and annotated"
    Params = OverviewParams

    def run(self, inp: HandlerInput, progress) -> list:
        p: OverviewParams = self.params
        out = []
        for n, series in enumerate(inp.series):
            if series.volume is not None:
                stack = series.volume.array
                geom = series.volume.geometry
                aspect = geom.spacing[1] / geom.spacing[0]
                idx = np.unique(np.linspace(0, stack.shape[0] - 1, min(p.tiles, stack.shape[0])).round().astype(int))
                labels = [f"{float(np.dot(geom.index_to_patient((k, 0, 0)), geom.normal)):.1f} mm" for k in idx]
                frames = [stack[k] for k in idx]
            elif series.images:
                idx = np.unique(np.linspace(0, len(series.images) - 1, min(p.tiles, len(series.images)))
                                .round().astype(int))
                frames = [series.images[k] if series.images[k].ndim == 2 else series.images[k][0] for k in idx]
                labels = [f"#{k + 1}" for k in idx]
                aspect = 1.0
            else:
                raise HandlerRefusal(f"series {series.series_uid} has no pixel data")
            center, width = _auto_window(series, np.stack(frames) if series.volume is None else series.volume.array,
                                         p.ct_window)
            cols = math.ceil(math.sqrt(len(frames)))
            rows = math.ceil(len(frames) / cols)
            size = p.tile_size
            montage = np.zeros((rows * size + 24, cols * size), dtype=np.uint8)
            for i, (img, label) in enumerate(zip(frames, labels)):
                r, c = divmod(i, cols)
                tile = _fit(_window(img, center, width), size, aspect)
                y, x = 24 + r * size, c * size
                montage[y:y + size, x:x + size] = tile
                draw_text(montage, label, x + 4, y + size - 18, value=255)
            title = f"{series.modality} {series.description or series.series_uid}"[:60]
            draw_text(montage, f"{title}  W{width:.0f} L{center:.0f}", 4, 6, value=255)
            out.append(ImageSeries(
                source_series_uid=series.series_uid,
                description=safe_text(f"AI: overview {series.description or series.modality}"),
                frames=montage[None], burned_in_annotation=True,
            ))
            progress((n + 1) / len(inp.series), f"series {n + 1}/{len(inp.series)}")
        return out
