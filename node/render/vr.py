"""Volume rendering with VTK, offscreen: a scene that holds one volume and renders frames.

``VolumeScene`` loads a volume once (patient-aligned, LPS world coordinates) and renders an
RGB frame for a given ``Camera``, preset, mode ("vr", "mip", "minip") and quality
("interactive": half the rays and coarser sampling; "full"). The batch handler uses it for
rotating sequences; the interactive viewer keeps one per series and calls ``render`` per event.

Mapper choice: on a GPU the OpenGL ray caster (vtkGPUVolumeRayCastMapper); on Mesa's llvmpipe
that path emulates the fragment shader per sample and measured 3.5 s per 512x512 frame here,
while VTK's multi-threaded CPU ray caster (vtkFixedPointVolumeRayCastMapper) takes about
0.15 s, so software GL gets the CPU ray caster. Same scene, same presets, same camera.

Projection is parallel (orthographic), so a frame has one true pixel spacing and a scale bar
is meaningful. Camera at azimuth 0 looks from anterior (the coronal view); +90 from the
patient's left (the sagittal view), see ``orientation``.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkUnsignedCharArray
from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPiecewiseFunction, vtkPlane
from vtkmodules.vtkRenderingCore import vtkColorTransferFunction, vtkRenderer, vtkVolume, vtkVolumeProperty
from vtkmodules.vtkRenderingVolume import vtkFixedPointVolumeRayCastMapper
from vtkmodules.vtkRenderingVolumeOpenGL2 import vtkOpenGLGPUVolumeRayCastMapper

from node.render.aligned import align_to_patient_axes
from node.render.offscreen import gl_renderer, is_software_renderer, offscreen_window
from node.render.windows import Window, auto_window
from node.volume import Volume

__all__ = ["Camera", "VrPreset", "PRESETS", "MODES", "QUALITIES", "VolumeScene", "preset_names"]

MODES = ("vr", "mip", "minip")
QUALITIES = ("interactive", "full")


@dataclass(frozen=True)
class Camera:
    """View of the scene: rotation about the patient's long axis, tilt, zoom and pan.

    ``azimuth_deg`` 0 looks from anterior, 90 from the patient's left, 180 from posterior.
    ``elevation_deg`` > 0 looks down from the head side. ``zoom`` 1 fits the volume;
    ``pan_mm`` shifts the view centre along image right and image up.
    """

    azimuth_deg: float = 0.0
    elevation_deg: float = 0.0
    zoom: float = 1.0
    pan_mm: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        vals = (self.azimuth_deg, self.elevation_deg, self.zoom, *self.pan_mm)
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"Camera values must be finite, got {self}")
        if self.zoom <= 0:
            raise ValueError(f"Camera.zoom must be positive, got {self.zoom}")
        if not -90 <= self.elevation_deg <= 90:
            raise ValueError(f"Camera.elevation_deg must lie in [-90, 90], got {self.elevation_deg}")

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(view direction, image right, image up) as LPS unit vectors."""
        a, e = math.radians(self.azimuth_deg), math.radians(self.elevation_deg)
        d = np.array([-math.sin(a), math.cos(a), 0.0])
        head = np.array([0.0, 0.0, 1.0])
        view = math.cos(e) * d - math.sin(e) * head
        up = math.sin(e) * d + math.cos(e) * head
        return view, np.cross(view, up), up


@dataclass(frozen=True)
class VrPreset:
    """Transfer functions: ``color`` (value, r, g, b) and ``opacity`` (value, alpha) points.

    Values are Hounsfield units when ``relative`` is False; otherwise fractions of the volume's
    own intensity range (1st..99.5th percentile), for MR.
    """

    name: str
    color: tuple[tuple[float, float, float, float], ...]
    opacity: tuple[tuple[float, float], ...]
    shade: bool = True
    relative: bool = False

    def adjusted(self, shift: float = 0.0, opacity_scale: float = 1.0) -> "VrPreset":
        """The preset moved along the value axis by ``shift`` (its own units) and with every
        opacity scaled by ``opacity_scale`` (capped at 1): the viewer's window/opacity controls."""
        if not (math.isfinite(shift) and math.isfinite(opacity_scale) and opacity_scale >= 0):
            raise ValueError(f"shift must be finite and opacity_scale finite and >= 0, got {shift}, {opacity_scale}")
        return VrPreset(self.name, tuple((v + shift, r, g, b) for v, r, g, b in self.color),
                        tuple((v + shift, min(1.0, a * opacity_scale)) for v, a in self.opacity),
                        self.shade, self.relative)


