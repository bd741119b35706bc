"""One viewer's session: the latest requested view in, encoded frames out, never lagging the hand.

The browser owns the view state (camera, mode, preset, window, VR shift/opacity, crosshair, pane
sizes) and sends all of it on every change as a ``ViewRequest``. The session keeps only the
newest request (latest wins: views requested while a frame renders are never rendered) and a
render loop re-renders just the panes whose inputs changed: MPR panes first (NumPy, a few ms)
then the 3D pane (VTK, on the series' render thread). While the user drags (``interacting``)
the 3D pane renders at reduced quality (lower JPEG quality, and the series' half-resolution
preview where rendering is in software, else half the rays at double sample distance, see
``CachedSeries.render``); the release request differs only in quality, so exactly one
full-quality frame follows. Each pane renders from the newest request when its turn comes, and at most
``max_in_flight`` frames may be on the wire unacknowledged, so a slow link drops frames
instead of queueing them: the view on screen is never more than one frame behind the hand.

Per session the work is bounded: one frame in progress, panes of at most 1024x1024 pixels,
``max_in_flight`` frames buffered. Frames travel as one binary WebSocket message: a 4-byte
big-endian header length, the JSON header (pane, seq, quality, timings, pane geometry), JPEG.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import time
from typing import Awaitable, Callable, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from node.render.live_planes import plane_frame
from node.render.orientation import edge_labels
from node.render.volume_cache import CachedSeries
from node.render.vr import PRESETS, Camera
from node.render.windows import CT_WINDOWS, Window, auto_window

__all__ = ["ViewRequest", "LiveSession", "presets_for", "default_windows", "parse_request", "pack_frame",
           "unpack_frame", "PANES"]

log = logging.getLogger(__name__)
PANES = ("3d", "axial", "coronal", "sagittal")
MAX_SIDE = 1024
JPEG_QUALITY = {"interactive": 70, "full": 90}
# How far the VR "shift" control moves a preset, per unit, in the preset's units: HU for CT
# presets, fractions of the intensity range for the relative (MR) one.
SHIFT_UNITS = {False: 500.0, True: 0.5}


def presets_for(modality: str) -> list[str]:
    """VR presets that fit a modality: Hounsfield presets for CT, the relative one otherwise."""
    return [name for name, p in PRESETS.items() if (modality == "CT") != p.relative]


def default_windows(modality: str, array: np.ndarray) -> dict[str, list[float]]:
    """Grey window (centre, width) offered with each preset, for MIP/MinIP and the MPR panes."""
    if modality != "CT":
        w = auto_window(array)
        return {name: [w.center, w.width] for name in presets_for(modality)}
    return {name: [CT_WINDOWS[name].center, CT_WINDOWS[name].width] for name in presets_for(modality)}


class ViewRequest(BaseModel):
    """Everything the browser shows; see the module docstring. Units: degrees, mm, HU (CT)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["view"] = "view"
    seq: int = Field(ge=0)
    interacting: bool = False
    azimuth: float = Field(0.0, ge=-1e6, le=1e6)
    elevation: float = Field(0.0, ge=-90, le=90)
    zoom: float = Field(1.0, ge=0.1, le=20)
    pan: tuple[float, float] = (0.0, 0.0)
    mode: Literal["vr", "mip", "minip"] = "vr"
    preset: str = "bone"
    window: tuple[float, float] | None = None  # (centre, width); None: the preset's window
    shift: float = Field(0.0, ge=-2, le=2)  # VR: preset moved by shift * SHIFT_UNITS
    opacity: float = Field(1.0, ge=0, le=4)  # VR: opacity scale
    slab: float = Field(0.0, ge=0, le=2000)  # MIP/MinIP: slab thickness (mm) about the crosshair; 0: all
    crosshair: tuple[float, float, float] | None = None  # LPS mm; None: the volume's centre
    sizes: dict[Literal["3d", "axial", "coronal", "sagittal"], tuple[int, int]] = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; presets: {', '.join(PRESETS)}")
        return v

    @field_validator("window")
    @classmethod
    def _positive_width(cls, v):
        if v is not None and not (np.isfinite(v[0]) and np.isfinite(v[1]) and v[1] > 0):
            raise ValueError("window must be (centre, width) with a finite centre and a positive width")
        return v

    @field_validator("pan")
    @classmethod
    def _pan_range(cls, v):
        if not all(np.isfinite(x) and abs(x) <= 1e4 for x in v):
            raise ValueError("pan must be two finite millimetre offsets within 10 m")
        return v

    @field_validator("sizes")
    @classmethod
    def _pane_sizes(cls, v):
        for pane, (rows, cols) in v.items():
            if not (16 <= rows <= MAX_SIDE and 16 <= cols <= MAX_SIDE):
                raise ValueError(f"pane {pane!r} size must be 16..{MAX_SIDE} pixels per side, got {rows}x{cols}")
        return v

    @property
    def camera(self) -> Camera:
        return Camera(self.azimuth % 360.0, self.elevation, self.zoom, self.pan)


