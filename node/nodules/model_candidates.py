"""Nodule candidates from a detection model (card ``task: detection``), the ``CandidateSource`` a
site's trained detector gives the lung-nodules workflow: its detections inside the closed lungs,
each then measured (and kept or rejected) exactly as the blob measure's candidates are."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.handler_api import HandlerRefusal, ModelRef
from node.models.card import CardError, ModelCard, load_card
from node.models.detection import detect
from node.models.inference import LoadedModel, PatchRunner, load_model, onnx_runner
from node.models.versions import BUILT_IN
from node.nodules.candidates import Candidate
from node.nodules.detect import CandidateSource
from node.nodules.region import LungRegion
from node.volume import Volume

__all__ = ["model_candidates", "Detector", "load_detector"]

_SQRT3 = 3 ** 0.5  # Candidate.radius_mm = scale_mm * sqrt(3)


def model_candidates(card: ModelCard, run: PatchRunner) -> CandidateSource:
    def source(volume: Volume, region: LungRegion) -> list[Candidate]:
        found = detect(volume, card, run, where=region.both)
        # strength: the model's score (0..1), not the blob measure's HU; only the order is used
        return [Candidate(d.kji, max(d.radius_mm, 1.0) / _SQRT3, d.score) for d in found]

    return source


@dataclass(frozen=True)
class Detector:
    """A detection model ready to run: its card, the version every result names, its ONNX session."""

    card: ModelCard
    version: str
    model: LoadedModel

    @property
    def source(self) -> CandidateSource:
        return model_candidates(self.card, onnx_runner(self.model))

    def provenance(self) -> dict:
        return {"detector": self.card.name, "detector_version": self.version, "detector_sha256": self.model.sha256,
                "execution_providers": list(self.model.providers)}


def load_detector(ref: ModelRef | None, name: str) -> Detector:
    """The detector the ``detector`` param names: ``ref`` as the node resolved it through its model
    registry, else (a handler run outside a node, a remote worker) the shipped ``models/<name>/``.
    HandlerRefusal when there is none, or its card is not a detection card."""
    if ref is None:
        from node.models.registry import DEFAULT_MODELS_DIR

        ref = ModelRef(name, BUILT_IN, str(DEFAULT_MODELS_DIR / name))
    folder = Path(ref.folder)
    try:
        card = load_card(folder)
        if card.task != "detection":
            raise HandlerRefusal(f"detector: model {name!r} is a {card.task} model (card task: {card.task}); "
                                 "the detector must be a task: detection model")
        model = load_model(folder, card, "auto")
    except CardError as exc:
        raise HandlerRefusal(f"detector: model {name!r} cannot be used: {exc}") from None
    return Detector(card, card.version if ref.version == BUILT_IN else ref.version, model)
