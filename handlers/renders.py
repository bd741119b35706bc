"""Handler ``renders``: standard renders of a CT or MR volume, stored back as Secondary Capture.

Per rule, any of: MIP and MinIP slab stacks (axial / coronal / sagittal, slab thickness and
spacing in mm, a window), MPR stacks (average slabs at a spacing), and rotating volume-rendering
sequences around the patient's long axis (one multi-frame series, for cine). Every image carries
burned-in orientation labels and a scale bar (see ``node.render.orientation`` for the display
convention), and its series a description such as "MIP axial 10 mm" (the SC encoder makes
that SeriesDescription "AI: MIP axial 10 mm (SC)"). Every series in the input is rendered.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from node.handler_api import Handler, HandlerInput, HandlerRefusal, Progress, register
from node.render.aligned import align_to_patient_axes
from node.render.annotate import annotate, overlay
from node.render.orientation import edge_labels
from node.render.projections import PlaneStack, slab_stack, to_square_pixels
from node.render.windows import Window, apply_window, resolve_window
from node.results import ImageSeries
from node.volume import SeriesData, Volume

Plane = Literal["axial", "coronal", "sagittal"]
WindowName = Literal["auto", "soft_tissue", "mediastinum", "lung", "bone", "vascular", "brain"]
_NORMAL_AXIS = {"axial": "z", "coronal": "y", "sagittal": "x"}
# Window used when a rule names none: per output kind for CT, from the data for MR.
_CT_DEFAULT_WINDOW = {"mip": "vascular", "minip": "lung", "mpr": "soft_tissue"}
_CHUNK = 16  # slabs resampled and windowed at a time


class WindowLevel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    center: float
    width: float = Field(gt=0)


class SlabOutput(BaseModel):
    """A MIP or MinIP stack: slabs of ``thickness_mm`` every ``spacing_mm`` (default: contiguous)."""

    model_config = ConfigDict(extra="forbid")
    plane: Plane
    thickness_mm: float = Field(10.0, gt=0, le=500)
    spacing_mm: float | None = Field(None, gt=0, le=500)
    window: WindowName | WindowLevel | None = None


class MprOutput(BaseModel):
    """An MPR stack: average slabs ``spacing_mm`` thick, one every ``spacing_mm``."""

    model_config = ConfigDict(extra="forbid")
    plane: Plane
    spacing_mm: float = Field(3.0, gt=0, le=100)
    window: WindowName | WindowLevel | None = None


class VrOutput(BaseModel):
    """A rotating volume rendering: ``frames`` views ``step_deg`` apart around the long axis."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["bone", "vascular", "lung", "soft_tissue", "mr"] | None = None  # None: bone for CT, mr for MR
    frames: int = Field(24, ge=1, le=360)
    step_deg: float = Field(15.0, gt=0, le=360)
    size: int = Field(512, ge=64, le=1024)


class RendersParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mip: list[SlabOutput] = Field(
        default_factory=lambda: [SlabOutput(plane=p) for p in ("axial", "coronal", "sagittal")]
    )
    minip: list[SlabOutput] = Field(default_factory=lambda: [SlabOutput(plane="coronal")])
    mpr: list[MprOutput] = Field(default_factory=lambda: [MprOutput(plane="coronal"), MprOutput(plane="sagittal")])
    vr: list[VrOutput] = Field(default_factory=lambda: [VrOutput()])
    max_image_side: int = Field(1024, ge=128, le=2048)


def _mm(v: float) -> str:
    return f"{v:g}"