PRESETS: dict[str, VrPreset] = {
    p.name: p
    for p in (
        VrPreset(
            "bone",
            color=((-1000, 0, 0, 0), (150, 0.55, 0.25, 0.15), (300, 0.88, 0.75, 0.55), (1000, 1, 0.98, 0.9),
                   (3000, 1, 1, 1)),
            opacity=((-1000, 0), (120, 0), (220, 0.15), (400, 0.7), (3000, 0.85)),
        ),
        VrPreset(
            # Soft tissue transparent, contrast-filled vessels red, bone white (cf. Slicer CT-AAA).
            "vascular",
            color=((-1000, 0, 0, 0), (100, 0.55, 0.1, 0.05), (180, 0.85, 0.25, 0.15), (300, 0.95, 0.6, 0.45),
                   (600, 1, 0.95, 0.9), (3000, 1, 1, 1)),
            opacity=((-1000, 0), (100, 0), (160, 0.45), (250, 0.7), (600, 0.8), (3000, 0.85)),
        ),
        VrPreset(
            # Skin and muscle as translucent flesh over white bone; fat faint, air clear.
            "soft_tissue",
            color=((-1000, 0, 0, 0), (-150, 0.55, 0.3, 0.2), (0, 0.85, 0.55, 0.45), (80, 0.95, 0.7, 0.6),
                   (300, 1, 0.95, 0.85), (3000, 1, 1, 1)),
            opacity=((-1000, 0), (-200, 0), (-80, 0.03), (40, 0.2), (150, 0.35), (400, 0.75), (3000, 0.85)),
        ),
        VrPreset(
            # Parenchyma as a translucent shell; air (airways, outside) and soft tissue clear.
            "lung",
            color=((-1000, 0.6, 0.35, 0.3), (-900, 0.9, 0.6, 0.55), (-600, 1, 0.8, 0.75), (-400, 1, 0.9, 0.85)),
            opacity=((-1000, 0), (-950, 0), (-850, 0.04), (-600, 0.08), (-450, 0), (3000, 0)),
            shade=False,
        ),
        VrPreset(
            "mr",
            color=((0, 0, 0, 0), (0.3, 0.55, 0.35, 0.25), (0.6, 0.9, 0.75, 0.6), (1, 1, 1, 1)),
            opacity=((0, 0), (0.25, 0), (0.6, 0.3), (1, 0.8)),
            relative=True,
        ),
    )
}


def preset_names() -> list[str]:
    return list(PRESETS)


def _vtk_ready_array(array: np.ndarray) -> np.ndarray:
    """A C-contiguous array of a scalar type VTK's ray casters take (16-bit where it fits)."""
    if array.dtype in (np.int16, np.uint16, np.uint8, np.float32):
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.integer) and array.min() >= -32768 and array.max() <= 32767:
        return np.ascontiguousarray(array, dtype=np.int16)
    return np.ascontiguousarray(array, dtype=np.float32)


