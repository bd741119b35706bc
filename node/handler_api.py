"""The handler interface and registry.

A handler is a class registered by name with ``@register``. It declares what it accepts and
its version, receives the study's series as loaded volumes (``node.volume.SeriesData``), and
returns typed results (``node.results``). It never writes DICOM and never opens a socket.
"""
from __future__ import annotations

import datetime as dt
import importlib
from abc import ABC, abstractmethod
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from node.volume import SeriesData

__all__ = [
    "Handler",
    "HandlerInput",
    "HandlerRefusal",
    "ModelRef",
    "NoParams",
    "PriorStudy",
    "Progress",
    "register",
    "get_handler",
    "handler_names",
    "discover",
]

Progress = Callable[[float, str], None]


class HandlerRefusal(Exception):
    """The input is not something this handler can answer for (e.g. a scout, an MR for a CT tool).

    The job fails with this message and nothing is delivered: a clear refusal beats a wrong answer.
    """


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(eq=False)
class PriorStudy:
    """An earlier study of the same patient, handed to a job whose rule asks for priors.

    ``source`` says where it came from: ``node`` (already received here) or the name of the
    PACS source it was retrieved from. ``acquired`` is the study's date and time (StudyDate +
    StudyTime, falling back to the series' acquisition date), what follow-up intervals use.
    """

    study_uid: str
    acquired: dt.datetime | None
    series: list[SeriesData]
    source: str = "node"


@dataclass(frozen=True)
class ArtefactKey:
    """An intermediate array one handler computes and another may reuse on the same series (e.g.
    ct-anatomy's lungs, which lung-nodules would otherwise segment again). ``variant`` names the
    producer's parameters the array depends on; the node adds the series and its instance set."""

    producer: str  # the handler's name
    version: str  # the handler's version: a new version never reuses an older one's arrays
    name: str
    variant: str = ""


@dataclass(frozen=True)
class ModelRef:
    """A model that one of a handler's params names (``Handler.model_params``, e.g. lung-nodules'
    ``detector``), resolved by the node through its model registry when a worker takes the job:
    the version active then (``built-in`` for the shipped ``models/<name>/``) and its folder."""

    name: str
    version: str
    folder: str


@dataclass(eq=False)
class HandlerInput:
    study_uid: str
    series: list[SeriesData]  # a series-level rule gives one; a study-level rule all of the study's
    # The same patient's earlier studies, most recent first (empty unless the rule asks for priors).
    priors: list[PriorStudy] = field(default_factory=list)
    # Why priors are missing or incomplete when the rule asked for them (e.g. timed out), else None.
    priors_note: str | None = None
    # Arrays of the primary series the node kept from an earlier job (``Handler.wants_artefacts``),
    # for exactly this series and instance set; a handler computes what is missing itself.
    artefacts: dict[ArtefactKey, np.ndarray] = field(default_factory=dict)
    # Param name -> the model it names, resolved by the node (see Handler.model_params).
    models: dict[str, ModelRef] = field(default_factory=dict)

    @property
    def primary(self) -> SeriesData:
        return self.series[0]


class Handler(ABC):
    """Base class. Subclasses set the ClassVars and implement ``run``."""

    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str] = ""
    modalities: ClassVar[frozenset[str]] = frozenset()  # empty: any modality
    needs_volume: ClassVar[bool] = False  # True: refuse series that are not regular 3-D volumes
    needs_pixels: ClassVar[bool] = True
    Params: ClassVar[type[BaseModel]] = NoParams
    # SR template (sr_templates/<name>.yaml) and the finding/measurement keys the handler reports:
    # checked against the template at start-up, so a missing entry never fails a job at run time.
    sr_template: ClassVar[str | None] = None
    reports_findings: ClassVar[frozenset[str]] = frozenset()
    reports_measurements: ClassVar[frozenset[str]] = frozenset()
    # Provenance recorded in every result object (model name/version for AI handlers).
    model_name: ClassVar[str | None] = None
    model_version: ClassVar[str | None] = None
    # Artefacts of other handlers' jobs on the same series this handler can use (HandlerInput.artefacts).
    wants_artefacts: ClassVar[tuple[ArtefactKey, ...]] = ()
    # Params whose value names a model (e.g. "detector"): the node resolves each through its registry
    # and hands it over in HandlerInput.models. A handler using one sets model_name/model_version on
    # itself, so its results name that model.
    model_params: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: BaseModel | dict | None = None) -> None:
        self.params = params if isinstance(params, BaseModel) else self.Params.model_validate(params or {})
        # Filled by run() where it matters (model hash, execution providers): kept in the job history.
        self.provenance: dict[str, object] = {}

    def check(self, inp: HandlerInput) -> None:
        """Refuse input outside the declared scope, before any pixel work."""
        for s in inp.series:
            if self.modalities and s.modality not in self.modalities:
                raise HandlerRefusal(
                    f"{self.name} accepts {', '.join(sorted(self.modalities))}; series {s.series_uid} is {s.modality or 'unknown'}"
                )
            if self.needs_volume and s.volume is None:
                raise HandlerRefusal(f"{self.name} needs a regular 3-D volume: {s.volume_error or 'no pixel data'}")

    def assess_input(self, inp: HandlerInput) -> list:
        """Quality flags (``node.results.QualityFlag``, kind ``domain``) for input this handler runs on
        but was not validated for, e.g. a model's card domain. Called by the node after ``check`` and
        before ``run``: by the rule's policy the job is refused before any compute, or runs and every
        result carries the warning. The default has no domain to compare against."""
        return []

    def artefacts(self, inp: HandlerInput, outputs: list) -> dict[ArtefactKey, np.ndarray]:
        """Arrays of the primary series worth keeping for later jobs, from this job's ``outputs``;
        the node stores them once the results are accepted. None by default. By then the source
        volumes' pixels are released (``ReleasedPixels``: reading them raises): what is kept is made
        from the outputs."""
        return {}

    @abstractmethod
    def run(self, inp: HandlerInput, progress: Progress) -> list:
        """Compute; return node.results objects (never DICOM), with a ``QualityFlag`` for every
        plausibility or confidence check the output failed."""


_REGISTRY: dict[str, type[Handler]] = {}
_discovered = False


def register(cls: type[Handler]) -> type[Handler]:
    """Class decorator: make a handler reachable by its ``name`` from rules."""
    for attr in ("name", "version"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"handler {cls.__name__} must define a string '{attr}'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two handlers are named {cls.name!r}: {_REGISTRY[cls.name].__name__} and {cls.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def discover() -> None:
    """Import every module of the ``handlers`` package so their ``@register`` runs."""
    global _discovered
    if _discovered:
        return
    import handlers

    for mod in pkgutil.iter_modules(handlers.__path__):
        importlib.import_module(f"handlers.{mod.name}")
    _discovered = True


def get_handler(name: str) -> type[Handler]:
    """A registered handler, or ``model:<name>``: a handler built from ``models/<name>/card.yaml``."""
    if name.startswith("model:"):
        from node.models.registry import model_handler  # heavy (onnxruntime): only when asked for

        return model_handler(name)
    discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no handler named {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def handler_names() -> list[str]:
    """Registered handlers and one ``model:<name>`` per segmentation model card (detectors are no handlers)."""
    from node.models.registry import model_names

    discover()
    return sorted(_REGISTRY) + model_names(handlers_only=True)
