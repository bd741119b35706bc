"""Series volumes for the interactive viewer: loaded once, shared, capped in memory, evicted LRU.

A ``CachedSeries`` is one series on a patient-aligned grid plus the ``VolumeScene`` that renders
it. OpenGL contexts belong to one thread, so every call into the scene runs on the series' own
render thread (a one-worker executor); that thread also queues the frames of all sessions
viewing the series, one at a time. One scene per series, not per session: VTK's CPU ray caster
keeps gradient tables of 3 bytes a voxel (235 MB for a 512x512x300 CT) and a GPU mapper a copy
of the volume in video memory, so per-session scenes would multiply that by the number of users
while giving no more throughput (one frame already uses every core, or the GPU).

``VolumeCache.acquire`` starts a load in a loader thread (never the web server's event loop) or
joins the one in progress; ``release`` gives the reference back. Unreferenced series stay cached
for the next viewer until the memory cap needs their room (least recently used first) or they
have been idle ``idle_s``. A load that would exceed the cap with every cached series in use is
refused with ``ViewerBusy``.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from node.render.aligned import align_to_patient_axes
from node.render.vr import VolumeScene
from node.volume import Geometry, Volume

__all__ = ["CachedSeries", "VolumeCache", "ViewerBusy", "SCENE_BYTES_PER_VOXEL", "half_resolution"]

# Ray caster working memory per voxel, beyond the volume itself (see the module docstring).
SCENE_BYTES_PER_VOXEL = 3


class ViewerBusy(RuntimeError):
    """The viewer's memory cap is taken by series in use: no room to load another now."""


