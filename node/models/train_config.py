"""The training configuration file (``hilum train CONFIG.yaml``), validated like a card.

It holds everything the card needs (labels with codes, input grid, preprocessing, inference
settings, emit) plus the data, network, loss, optimiser, schedule, augmentation and stopping
rules; ``train.py`` turns it into a deployable ``models/<name>/``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.models.card import (CardError, DetectionSpec, InferenceSpec, InputSpec, LabelSpec, MCDropout, ModelCard,
                              Preprocessing, format_validation_error)

__all__ = ["TrainConfig", "TrainLabel", "DataSpec", "DicomwebSource", "DicomwebAuth", "load_train_config",
           "FamilySource", "HeldOutSpec", "BASELINE_PREFIX"]

BASELINE_PREFIX = "[supervised baseline] "  # its log lines (epochs) are not the run's own progress


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainLabel(LabelSpec):
    """A card label plus the names it has in the training data (phantom label table / SEG SegmentLabel)."""

    source: list[str] = Field(min_length=1)


class PhantomSource(BaseModel):
    """``count`` phantoms from ``node.phantom.ct.generate_ct``; other keys are passed to it.

    ``vary`` maps generator options to lists of values; each phantom draws one value per option
    (seeded), so the training set covers e.g. contrast, arm position and head/feet-first scans.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    count: int = Field(ge=2, le=1000)
    seed: int = Field(0, ge=0)  # phantom i uses seed + i
    vary: dict[str, list[Any]] = {}

    @field_validator("vary")
    @classmethod
    def _choices(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, values in v.items() if not values]
        if empty:
            raise ValueError(f"vary: {empty} need at least one value each")
        return v

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def options(self, i: int) -> dict[str, Any]:
        """Generator options of phantom i: the fixed ones plus its draw from ``vary``."""
        rng = np.random.default_rng([self.seed + i, 7])
        drawn = {k: values[int(rng.integers(len(values)))] for k, values in sorted(self.vary.items())}
        return {**self.params, **drawn}


