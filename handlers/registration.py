"""The ``registration`` handler: register two series and return the registration, the moving
series resampled onto the fixed grid, a checkerboard for review and a small measurement report.

Which pair: ``pair: study`` takes a ``moving_modality`` series of the job's study (e.g. an MR)
onto a ``fixed_modality`` series (e.g. the planning CT); ``pair: prior`` takes the same kind of
series from the patient's most recent prior study (``HandlerInput.priors``, filled when the rule
asks for priors) onto the current one. No partner, a localizer, a 2-D image, another patient or no
overlap: the job is refused with the reason, and nothing is delivered. So is a result that fails a
plausibility check: a folded deformation, or (CT-CT) images that do not match after registration
(another anatomy, a mirrored image: ``node.registration.engine.MATCH_REFUSE_RMS_HU``). A poor but not
impossible match, or series sharing little of their z-extent, comes back as a QualityFlag: the rule's
``on_quality_failure`` refuses the job or delivers it with the warning in every object.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from node.handler_api import Handler, HandlerInput, HandlerRefusal, register
from node.registration import RegistrationRefusal, check_pair, ct_mask, metric_for, surface_distance, working_volume
from node.registration import register as register_images
from node.results import (
    DeformableRegistration,
    ImageSeries,
    Measurement,
    MeasurementGroup,
    MeasurementReport,
    QualityFlag,
    ResampledSeries,
    SeriesRef,
    SpatialRegistration,
    TextFinding,
    safe_text,
)
from node.volume import SeriesData, Volume

Mask = Literal["none", "body", "lungs"]
_WINDOWS = {"CT": (40.0, 400.0)}


class RegistrationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pair: Literal["study", "prior"] = "prior"
    fixed_modality: Literal["CT", "MR"] = "CT"
    moving_modality: Literal["CT", "MR"] = "CT"
    method: Literal["rigid", "affine", "deformable"] = "rigid"
    fixed_mask: Mask = "body"
    moving_mask: Mask = "body"
    checkerboard_slices: int = 3

    @model_validator(mode="after")
    def _consistent(self) -> "RegistrationParams":
        for side in ("fixed", "moving"):
            if getattr(self, f"{side}_mask") != "none" and getattr(self, f"{side}_modality") != "CT":
                raise ValueError(f"{side}_mask: body and lung masks are CT masks; use none for "
                                 f"{getattr(self, f'{side}_modality')}")
        if self.method == "deformable" and (self.fixed_modality, self.moving_modality) != ("CT", "CT"):
            raise ValueError("method: deformable registration is CT-CT only (it compares intensities)")
        if self.pair == "study" and self.fixed_modality == self.moving_modality:
            raise ValueError("pair: study registers two modalities of one study (e.g. moving_modality MR onto "
                             "fixed_modality CT); for two studies of one modality use pair: prior")
        if not 0 <= self.checkerboard_slices <= 9:
            raise ValueError("checkerboard_slices must be 0..9")
        return self


def _largest(series: list[SeriesData], modality: str, exclude: str | None = None) -> SeriesData | None:
    candidates = [s for s in series if s.modality == modality and s.series_uid != exclude
                  and s.volume is not None and "LOCALIZER" not in [str(v).upper() for v in s.first.get("ImageType", [])]]
    return max(candidates, key=lambda s: s.volume.array.size, default=None)


def _ref(s: SeriesData) -> SeriesRef:
    ds = s.first
    return SeriesRef(series_uid=s.series_uid, study_uid=str(ds.StudyInstanceUID),
                     frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")), modality=s.modality,
                     instances=tuple((str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in s.datasets))


def _window(s: SeriesData) -> tuple[float, float]:
    if s.modality in _WINDOWS:
        return _WINDOWS[s.modality]
    lo, hi = np.percentile(s.volume.array[::2, ::4, ::4], [1, 99])
    return float((lo + hi) / 2), float(max(hi - lo, 1.0))


def _to_uint8(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    c, w = window
    return np.clip((array - (c - w / 2)) / w * 255.0, 0, 255).astype(np.uint8)


def _checkerboard(fixed: SeriesData, warped: np.ndarray, moving_window, n: int) -> np.ndarray:
    """``n`` axial slices through the fixed anatomy: squares alternate fixed / warped moving."""
    shape = fixed.volume.array.shape
    ks = np.linspace(shape[0] * 0.25, shape[0] * 0.75, n).round().astype(int)
    tile = max(8, shape[1] // 8)
    jj, ii = np.meshgrid(np.arange(shape[1]) // tile, np.arange(shape[2]) // tile, indexing="ij")
    board = (jj + ii) % 2 == 1
    fw = _window(fixed)
    frames = [np.where(board, _to_uint8(warped[k], moving_window), _to_uint8(fixed.volume.array[k], fw)) for k in ks]
    return np.stack(frames)


def _source_slices(outcome, fixed: SeriesData, moving: SeriesData) -> tuple[tuple[int, ...], ...]:
    """For each fixed slice, the moving slices its corners land in (through the linear part)."""
    g, mg = fixed.volume.geometry, moving.volume.geometry
    n, rows, cols = g.shape
    out = []
    for k in range(n):
        corners = g.index_to_patient([(k, j, i) for j in (0, rows - 1) for i in (0, cols - 1)])
        ks = mg.patient_to_index(corners @ outcome.linear[:3, :3].T + outcome.linear[:3, 3])[:, 0]
        lo = int(np.clip(np.floor(ks.min()) - 1, 0, mg.shape[0] - 1))
        hi = int(np.clip(np.ceil(ks.max()) + 1, 0, mg.shape[0] - 1))
        out.append(tuple(range(lo, hi + 1)))
    return tuple(out)


@register
class Registration(Handler):
    name = "registration"
    version = "1.0.0"
    description = "Rigid, affine or deformable registration of two series (CT-CT over time, MR-CT)"
    needs_volume = False  # the pair is chosen in run(); a 2-D partner is refused there with the reason
    Params = RegistrationParams
    sr_template = "registration"
    reports_findings = frozenset({"registration"})
    reports_measurements = frozenset({"metric_value", "jacobian_min", "jacobian_fraction_below_half",
                                      "mask_overlap", "overlap", "mask_surface_distance_mean",
                                      "mask_surface_distance_p95"})

    def _pair(self, inp: HandlerInput) -> tuple[SeriesData, SeriesData]:
        p: RegistrationParams = self.params
        fixed = _largest(inp.series, p.fixed_modality)
        if fixed is None:
            raise HandlerRefusal(f"registration: the study has no {p.fixed_modality} volume to register onto")
        if p.pair == "study":
            moving = _largest(inp.series, p.moving_modality, exclude=fixed.series_uid)
            if moving is None:
                raise HandlerRefusal(f"registration: the study has no {p.moving_modality} volume to register "
                                     f"onto {p.fixed_modality} series {fixed.series_uid}")
            return fixed, moving
        if not inp.priors:
            note = f" ({inp.priors_note})" if inp.priors_note else ""
            raise HandlerRefusal(f"registration: no prior study of this patient{note}: nothing to register "
                                 f"series {fixed.series_uid} to")
        prior = inp.priors[0]
        moving = _largest(prior.series, p.moving_modality)
        if moving is None:
            raise HandlerRefusal(f"registration: the most recent prior study {prior.study_uid} has no "
                                 f"{p.moving_modality} volume")
        return fixed, moving

    def run(self, inp: HandlerInput, progress) -> list:
        p: RegistrationParams = self.params
        fixed, moving = self._pair(inp)
        try:
            check_pair(fixed, moving)
        except RegistrationRefusal as exc:
            raise HandlerRefusal(f"registration: {exc}") from None
        # Registration runs on the ~2 mm working grids (node.registration.working); the masks are
        # made there too, which at 512x512x300 is a tenth of the work of full-size masks.
        fixed_w, moving_w = working_volume(fixed.volume), working_volume(moving.volume)
        progress(0.05, "masks")
        fixed_mask = ct_mask(fixed_w, p.fixed_mask) if p.fixed_mask != "none" else None
        moving_mask = ct_mask(moving_w, p.moving_mask) if p.moving_mask != "none" else None
        progress(0.2, f"{p.method} registration")
        same_frame = str(fixed.first.get("FrameOfReferenceUID", "")) == str(moving.first.get("FrameOfReferenceUID", "-"))
        try:
            outcome = register_images(fixed_w, moving_w, p.method,
                                      metric=metric_for(fixed.modality, moving.modality),
                                      fixed_mask=fixed_mask, moving_mask=moving_mask, same_frame=same_frame)
        except RegistrationRefusal as exc:
            raise HandlerRefusal(f"registration: {exc}") from None
        if outcome.warnings:
            raise HandlerRefusal("registration: " + "; ".join(outcome.warnings) + " - not delivered")
        self.provenance.update({"method": p.method, "metric": outcome.metric, "elapsed_s": round(outcome.elapsed_s, 2)})
        if outcome.match_rms_hu is not None:
            self.provenance["match_rms_hu"] = round(outcome.match_rms_hu, 1)
        progress(0.8, "resampling")
        fixed_ref, moving_ref = _ref(fixed), _ref(moving)
        text = f"{moving.modality} {'prior ' if p.pair == 'prior' else ''}on {fixed.modality} ({p.method})"
        if outcome.deformation is None:
            reg = SpatialRegistration(fixed_ref, moving_ref, outcome.matrix_moving_to_fixed, p.method,
                                      safe_text(f"Registration {text}"))
        else:
            reg = DeformableRegistration(fixed_ref, moving_ref, outcome.matrix_moving_to_fixed,
                                         outcome.deformation_grid, outcome.deformation,
                                         safe_text(f"Deformable registration {text}"))
        warped = outcome.resample(moving.volume, onto=fixed.volume.geometry)  # at full size
        window = _window(moving)
        results: list = [reg, ResampledSeries(
            source_series_uid=fixed.series_uid, moving=moving_ref, volume=warped,
            description=safe_text(f"{moving.description or moving.modality} registered"), window=window,
            method=p.method, source_slices=_source_slices(outcome, fixed, moving))]
        if p.checkerboard_slices:
            results.append(ImageSeries(fixed.series_uid, safe_text(f"Checkerboard {text}"),
                                       _checkerboard(fixed, warped.array, window, p.checkerboard_slices),
                                       pixel_spacing_mm=(fixed.volume.geometry.spacing[1],
                                                         fixed.volume.geometry.spacing[0])))
        measurements = [Measurement("metric_value", round(outcome.metric_value, 6), "1"),
                        Measurement("overlap", round(100 * outcome.overlap, 2), "%")]
        if outcome.jacobian is not None:
            measurements += [Measurement("jacobian_min", round(outcome.jacobian.minimum, 4), "1"),
                             Measurement("jacobian_fraction_below_half",
                                         round(100 * outcome.jacobian.fraction_below_half, 3), "%")]
        residual = None
        if fixed_mask is not None and moving_mask is not None and p.fixed_mask == p.moving_mask:
            # On the working grid, where the masks were made (the outcome's fixed grid).
            carried = outcome.resample(Volume(moving_mask.astype(np.uint8), moving_w.geometry), labels=True).array > 0
            dice = 2 * np.sum(carried & fixed_mask) / max(1, carried.sum() + fixed_mask.sum())
            measurements.append(Measurement("mask_overlap", round(100 * float(dice), 2), "%"))
            # No landmarks reach a handler in a clinical study: the residual distance is that
            # between the fixed mask's surface and the moving mask's carried onto it.
            seen = outcome.resample(Volume(np.ones(moving_w.geometry.shape, np.uint8), moving_w.geometry),
                                    labels=True, default=0).array > 0
            residual = surface_distance(carried, fixed_mask, fixed_w.geometry, within=seen)
            if residual is not None:
                measurements += [Measurement("mask_surface_distance_mean", round(residual.mean_mm, 2), "mm"),
                                 Measurement("mask_surface_distance_p95", round(residual.p95_mm, 2), "mm")]
        results.append(MeasurementReport(fixed.series_uid, "registration", (
            MeasurementGroup("Registration", "registration", tuple(measurements)),), title="Registration report"))
        results.append(TextFinding(
            f"{p.method} registration of {moving.modality} series {moving.series_uid} onto {fixed.modality} series "
            f"{fixed.series_uid}: metric {outcome.metric}, {sum(outcome.iterations)} iterations"
            + (f"; RMS difference after registration {outcome.match_rms_hu:.0f} HU within the {p.fixed_mask} mask"
               if outcome.match_rms_hu is not None else "")
            + (f"; Jacobian determinant min {outcome.jacobian.minimum:.3f}" if outcome.jacobian else "")
            + (f"; residual distance between the {p.fixed_mask} mask surfaces (no landmarks): mean "
               f"{residual.mean_mm:.2f} mm, 95th percentile {residual.p95_mm:.2f} mm" if residual else ""),
            fixed.series_uid))
        # Borderline plausibility (a poor match, little z-extent in common): delivered only as the
        # rule's on_quality_failure says, with the warning in every object.
        results += [QualityFlag(check, reason) for check, reason in outcome.cautions]
        progress(1.0, "done")
        return results