@register
class Renders(Handler):
    name = "renders"
    version = "1.0.0"
    description = "MIP/MinIP slabs, MPR stacks and rotating volume renderings as Secondary Capture"
    modalities = frozenset({"CT", "MR"})
    needs_volume = True
    Params = RendersParams

    def run(self, inp: HandlerInput, progress: Progress) -> list:
        p: RendersParams = self.params
        if not (p.mip or p.minip or p.mpr or p.vr):
            raise HandlerRefusal("renders: the rule asks for no output (mip, minip, mpr and vr are all empty)")
        # Resolve every window and preset first, so a bad setting fails before any pixel work.
        plans = [(series, self._plan(series)) for series in inp.series]
        total = sum(len(steps) for _, steps in plans)
        out: list[ImageSeries] = []
        for series, steps in plans:
            aligned = align_to_patient_axes(series.volume)
            made: dict[int, ImageSeries] = {}
            # Volume renderings first: the CPU ray caster's gradient tables (3 bytes a voxel) are
            # the most a job of this handler holds, and before the slab stacks exist it holds
            # nothing else (issue #15: a job's peak within 3x its volume). Results stay in plan order.
            for i in sorted(range(len(steps)), key=lambda i: steps[i][0] != "vr"):
                step = steps[i]
                if step[0] == "vr":
                    made[i] = self._vr_series(series, aligned, *step[1:])
                else:
                    _, name, plane, mode, thickness, spacing, window = step
                    stack = slab_stack(aligned, plane, mode, thickness, spacing)
                    made[i] = self._stack_series(series, stack, window, name, thickness)
                progress((len(out) + len(made)) / total, made[i].description)
            out.extend(made[i] for i in range(len(steps)))
        return out

    def _plan(self, series: SeriesData) -> list[tuple]:
        """The outputs for one series, in order, each with its window or preset resolved."""
        p: RendersParams = self.params
        steps: list[tuple] = []
        for field, mode, name, specs in (("mip", "max", "MIP", p.mip), ("minip", "min", "MinIP", p.minip)):
            for i, spec in enumerate(specs):
                window = self._window(spec.window, f"{field}[{i}].window", field, series)
                steps.append(("slab", name, spec.plane, mode, spec.thickness_mm, spec.spacing_mm, window))
        for i, spec in enumerate(p.mpr):
            window = self._window(spec.window, f"mpr[{i}].window", "mpr", series)
            steps.append(("slab", "MPR", spec.plane, "mean", spec.spacing_mm, None, window))
        for i, spec in enumerate(p.vr):
            steps.append(("vr", spec, self._preset(spec, series, f"vr[{i}]")))
        return steps

    @staticmethod
    def _preset(spec: VrOutput, series: SeriesData, field: str) -> str:
        preset = spec.preset or ("bone" if series.modality == "CT" else "mr")
        if series.modality != "CT" and preset != "mr":
            raise HandlerRefusal(
                f"renders: {field}.preset {preset!r} is in Hounsfield units; {series.modality} needs 'mr'"
            )
        if series.modality == "CT" and preset == "mr":
            raise HandlerRefusal(f"renders: {field}.preset 'mr' is for MR; CT presets are bone, vascular, lung, soft_tissue")
        return preset

    def _window(self, spec, field: str, kind: str, series: SeriesData) -> Window:
        if spec is None:
            spec = _CT_DEFAULT_WINDOW[kind] if series.modality == "CT" else "auto"
        if isinstance(spec, WindowLevel):
            spec = (spec.center, spec.width)
        try:
            return resolve_window(spec, series.modality, series.volume.array)
        except ValueError as exc:
            raise HandlerRefusal(f"renders: {field}: {exc}") from None

    def _stack_series(self, series: SeriesData, stack: PlaneStack, window: Window, name: str,
                      mm: float) -> ImageSeries:
        # A chunk of slabs at a time from float HU to burned-in uint8: the square-pixel resampling
        # and the windowing make float copies of what they get, and of a whole 3 mm MPR stack of a
        # 512x512x300 CT that is several hundred MB (issue #15: a job's peak within 3x its volume).
        # Both act on each image alone, so the frames are the same as the whole stack's.
        frames = marks = None
        for start in range(0, len(stack.images), _CHUNK):
            part = to_square_pixels(dataclasses.replace(stack, images=stack.images[start:start + _CHUNK]),
                                    self.params.max_image_side)
            if frames is None:
                spacing = part.pixel_spacing_mm[0]
                caption = f"{name.upper()} {stack.plane.upper()} {_mm(mm)} mm"
                marks = overlay(*part.images.shape[1:], part.labels, spacing, caption)
                frames = np.empty((len(stack.images), *part.images.shape[1:]), np.uint8)
            frames[start:start + len(part.images)] = marks.burn(apply_window(part.images, window))
        axis = _NORMAL_AXIS[stack.plane]
        return ImageSeries(
            source_series_uid=series.series_uid,
            description=f"{name} {stack.plane} {_mm(mm)} mm",
            frames=frames,
            pixel_spacing_mm=(spacing, spacing),
            frame_labels=tuple(f"{axis} {pos:.1f} mm" for pos in stack.positions_mm),
        )

    def _vr_series(self, series: SeriesData, aligned: Volume, spec: VrOutput, preset: str) -> ImageSeries:
        from node.render.vr import Camera, VolumeScene  # VTK loads only when a rendering is asked for

        size = (spec.size, spec.size)
        scene = VolumeScene(aligned, series.modality, size)
        # filled in place: a list of frames then np.stack would hold them twice
        frames = np.empty((spec.frames, *size, 3), np.uint8)
        try:
            labels = []
            for n in range(spec.frames):
                angle = (n * spec.step_deg) % 360
                cam = Camera(azimuth_deg=angle)
                _, right, up = cam.basis()
                rgb = scene.render(cam, preset=preset, mode="vr", quality="full", size=size)
                spacing = scene.pixel_spacing_mm(cam, size)
                frames[n] = annotate(rgb, edge_labels(right, -up), spacing, f"VR {preset.upper()} {angle:g}°")
                labels.append(f"azimuth {angle:g} deg")
        finally:
            scene.close()
        return ImageSeries(
            source_series_uid=series.series_uid,
            description=f"VR {preset} {spec.frames}x{_mm(spec.step_deg)} deg",
            frames=frames,
            multiframe=True,
            pixel_spacing_mm=(spacing, spacing),
            frame_labels=tuple(labels),
        )