def half_resolution(volume: Volume) -> Volume:
    """``volume`` averaged over 2x2x2 blocks (an axis shorter than 64 samples is kept whole): an
    eighth of the voxels on the same patient extent, for previews."""
    g = volume.geometry
    f = [2 if n >= 64 else 1 for n in g.shape]  # array axes (z, y, x)
    nz, ny, nx = (n // k for n, k in zip(g.shape, f))
    src = volume.array
    n = f[0] * f[1] * f[2]
    integral = np.issubdtype(src.dtype, np.integer)
    out = np.empty((nz, ny, nx), dtype=src.dtype)
    wide = np.int32 if integral else np.float32
    for k in range(nz):  # a slab at a time, by strided adds: no full-size wide copy
        total = sum(src[k * f[0] + i, :ny * f[1], :nx * f[2]].astype(wide) for i in range(f[0]))
        total = sum(total[i::f[1]] for i in range(f[1]))
        total = sum(total[:, i::f[2]] for i in range(f[2]))
        out[k] = (total + n // 2) // n if integral else total / n
    origin = g.index_to_patient([(k - 1) / 2 for k in f])  # the centre of the first block
    spacing = tuple(float(s * k) for s, k in zip(g.spacing, f[::-1]))
    return Volume(out, Geometry(out.shape, tuple(float(v) for v in origin), spacing, g.direction))


class CachedSeries:
    """One loaded series: ``volume`` (patient-aligned), ``modality``, and its scenes.

    A large volume also gets a half-resolution ``preview`` scene on a second render thread. The
    full scene's first shaded frame computes its gradient tables, seconds for a big CT: that
    happens at once (``warm``) off the viewers' path, and the preview answers until it is done;
    with software rendering the preview also renders every frame while the user drags (reduced
    resolution: an eighth of the voxels, a quarter of the rays' work).
    """

    def __init__(self, series_uid: str, modality: str, aligned: Volume, preview_min_voxels: int = 4_000_000) -> None:
        self.series_uid = series_uid
        self.modality = modality
        self.volume = aligned
        self._gl = ThreadPoolExecutor(1, thread_name_prefix="view3d-gl")
        self._preview_gl = ThreadPoolExecutor(1, thread_name_prefix="view3d-preview")
        self.preview: VolumeScene | None = None
        warm_up = {"preset": "bone" if modality == "CT" else "mr", "size": (32, 32)}
        try:
            if aligned.array.size >= preview_min_voxels:
                small = half_resolution(aligned)
                self.preview = self._preview_gl.submit(VolumeScene, small, modality).result()
                self._preview_gl.submit(self.preview.render, **warm_up)
            self.scene: VolumeScene = self._gl.submit(VolumeScene, aligned, modality).result()
        except BaseException:
            self.close()
            raise
        self.warm: Future = self._gl.submit(self.scene.render, **warm_up)
        voxels = aligned.array.size * (1 + (self.preview is not None) / 8)
        self.nbytes = int(voxels * (aligned.array.itemsize + SCENE_BYTES_PER_VOXEL))

    @property
    def full_ready(self) -> bool:
        """Whether full-quality frames come from the full-resolution scene yet."""
        return self.preview is None or self.warm.done()

    def render(self, quality: str, **kwargs) -> tuple[Future, VolumeScene]:
        """``VolumeScene.render`` on the right scene's thread: a Future of the RGB frame, and the scene."""
        if self.preview is not None and (not self.warm.done() or (quality == "interactive" and self.scene.software)):
            return self._preview_gl.submit(self.preview.render, quality=quality, **kwargs), self.preview
        return self._gl.submit(self.scene.render, quality=quality, **kwargs), self.scene

    def info(self) -> dict:
        g = self.volume.geometry
        lo = np.asarray(g.origin, float)
        hi = lo + (np.asarray(g.shape[::-1]) - 1) * np.asarray(g.spacing)
        return {"series_uid": self.series_uid, "modality": self.modality, "shape": list(g.shape),
                "spacing_mm": list(g.spacing), "bounds_mm": [lo.tolist(), hi.tolist()],
                "center_mm": ((lo + hi) / 2).tolist(), "renderer": self.scene.backend}

    def close(self) -> None:
        """Free the scenes (on their threads, after frames already queued) and the volume."""
        for gl, scene in ((self._gl, getattr(self, "scene", None)), (self._preview_gl, self.preview)):
            if scene is not None:
                gl.submit(scene.close)
            gl.shutdown(wait=False)


def _failed(f: Future) -> bool:
    return f.done() and (f.cancelled() or f.exception() is not None)


@dataclass
class _Entry:
    future: Future
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)


class VolumeCache:
    """``loader(series_uid) -> (modality, Volume)`` reads a series; see the module docstring."""

    def __init__(self, loader: Callable[[str], tuple[str, Volume]], cap_bytes: int, idle_s: float = 1800.0,
                 load_threads: int = 2, preview_min_voxels: int = 4_000_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if cap_bytes <= 0:
            raise ValueError(f"cap_bytes must be positive, got {cap_bytes}")
        self.cap_bytes = cap_bytes
        self.idle_s = idle_s
        self.preview_min_voxels = preview_min_voxels
        self._loader = loader
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._loads = ThreadPoolExecutor(load_threads, thread_name_prefix="view3d-load")

    def acquire(self, series_uid: str) -> Future:
        """A Future of the ``CachedSeries``, counted as in use until ``release(series_uid)``."""
        with self._lock:
            self._sweep_locked()
            e = self._entries.get(series_uid)
            if e is None or _failed(e.future):  # a failed load is tried again
                e = _Entry(self._loads.submit(self._load, series_uid))
                self._entries[series_uid] = e
            e.refs += 1
            e.last_used = self._clock()
            self._entries.move_to_end(series_uid)
            return e.future

    def release(self, series_uid: str) -> None:
        with self._lock:
            e = self._entries.get(series_uid)
            if e is None:
                return
            e.refs = max(0, e.refs - 1)
            e.last_used = self._clock()
            if e.refs == 0 and _failed(e.future):
                del self._entries[series_uid]
            self._sweep_locked()

    def _load(self, series_uid: str) -> CachedSeries:
        modality, volume = self._loader(series_uid)
        series = CachedSeries(series_uid, modality, align_to_patient_axes(volume), self.preview_min_voxels)
        with self._lock:
            self._make_room_locked(series_uid, series.nbytes)
            if self._used_locked(exclude=series_uid) + series.nbytes > self.cap_bytes:
                used = self._used_locked(exclude=series_uid)
                series.close()
                raise ViewerBusy(
                    f"3D viewer memory full: this series needs {series.nbytes / 2**20:.0f} MB, "
                    f"{used / 2**20:.0f} MB of the {self.cap_bytes / 2**20:.0f} MB cap are series in use; "
                    "try again when another viewer closes")
        return series

    def _loaded(self, e: _Entry) -> CachedSeries | None:
        return e.future.result() if e.future.done() and not _failed(e.future) else None

    def _used_locked(self, exclude: str | None = None) -> int:
        return sum(s.nbytes for uid, e in self._entries.items()
                   if uid != exclude and (s := self._loaded(e)) is not None)

    def _evict_locked(self, uid: str) -> None:
        series = self._loaded(self._entries.pop(uid))
        if series is not None:
            series.close()

    def _make_room_locked(self, loading: str, need: int) -> None:
        for uid, e in list(self._entries.items()):  # oldest first
            if self._used_locked(exclude=loading) + need <= self.cap_bytes:
                return
            if uid != loading and e.refs == 0 and self._loaded(e) is not None:
                self._evict_locked(uid)

    def _sweep_locked(self) -> None:
        now = self._clock()
        for uid, e in list(self._entries.items()):
            if e.refs == 0 and self._loaded(e) is not None and now - e.last_used > self.idle_s:
                self._evict_locked(uid)

    def drop_unused(self) -> int:
        """Free every loaded series no viewer is using now; how many were freed."""
        with self._lock:
            unused = [uid for uid, e in self._entries.items() if e.refs == 0 and self._loaded(e) is not None]
            for uid in unused:
                self._evict_locked(uid)
            return len(unused)

    def stats(self) -> dict:
        with self._lock:
            self._sweep_locked()
            series = []
            for uid, e in self._entries.items():
                s = self._loaded(e)
                state = ("ready" if s.full_ready else "warming") if s else ("loading" if not e.future.done() else "failed")
                series.append({"series_uid": uid, "state": state, "in_use": e.refs,
                               "megabytes": round(s.nbytes / 2**20, 1) if s else 0.0})
            return {"cap_megabytes": round(self.cap_bytes / 2**20, 1),
                    "used_megabytes": round(self._used_locked() / 2**20, 1), "series": series}

    def close(self) -> None:
        """Free every cached series (the server is stopping)."""
        with self._lock:
            for uid in list(self._entries):
                self._evict_locked(uid)
        self._loads.shutdown(wait=False, cancel_futures=True)
