"""The generic handler that runs any model card (``model:<name>``); see ``registry.model_handler``."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from node.handler_api import Handler, HandlerInput, HandlerRefusal, Progress
from node.models.card import ModelCard
from node.models.domain import domain_flags, measure_input
from node.models.inference import Confidence, load_model, onnx_runner, resample, segment_scored
from node.models.plausibility import output_flags
from node.models.uncertainty import (UncertaintyParams, dropout_masks, masked_runner, passes_for,
                                     predict_with_uncertainty)
from node.results import Code, LabelMap, Measurement, MeasurementGroup, MeasurementReport, QuantityMap, safe_text
from node.volume import value_counts

__all__ = ["ModelHandler", "SR_TEMPLATE", "VOLUME_MEASUREMENT"]

SR_TEMPLATE = "model"
VOLUME_MEASUREMENT = "volume"  # measurement name in the SR template; findings are the labels' finding keys

_PROVIDER_SHORT = {"CUDAExecutionProvider": "CUDA", "CPUExecutionProvider": "CPU"}
# No standard code names a prediction's entropy (DICOM has texture entropies only): a private scheme.
ENTROPY = Code("ENTROPY", "99HILUM", "Normalized predictive entropy")
NO_UNITS = Code("1", "UCUM", "no units")


def _volume_ml(voxels: int, voxel_ml: float) -> Measurement:
    return Measurement(VOLUME_MEASUREMENT, round(float(voxels) * voxel_ml, 2), "ml")


class ModelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    emit: list[Literal["SEG", "RTSTRUCT", "SR"]] | None = None  # narrows the card's emit list
    uncertainty: UncertaintyParams | None = None  # several passes; the case's score goes into the provenance


class ModelHandler(Handler):
    """Base of the per-card classes that ``registry.model_handler`` builds (one per card)."""

    card: ClassVar[ModelCard]
    model_dir: ClassVar[Path]
    needs_volume = True
    Params = ModelParams

    def __init__(self, params: BaseModel | dict | None = None) -> None:
        super().__init__(params)
        self.provenance: dict[str, object] = {}

    def check(self, inp: HandlerInput) -> None:
        need = self.card.input.channels
        if len(inp.series) < need:
            raise HandlerRefusal(f"{self.name} takes {need} series (one per input channel), got {len(inp.series)}")
        super().check(HandlerInput(inp.study_uid, inp.series[:need]))

    def assess_input(self, inp: HandlerInput) -> list:
        """Domain flags: the first input series against the card's ``validated_domain``."""
        domain = self.card.validated_domain
        if domain is None:
            return []
        source = inp.series[0]
        profile = domain.intensity
        facts = measure_input(source.volume, source.datasets[0] if source.datasets else None, source.modality,
                              *((profile.body_above, profile.grid_mm) if profile else ()))
        return domain_flags(self.card, facts)

    def _emit(self) -> list[str]:
        if self.params.emit is None:
            return list(self.card.emit)
        extra = set(self.params.emit) - set(self.card.emit)
        if extra:
            raise HandlerRefusal(f"{self.name}: emit {sorted(extra)} is not offered by the model card "
                                 f"(card emits {self.card.emit})")
        if "SR" in self.params.emit and not {"SEG", "RTSTRUCT"} & set(self.params.emit):
            raise HandlerRefusal(f"{self.name}: emit SR needs SEG or RTSTRUCT too (the volumes reference segments)")
        return list(self.params.emit)

    def run(self, inp: HandlerInput, progress: Progress) -> list:
        card = self.card
        emit = self._emit()
        series = inp.series[:card.input.channels]
        model = load_model(self.model_dir, card, self.params.provider)
        uncertainty = uncertain = None
        if self.params.uncertainty is None:
            labels, score = segment_scored([s.volume for s in series], card, onnx_runner(model), progress)
        else:
            uncertain = self._with_uncertainty(series, model, progress)
            labels, uncertainty = uncertain.labels, uncertain.record
            score = Confidence(uncertainty.get("confidence"), {})
        confidence = score.overall
        providers = [_PROVIDER_SHORT.get(p, p) for p in model.providers]
        # model_version: the registry's name for this version (node.models.versions), else the card's
        self.provenance = {"model": card.name, "model_version": self.model_version, "model_sha256": model.sha256,
                           "execution_providers": list(model.providers),
                           "confidence": None if confidence is None else round(confidence, 4)}
        if uncertainty is not None:
            self.provenance["uncertainty"] = uncertainty
        counts = value_counts(labels, 256)
        present = [lab for lab in card.labels if counts[lab.value]]
        if not present:
            raise HandlerRefusal(f"{self.name} found none of its structures "
                                 f"({', '.join(lab.name for lab in card.labels)}) in series {series[0].series_uid}")
        source = series[0]
        label_map = LabelMap(
            source_series_uid=source.series_uid,
            geometry=source.volume.geometry,
            labels=labels,
            segments=tuple(lab.segment() for lab in present),
            description=safe_text(f"{card.name} {self.model_version} {providers[0]}"),
            encodings=tuple(e for e in emit if e in ("SEG", "RTSTRUCT")),
        )
        voxel_ml = float(np.prod(source.volume.geometry.spacing)) / 1000.0
        results: list = [label_map, *output_flags(card, labels, voxel_ml, score)]
        if uncertain is not None and self.params.uncertainty.parametric_map:
            grid, entropy = uncertain.grid, uncertain.entropy
            if self.params.uncertainty.parametric_map_grid == "source":
                grid = source.volume.geometry
                entropy = np.clip(resample(uncertain.entropy, uncertain.grid, grid, linear=True), 0.0, 1.0)
            results.append(QuantityMap(source_series_uid=source.series_uid, geometry=grid,
                                       values=entropy, quantity=ENTROPY, unit=NO_UNITS,
                                       description=safe_text(f"{card.name} {self.model_version} uncertainty"),
                                       value_range=(0.0, 1.0)))
        if "SR" in emit:
            groups = tuple(
                MeasurementGroup(tracking_id=lab.name, finding=lab.finding_key, segment_label=lab.value,
                                 measurements=(_volume_ml(counts[lab.value], voxel_ml),))
                for lab in present)
            results.append(MeasurementReport(source_series_uid=source.series_uid, template=SR_TEMPLATE, groups=groups,
                                             title="Imaging Measurement Report"))
        progress(1.0, f"{len(present)} structures")
        return results

    def _with_uncertainty(self, series, model, progress: Progress):
        """The prediction over the uncertainty passes, Monte-Carlo dropout ones from the card's second graph."""
        card, params = self.card, self.params.uncertainty
        try:
            plan = passes_for(card, params)
        except ValueError as exc:  # no pass besides the identity, or MC samples of a network without dropout
            raise HandlerRefusal(f"{self.name}: {exc}") from None
        sample_runner = None
        if any(p.sample is not None for p in plan):
            mc = load_model(self.model_dir, card, self.params.provider, mc_dropout=True)

            def sample_runner(sample: int):
                return masked_runner(mc, dropout_masks(mc, card.mc_dropout.rate, params.seed, sample))
        # a network exported with a fixed batch size cannot take the passes stacked into one batch
        fixed_batch = isinstance(model.session.get_inputs()[0].shape[0], int)
        return predict_with_uncertainty([s.volume for s in series], card, onnx_runner(model), params, progress,
                                        sample_runner, stack_passes=not fixed_batch)