class VolumeScene:
    """One volume, one offscreen window; ``render`` returns (rows, cols, 3) uint8 frames.

    Calls are serialised by a lock, but the OpenGL context belongs to the thread that created the
    scene: render from that thread only (node/render/volume_cache.py gives each series its own
    render thread; rendering from another thread aborts the process).
    """

    def __init__(self, volume: Volume, modality: str = "CT", size: tuple[int, int] = (512, 512)) -> None:
        self.modality = modality
        aligned = align_to_patient_axes(volume)
        self._array = _vtk_ready_array(aligned.array)  # VTK reads this memory: keep it alive
        g = aligned.geometry
        nz, ny, nx = self._array.shape
        self._lo = np.asarray(g.origin, float)
        self._hi = self._lo + (np.asarray((nx, ny, nz)) - 1) * np.asarray(g.spacing)
        self.center = (self._lo + self._hi) / 2
        self._min_spacing = float(min(g.spacing))
        self._auto = auto_window(self._array)

        image = vtkImageData()
        image.SetDimensions(nx, ny, nz)
        image.SetOrigin(*g.origin)
        image.SetSpacing(*g.spacing)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(self._array.ravel(), deep=False))
        self._image = image

        self._lock = threading.Lock()
        self._window = offscreen_window(*size)
        self._renderer = vtkRenderer()
        self._renderer.SetBackground(0, 0, 0)
        self._window.AddRenderer(self._renderer)
        self._window.Render()  # creates the context, so the GL renderer can be asked
        self.gl = gl_renderer(self._window)
        self.software = is_software_renderer(self.gl)
        self._mapper = self._make_mapper()
        self._property = vtkVolumeProperty()
        self._property.SetInterpolationTypeToLinear()
        self._property.SetAmbient(0.25)
        self._property.SetDiffuse(0.75)
        self._property.SetSpecular(0.2)
        self._property.SetSpecularPower(10)
        self._volume = vtkVolume()
        self._volume.SetMapper(self._mapper)
        self._volume.SetProperty(self._property)
        self._renderer.AddVolume(self._volume)
        self._state: tuple | None = None

    @property
    def backend(self) -> str:
        kind = type(self._window).__name__.replace("vtk", "").replace("RenderWindow", "")
        mapper = "CPU ray caster" if self.software else "GPU ray caster"
        return f"{kind} / {self.gl} / {mapper}"

    def _make_mapper(self):
        if self.software:
            mapper = vtkFixedPointVolumeRayCastMapper()
        else:
            mapper = vtkOpenGLGPUVolumeRayCastMapper()
        mapper.SetInputData(self._image)
        mapper.SetAutoAdjustSampleDistances(0)  # quality is ours to choose, not a frame-rate guess
        return mapper

    def _value(self, v: float, relative: bool) -> float:
        if not relative:
            return v
        lo = self._auto.center - self._auto.width / 2
        return lo + v * self._auto.width

    def _apply(self, p: VrPreset | None, mode: str, window: Window | None) -> None:
        state = (p, mode, window)
        if state == self._state:
            return
        ctf, otf = vtkColorTransferFunction(), vtkPiecewiseFunction()
        if mode == "vr":
            if not p.relative and self.modality != "CT":
                raise ValueError(f"preset {p.name!r} is in Hounsfield units and only fits CT, not {self.modality}")
            for v, r, gg, b in p.color:
                ctf.AddRGBPoint(self._value(v, p.relative), r, gg, b)
            for v, a in p.opacity:
                otf.AddPoint(self._value(v, p.relative), a)
            self._property.SetShade(p.shade)
            self._mapper.SetBlendModeToComposite()
        else:
            w = window or self._auto
            lo, hi = w.center - w.width / 2, w.center + w.width / 2
            ctf.AddRGBPoint(lo, 0, 0, 0)
            ctf.AddRGBPoint(hi, 1, 1, 1)
            otf.AddPoint(lo, 1)
            otf.AddPoint(hi, 1)
            self._property.SetShade(False)
            if mode == "mip":
                self._mapper.SetBlendModeToMaximumIntensity()
            else:
                self._mapper.SetBlendModeToMinimumIntensity()
        self._property.SetColor(ctf)
        self._property.SetScalarOpacity(otf)
        self._state = state

    def fit_half_height_mm(self, size: tuple[int, int]) -> float:
        """Half the view height (mm) at zoom 1: the volume fits at every azimuth. Chosen so the
        pixel spacing is a round 0.1 micrometre, which a DICOM DS value holds exactly."""
        ext = self._hi - self._lo
        rows, cols = size
        half = 1.05 * max(ext[2] / 2, math.hypot(ext[0], ext[1]) / 2 / (cols / rows))
        spacing = math.ceil(2 * half / rows * 1e4) / 1e4
        return spacing * rows / 2

    def pixel_spacing_mm(self, camera: Camera, size: tuple[int, int]) -> float:
        return 2 * self.fit_half_height_mm(size) / camera.zoom / size[0]

    def project(self, point_lps, camera: Camera, size: tuple[int, int]) -> tuple[float, float]:
        """(row, col) pixel position of an LPS point in a frame of ``size`` (rows, cols)."""
        _, right, up = camera.basis()
        focal = self.center + camera.pan_mm[0] * right + camera.pan_mm[1] * up
        rel = np.asarray(point_lps, float) - focal
        ps = self.pixel_spacing_mm(camera, size)
        rows, cols = size
        return (rows / 2 - 0.5 - float(rel @ up) / ps, cols / 2 - 0.5 + float(rel @ right) / ps)

    def render(self, camera: Camera = Camera(), preset: str | VrPreset = "bone", mode: str = "vr",
               quality: str = "full", size: tuple[int, int] = (512, 512), window: Window | None = None,
               slab: tuple[tuple[float, float, float], float] | None = None) -> np.ndarray:
        """One frame, (rows, cols, 3) uint8, top row first. ``preset``: a name of ``PRESETS`` or a
        ``VrPreset`` (e.g. ``PRESETS["bone"].adjusted(...)``). ``slab``: (LPS centre, thickness mm)
        limits the rays to a slab facing the camera, as a thick-slab MIP/MinIP does (a MinIP of
        the whole volume would show the air around the patient)."""
        if mode not in MODES:
            raise ValueError(f"unknown render mode {mode!r}; modes: {', '.join(MODES)}")
        if quality not in QUALITIES:
            raise ValueError(f"unknown quality {quality!r}; qualities: {', '.join(QUALITIES)}")
        if not isinstance(preset, VrPreset):
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
            preset = PRESETS[preset]
        if slab is not None and not (len(slab[0]) == 3 and np.all(np.isfinite(slab[0]))
                                     and math.isfinite(slab[1]) and slab[1] > 0):
            raise ValueError(f"slab must be (three finite LPS coordinates, a positive thickness), got {slab!r}")
        rows, cols = int(size[0]), int(size[1])
        if not (16 <= rows <= 4096 and 16 <= cols <= 4096):
            raise ValueError(f"size must be 16..4096 pixels per side, got {size}")
        with self._lock:
            if self._image is None:
                raise RuntimeError("this VolumeScene was closed")
            self._apply(preset if mode == "vr" else None, mode, window)
            fine = quality == "full"
            self._mapper.SetImageSampleDistance(1.0 if fine else 2.0)
            self._mapper.SetSampleDistance(self._min_spacing * (1.0 if fine else 2.0))
            self._window.SetSize(cols, rows)
            view, right, up = camera.basis()
            focal = self.center + camera.pan_mm[0] * right + camera.pan_mm[1] * up
            distance = float(np.linalg.norm(self._hi - self._lo)) + 100.0
            cam = self._renderer.GetActiveCamera()
            cam.ParallelProjectionOn()
            cam.SetFocalPoint(*focal)
            cam.SetPosition(*(focal - view * distance))
            cam.SetViewUp(*up)
            cam.SetParallelScale(self.fit_half_height_mm((rows, cols)) / camera.zoom)
            self._set_slab(view, slab)
            self._renderer.ResetCameraClippingRange()
            self._window.Render()
            buf = vtkUnsignedCharArray()
            self._window.GetPixelData(0, 0, cols - 1, rows - 1, 0, buf, 0)
            rgb = numpy_support.vtk_to_numpy(buf).reshape(rows, cols, 3)
            return np.ascontiguousarray(rgb[::-1])

    def _set_slab(self, view: np.ndarray, slab) -> None:
        self._mapper.RemoveAllClippingPlanes()
        if slab is None:
            return
        centre, half = np.asarray(slab[0], float), slab[1] / 2
        for sign in (1.0, -1.0):  # each plane keeps the side its normal points to
            plane = vtkPlane()
            plane.SetOrigin(*(centre - sign * half * view))
            plane.SetNormal(*(sign * view))
            self._mapper.AddClippingPlane(plane)

    def close(self) -> None:
        """Release the OpenGL context and the volume's memory."""
        with self._lock:
            if self._image is None:
                return
            self._renderer.RemoveAllViewProps()
            self._window.Finalize()
            self._image = None
            self._array = None