class FamilySource(_Strict):
    """Cases of the randomised phantom family (``node.phantom.family``): the anatomy is drawn from the seed.

    Seeds run from ``seed`` upward; a seed whose drawn anatomy matches ``exclude`` is skipped (that
    kind is held out, see ``HeldOutSpec.family``). Each case draws its size from ``rows`` and
    ``slices`` (so pixel spacing and slice thickness vary) and its acquisition direction from
    ``directions``: FFS re-indexes the case feet first (slices from the feet, columns toward the
    patient's right), the way such a scanner writes the same anatomy.
    """

    count: int = Field(ge=2, le=1000)
    seed: int = Field(0, ge=0)
    rows: list[int] = Field([96], min_length=1)
    slices: list[int] = Field([48], min_length=1)
    directions: list[Literal["HFS", "FFS"]] = Field(["HFS"], min_length=1)
    exclude: dict[str, list[Any]] = {}  # FamilyAnatomy field -> values kept out of training
    # model labels the family does not paint (the liver): background in its cases, not a missing-label error
    unpainted: list[str] = []

    @field_validator("exclude")
    @classmethod
    def _fields(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        from node.phantom.family import FamilyAnatomy

        unknown = sorted(set(v) - set(FamilyAnatomy.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{unknown} are not drawn anatomy fields ({', '.join(FamilyAnatomy.__dataclass_fields__)})")
        return v


class HeldOutSpec(_Strict):
    """A kind of data never trained on, measured after training: family cases whose anatomy matches
    ``family`` (seeds from ``seed`` upward), or ``phantom``: generate_ct phantoms (another generator)."""

    name: str = Field(min_length=1, max_length=64)
    count: int = Field(2, ge=1, le=100)
    seed: int = Field(0, ge=0)
    family: dict[str, list[Any]] | None = None  # FamilyAnatomy field -> values ({} : any family case)
    rows: list[int] | None = None  # family case sizes; default: data.family's
    slices: list[int] | None = None
    phantom: dict[str, Any] | None = None  # generate_ct options

    @model_validator(mode="after")
    def _one(self) -> "HeldOutSpec":
        if (self.family is None) == (self.phantom is None):
            raise ValueError(f"held-out kind {self.name!r}: give exactly one of family or phantom")
        return self


_SECRETS = ("password", "token")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class DicomwebAuth(_Strict):
    """Archive credentials, read when training starts from an environment variable or a file.

    The config is copied next to the model (``train.yaml``) and into version control, so a
    secret never stands in it.
    """

    username: str | None = None  # HTTP basic, with password_env or password_file
    password_env: str | None = None
    password_file: Path | None = None
    token_env: str | None = None  # bearer token, e.g. a node API token (`hilum token create`)
    token_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, raw: Any) -> Any:
        for key in _SECRETS:
            if isinstance(raw, dict) and key in raw:
                raise ValueError(f"{key}: a secret is never written in the config; name the environment variable "
                                 f"({key}_env) or the file ({key}_file) that holds it")
        return raw

    @model_validator(mode="after")
    def _one_scheme(self) -> "DicomwebAuth":
        given = [f for f in ("password_env", "password_file", "token_env", "token_file") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of password_env, password_file (HTTP basic, with username), "
                             f"token_env, token_file (bearer); got {given or 'none'}")
        if given[0].startswith("password") and not self.username:
            raise ValueError(f"username: HTTP basic authentication ({given[0]}) needs a username")
        if given[0].startswith("token") and self.username:
            raise ValueError(f"username: goes with password_env/password_file, not with a bearer token ({given[0]})")
        return self


class DicomwebSource(_Strict):
    """SEG instances (Modality=SEG) found by QIDO-RS, each with the series it references (WADO-RS)."""

    url: str  # the DICOMweb root: the node's https://host:8080/dicom-web or Orthanc's /dicom-web
    auth: DicomwebAuth | None = None
    study_uids: list[str] = []  # only these studies (default: the whole archive)
    query: dict[str, str] = {}  # more QIDO matching keys for the SEG search, e.g. {PatientID: "PHANTOM*"}
    sop_uids: list[str] = []  # only these SEG instances (e.g. a project's accepted label versions)
    timeout_s: float = Field(60.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http(s) URL with a host")
        if parts.username or parts.password:
            raise ValueError("credentials in the URL are a secret written in the config: use auth "
                             "(password_env/password_file or token_env/token_file)")
        if parts.query or parts.fragment:
            raise ValueError("the DICOMweb root takes no query or fragment: put QIDO filters in query")
        return v.rstrip("/")

    @field_validator("study_uids", "sop_uids")
    @classmethod
    def _uids(cls, v: list[str]) -> list[str]:
        bad = [u for u in v if len(u) > 64 or not _UID.match(u)]
        if bad:
            raise ValueError(f"{bad} are not DICOM UIDs")
        return v

    @field_validator("query")
    @classmethod
    def _query(cls, v: dict[str, str]) -> dict[str, str]:
        from pydicom.datadict import tag_for_keyword

        unknown = [k for k in v if tag_for_keyword(k) is None and not re.fullmatch(r"[0-9A-Fa-f]{8}", k)]
        if unknown:
            raise ValueError(f"{unknown} are not DICOM keywords or 8-digit hex tags")
        fixed = {"Modality": "the source searches Modality=SEG itself",
                 "StudyInstanceUID": "list studies in study_uids"}
        for key, why in fixed.items():
            if key in v:
                raise ValueError(f"{key}: {why}")
        return v


class DataSpec(_Strict):
    phantom: PhantomSource | None = None
    family: FamilySource | None = None  # the randomised phantom family
    dicom_seg: Path | None = None  # folder of DICOM series + DICOM SEG objects referencing them
    dicomweb: DicomwebSource | None = None  # the same, from an archive (what OHIF annotation leaves there)
    validation_split: float = Field(0.2, gt=0, lt=1)
    cache_dir: Path | None = None  # generated phantoms are kept here between runs
    held_out: list[HeldOutSpec] = []  # kinds never trained on, measured after training

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        given = [s is not None for s in (self.phantom, self.family, self.dicom_seg, self.dicomweb)]
        # phantom + family is the one mix: generate_ct's labels (a liver) with the family's varied anatomy
        if sum(given) != 1 and given != [True, True, False, False]:
            raise ValueError("give exactly one data source: phantom, family, dicom_seg or dicomweb "
                             "(or phantom and family together)")
        if any(h.family is not None and not (h.rows and h.slices) for h in self.held_out) and self.family is None:
            raise ValueError("held_out: family kinds need rows and slices, or data.family's")
        names = [h.name for h in self.held_out]
        if len(set(names)) != len(names):
            raise ValueError(f"held_out: duplicate names {names}")
        return self

    @property
    def source_name(self) -> str:
        if self.phantom is not None and self.family is not None:
            return "phantoms and phantom family"
        if self.phantom is not None:
            return "phantoms"
        if self.family is not None:
            return "phantom family"
        return f"DICOM SEG folder {self.dicom_seg}" if self.dicom_seg is not None else f"DICOMweb {self.dicomweb.url}"


class NetworkSpec(_Strict):
    base_channels: int = Field(8, ge=2, le=64)
    depth: int = Field(3, ge=2, le=6)
    blocks: int = Field(1, ge=1, le=4)
    max_channels: int = Field(128, ge=4, le=512)
    # channel dropout after the bottleneck and each decoder stage; > 0 also deploys the Monte-Carlo
    # dropout graph (card mc_dropout), so predictions can sample it for their uncertainty
    dropout: float = Field(0.0, ge=0, le=0.5)
    mc_samples: int = Field(4, ge=2, le=32)  # the card's default number of MC dropout passes


class LossSpec(_Strict):
    dice_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _some(self) -> "LossSpec":
        if self.dice_weight + self.ce_weight <= 0:
            raise ValueError("dice_weight + ce_weight must be positive")
        return self


class OptimizerSpec(_Strict):
    kind: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1)  # sgd only (Nesterov)


class ScheduleSpec(_Strict):
    kind: Literal["poly", "cosine", "constant"] = "poly"
    warmup_epochs: int = Field(0, ge=0)


class AugmentSpec(_Strict):
    probability: float = Field(0.8, ge=0, le=1)  # chance that a patch gets the spatial transform
    rotate_deg: float = Field(10.0, ge=0, le=45)
    scale: tuple[float, float] = (0.9, 1.1)
    flip_axes: list[Literal["x", "y", "z"]] = []  # x swaps left and right: only for lateral-symmetric labels
    intensity_scale: float = Field(0.1, ge=0, le=1)
    intensity_shift: float = Field(0.1, ge=0, le=2)
    noise_std: float = Field(0.05, ge=0, le=1)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.5 <= v[0] <= v[1] <= 2.0:
            raise ValueError(f"scale must be [low, high] within 0.5..2.0, got {list(v)}")
        return v


class EarlyStopping(_Strict):
    patience: int = Field(5, ge=1)  # validations without improvement before stopping
    min_delta: float = Field(0.0, ge=0)


class StrategySpec(_Strict):
    """``supervised`` (labelled cases only) or ``semi-supervised``, which also learns from the
    ``unlabeled`` cases by one of two methods:

    - ``pseudo-label``: after ``start_epoch`` supervised epochs the model labels the unlabeled cases
      itself, keeping only voxels whose class probability reaches ``confidence`` (the rest are
      ignored by the loss), refreshed every ``refresh_every`` epochs; each step then adds ``weight``
      × the loss on a pseudo-labelled batch.
    - ``mean-teacher``: a teacher network is the exponential moving average (``ema_decay``) of the
      trained (student) network's weights; each step adds ``weight`` × a ramp-up (0 to 1 over
      ``rampup_epochs``, Laine & Aila's exp(-5(1-t)^2)) × the consistency loss, the mean squared
      difference of the two networks' class probabilities on an unlabeled batch seen under
      different intensity noise. The teacher is what is validated, checkpointed and deployed.

    ``compare_supervised`` also trains the supervised baseline on the same labelled cases (same
    seed, epochs and validation cases) and stores both validation Dice figures side by side.
    """

    kind: Literal["supervised", "semi-supervised"] = "supervised"
    method: Literal["pseudo-label", "mean-teacher"] = "pseudo-label"  # semi-supervised only
    unlabeled: DataSpec | None = None  # semi-supervised: the cases without labels (any truth is ignored)
    weight: float = Field(0.5, gt=0, le=100)  # of the unlabeled loss (pseudo-label loss or consistency)
    confidence: float = Field(0.9, gt=0.5, lt=1)  # pseudo-label
    start_epoch: int = Field(1, ge=1)  # pseudo-label
    refresh_every: int = Field(1, ge=1)  # pseudo-label
    ema_decay: float = Field(0.99, gt=0, lt=1)  # mean-teacher
    rampup_epochs: int = Field(5, ge=0)  # mean-teacher; 0: full weight from the first step
    compare_supervised: bool = False  # semi-supervised: also train the supervised baseline

    @model_validator(mode="after")
    def _unlabeled(self) -> "StrategySpec":
        if self.kind == "semi-supervised" and self.unlabeled is None:
            raise ValueError("unlabeled: semi-supervised training needs the unlabeled cases (a data source)")
        # a field set away from its default where it does nothing is a mistake worth naming (and
        # comparing with the default, not with "was it written", keeps a dumped config loadable)
        changed = [f for f, info in StrategySpec.model_fields.items() if getattr(self, f) != info.default]
        if self.kind == "supervised":
            unused = [f for f in changed if f != "kind"]
            if unused:
                raise ValueError(f"{unused[0]}: only used by kind semi-supervised")
            return self
        for method, fields in _METHOD_FIELDS.items():
            unused = [f for f in fields if f in changed]
            if method != self.method and unused:
                raise ValueError(f"{unused[0]}: only used by method {method} (this strategy's method is "
                                 f"{self.method})")
        return self


_METHOD_FIELDS = {"pseudo-label": ("confidence", "start_epoch", "refresh_every"),
                  "mean-teacher": ("ema_decay", "rampup_epochs")}


class TrainConfig(_Strict):
    name: str
    # detection: the network learns the one label's mask (e.g. the phantom's nodules) and is deployed
    # as a heat-map detector (card task: detection, with this detection section)
    task: Literal["segmentation", "detection"] = "segmentation"
    detection: DetectionSpec | None = None
    version: str
    description: str
    intended_use: str
    limitations: list[str]
    training_data: str
    seed: int = 0
    data: DataSpec
    labels: list[TrainLabel] = Field(min_length=1)
    input: InputSpec
    preprocessing: Preprocessing
    network: NetworkSpec = NetworkSpec()
    loss: LossSpec = LossSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    batch_size: int = Field(2, ge=1, le=64)
    patch_size: tuple[int, int, int]  # training patch (z, y, x), network grid voxels
    foreground_oversample: float = Field(0.33, ge=0, le=1)
    augmentation: AugmentSpec = AugmentSpec()
    epochs: int = Field(50, ge=1, le=10000)
    steps_per_epoch: int = Field(25, ge=1)
    validate_every: int = Field(1, ge=1)
    early_stopping: EarlyStopping = EarlyStopping()
    strategy: StrategySpec = StrategySpec()
    # Fine-tuning: the network starts from this checkpoint's weights (a ``best.pt`` that `hilum train`
    # wrote for the same network) instead of the seed's random start. In a project's training
    # configuration, ``previous`` names the project's latest finished run, so each round of the loop
    # carries on from the last model instead of relearning the anatomy from scratch.
    init_from: Literal["previous"] | Path | None = None
    inference: InferenceSpec
    emit: list[Literal["SEG", "RTSTRUCT", "SR"]] = ["SEG", "SR"]
    output_dir: Path = Path("models")  # the model lands in output_dir/<name>/
    work_dir: Path = Path("var/train")  # checkpoints and cached data: work_dir/<name>/
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.input.array_axes != "zyx":
            raise ValueError("input.array_axes: training feeds (z, y, x) arrays; 'xyz' is for imported models")
        if self.inference.activation != "softmax":
            raise ValueError("inference.activation: training produces softmax models (channel 0 = background)")
        if self.detection is not None and self.detection.output != "heatmap":
            raise ValueError("detection.output: training produces heat-map detectors (the label's probability)")
        div = 2 ** (self.network.depth - 1)
        for field, size in (("patch_size", self.patch_size), ("inference.patch_size", self.inference.patch_size)):
            if any(s % div for s in size) or min(size) < div:
                raise ValueError(f"{field} {list(size)} must be multiples of {div} (2^(network.depth-1))")
        try:  # the card rules (names, label values, emit) hold for the config too
            self.card_draft()
        except ValidationError as exc:
            raise ValueError(f"as a model card: {format_validation_error(exc)}") from None
        return self

    def card_draft(self, validation: dict | None = None, **measured: Any) -> ModelCard:
        """The card this configuration produces (``validation`` and the ``measured`` fields -
        limitations, validated_domain, plausibility - filled in after training)."""
        fields = dict(
            name=self.name, task=self.task, detection=self.detection, version=self.version, description=self.description, intended_use=self.intended_use,
            limitations=self.limitations, training_data=self.training_data, input=self.input,
            preprocessing=self.preprocessing, inference=self.inference,
            labels=[LabelSpec(**lab.model_dump(exclude={"source"})) for lab in self.labels],
            emit=self.emit, validation=validation,
            mc_dropout=(MCDropout(rate=self.network.dropout, samples=self.network.mc_samples)
                        if self.network.dropout else None))
        return ModelCard(**{**fields, **measured})


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a training config; relative paths in it are relative to the working directory."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CardError(f"{path}: cannot read the training config: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CardError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise CardError(f"{path}: a training config is a YAML mapping, got {type(raw).__name__}")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise CardError(f"{path}: {format_validation_error(exc)}") from None