def parse_request(data: dict) -> ViewRequest:
    """A ViewRequest, or ValueError whose message names the offending field."""
    try:
        return ViewRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "message"
        raise ValueError(f"{where}: {err['msg']}") from None


def pack_frame(header: dict, jpeg: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + jpeg


def unpack_frame(message: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", message[:4])
    return json.loads(message[4:4 + n]), message[4 + n:]


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class LiveSession:
    """Renders the newest ``ViewRequest`` of one viewer: ``send`` takes each packed frame,
    ``send_message`` JSON messages: {"type": "error", "message"} for a request that cannot be
    rendered (naming the pane and the field), {"type": "idle", "seq"} once every pane shows
    request ``seq``."""

    def __init__(self, series: CachedSeries, send: Callable[[bytes], Awaitable[None]],
                 send_message: Callable[[dict], Awaitable[None]], max_in_flight: int = 2) -> None:
        self.series = series
        self._send = send
        self._send_message = send_message
        self.max_in_flight = max_in_flight
        self.windows = default_windows(series.modality, series.volume.array)
        self.presets = presets_for(series.modality)
        self._centre = np.asarray(series.info()["center_mm"], float)
        self._latest: ViewRequest | None = None
        self._shown: dict[str, tuple] = {}  # pane -> inputs of the frame last sent
        self._in_flight = 0
        self._idle_seq: int | None = None
        self._changed = asyncio.Event()
        self.frames_sent = 0

    def update(self, request: ViewRequest) -> None:
        self._latest = request
        self._changed.set()

    def ack(self) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        self._changed.set()

    def _window(self, r: ViewRequest) -> Window:
        c, w = r.window if r.window is not None else self.windows.get(r.preset, self.windows[self.presets[0]])
        return Window(c, w)

    def _inputs(self, pane: str, r: ViewRequest) -> tuple | None:
        """What a pane's pixels depend on (None: the pane is not shown)."""
        size = r.sizes.get(pane)
        if size is None:
            return None
        if pane != "3d":
            return (size, self._window(r), r.crosshair)
        if r.mode == "vr":
            look = (r.preset, r.shift, r.opacity)
        else:
            look = (self._window(r), self._slab(r))
        # full_ready: a full-quality frame drawn by the preview is drawn again once the full scene is.
        return (size, r.camera, r.mode, look, "interactive" if r.interacting else "full", self.series.full_ready)

    def _slab(self, r: ViewRequest) -> tuple[tuple[float, ...], float] | None:
        return (tuple(self._crosshair(r)), r.slab) if r.slab > 0 else None

    def _due(self) -> tuple[str, ViewRequest, tuple] | None:
        r = self._latest
        if r is None:
            return None
        for pane in PANES[1:] + PANES[:1]:  # MPR panes are cheap: they go first
            inputs = self._inputs(pane, r)
            if inputs is not None and self._shown.get(pane) != inputs:
                return pane, r, inputs
        return None

    async def run(self) -> None:
        """Render until cancelled (the WebSocket closed)."""
        loop = asyncio.get_running_loop()

        def wake(_) -> None:  # on the render thread, when the full scene is warm
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._changed.set)

        self.series.warm.add_done_callback(wake)
        while True:
            await self._changed.wait()
            self._changed.clear()
            while self._in_flight < self.max_in_flight and (due := self._due()) is not None:
                pane, request, inputs = due
                self._shown[pane] = inputs  # also on error: a bad request is not retried in a loop
                try:
                    frame = await (self._render_3d(request) if pane == "3d" else self._render_plane(pane, request))
                except ValueError as exc:
                    await self._send_message({"type": "error", "message": f"{pane}: {exc}"})
                    continue
                except Exception as exc:  # noqa: BLE001 - the viewer is told; the session goes on
                    log.exception("view3d: rendering the %s pane failed", pane)
                    await self._send_message({"type": "error", "message": f"{pane}: rendering failed: {exc}"})
                    continue
                self._in_flight += 1
                self.frames_sent += 1
                await self._send(frame)
            latest = self._latest
            if latest is not None and self._due() is None and self._idle_seq != latest.seq:
                self._idle_seq = latest.seq
                await self._send_message({"type": "idle", "seq": latest.seq})

    def _crosshair(self, r: ViewRequest) -> np.ndarray:
        return self._centre if r.crosshair is None else np.asarray(r.crosshair, float)

    async def _render_plane(self, plane: str, r: ViewRequest) -> bytes:
        def work() -> bytes:
            t = time.perf_counter()
            pf = plane_frame(self.series.volume, plane, self._crosshair(r), self._window(r), r.sizes[plane])
            t_render = time.perf_counter() - t
            jpeg = _jpeg(pf.image, JPEG_QUALITY["full"])
            header = {"pane": plane, "seq": r.seq, "quality": "full", "render_ms": round(t_render * 1000, 1),
                      "encode_ms": round((time.perf_counter() - t - t_render) * 1000, 1), **pf.meta()}
            return pack_frame(header, jpeg)

        return await asyncio.to_thread(work)

    async def _render_3d(self, r: ViewRequest) -> bytes:
        quality = "interactive" if r.interacting else "full"
        camera = r.camera
        rows, cols = r.sizes["3d"]
        if r.mode == "vr":
            base = PRESETS[r.preset]
            if base.relative == (self.series.modality == "CT"):
                raise ValueError(f"preset {r.preset!r} does not fit {self.series.modality}; "
                                 f"presets: {', '.join(self.presets)}")
            look = {"preset": base.adjusted(r.shift * SHIFT_UNITS[base.relative], r.opacity)}
        else:
            look = {"window": self._window(r), "slab": self._slab(r)}
        t = time.perf_counter()
        frame, scene = self.series.render(quality, camera=camera, mode=r.mode, size=(rows, cols), **look)
        rgb = await asyncio.wrap_future(frame)
        t_render = time.perf_counter() - t

        def encode() -> bytes:
            t0 = time.perf_counter()
            jpeg = _jpeg(rgb, JPEG_QUALITY[quality])
            _, right, up = camera.basis()
            header = {"pane": "3d", "seq": r.seq, "quality": quality, "mode": r.mode,
                      "resolution": "preview" if scene is self.series.preview else "full",
                      "render_ms": round(t_render * 1000, 1),
                      "encode_ms": round((time.perf_counter() - t0) * 1000, 1),
                      "mm_per_px": scene.pixel_spacing_mm(camera, (rows, cols)),
                      "labels": edge_labels(right, -up)}
            return pack_frame(header, jpeg)

        return await asyncio.to_thread(encode)
