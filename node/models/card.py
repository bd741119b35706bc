"""Model cards: the declarative description of an exported segmentation or detection model.

``models/<name>/card.yaml`` says what the network expects (modality, grid, intensities), how to
run it (patches, overlap, blending, flips), what its output channels mean (coded labels) and what
to emit. ``task`` says what the model is for: ``segmentation`` (the default; run as a
``model:<name>`` handler) or ``detection`` (a heat map or boxes that a handler takes as its
candidates, e.g. ``lung-nodules`` with ``detector: <name>``); the two are never interchangeable. Everything is validated when the card is loaded, and every error names the card file and
the field (``models/x/card.yaml: labels.1.color: ...``), so a broken card stops the node at
start-up instead of failing a job later.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.config import safe_load_unique
from node.results import RT_ROI_TYPES, Code, Segment, check_text

__all__ = ["CardError", "ModelCard", "LabelSpec", "load_card", "orientation_matrix", "format_validation_error",
           "CARD_FILE", "ValidatedDomain", "Range", "IntensityProfile", "OrientationDomain", "Plausibility",
           "LabelPlausibility", "HeldOutKind", "PLANES", "DetectionSpec", "TASKS", "MCDropout",
           "MEASURED_PERCENTILES"]

CARD_FILE = "card.yaml"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,47}$")
_AXES = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


class CardError(ValueError):
    """A model card (or its model file) is unusable; the message names the file and the field."""


class _Strict(BaseModel):
    # allow_inf_nan=False: YAML reads .nan / .inf as floats; NaN passes every bound (each comparison
    # is False), so a NaN spacing, window or range would be accepted here and corrupt or skip a job.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CodeSpec(_Strict):
    value: str = Field(min_length=1, max_length=64)
    scheme: str = "SCT"
    meaning: str = Field(min_length=1, max_length=64)

    @field_validator("value", "meaning")
    @classmethod
    def _one_lo_value(cls, v: str) -> str:
        check_text(v, "the value")  # written as Code Value / Code Meaning (LO): checked when the card loads, not per job
        return v

    @model_validator(mode="after")
    def _sct_is_numeric(self) -> "CodeSpec":
        if self.scheme == "SCT" and not self.value.isdigit():
            raise ValueError(f"SNOMED CT code value must be digits, got {self.value!r}")
        return self

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class PostProcess(_Strict):
    """Applied on the source grid, in this order: min_size_ml, largest_component, fill_holes."""

    min_size_ml: float = Field(0.0, ge=0)
    largest_component: bool = False
    fill_holes: bool = False


class LabelSpec(_Strict):
    value: int = Field(ge=1, le=255)  # output channel index (softmax) / channel + 1 (sigmoid)
    name: str = Field(min_length=1, max_length=64)
    category: CodeSpec
    type: CodeSpec
    tg263: str | None = Field(None, pattern=r"^[A-Za-z0-9_^\-~]{1,16}$")
    color: tuple[int, int, int]
    rt_roi_type: str = "ORGAN"
    finding: str | None = Field(None, pattern=r"^[a-z0-9_]{1,64}$")  # SR template key; default from name
    postprocess: PostProcess = PostProcess()

    @field_validator("name")
    @classmethod
    def _one_lo_name(cls, v: str) -> str:
        # The Segment Label, ROI Name and SR tracking identifier (LO) of every result: a backslash or
        # control character failed each job that built results, long after the card was accepted.
        check_text(v, "the value")
        return v

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in v):
            raise ValueError(f"color components must lie in 0..255, got {list(v)}")
        return v

    @field_validator("rt_roi_type")
    @classmethod
    def _roi_type(cls, v: str) -> str:
        if v not in RT_ROI_TYPES:
            raise ValueError(f"{v!r} is not an RT ROI Interpreted Type ({', '.join(sorted(RT_ROI_TYPES))})")
        return v

    @property
    def finding_key(self) -> str:
        return self.finding or re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")

    def segment(self) -> Segment:
        return Segment(label=self.value, name=self.name, category=self.category.code(), type=self.type.code(),
                       tg263=self.tg263, color=self.color, rt_roi_type=self.rt_roi_type)


class CTWindow(_Strict):
    """Clip to the window, then (x - mean) / std: the CT normalisation of nnU-Net and MONAI recipes."""

    kind: Literal["ct_window"]
    clip: tuple[float, float]
    mean: float
    std: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "CTWindow":
        if self.clip[0] >= self.clip[1]:
            raise ValueError(f"clip must be [low, high] with low < high, got {list(self.clip)}")
        return self


class ZScore(_Strict):
    """Per-image (x - mean) / std, over voxels above ``mask_above`` when given (e.g. MR body)."""

    kind: Literal["zscore"]
    mask_above: float | None = None


class Percentile(_Strict):
    """MR: clip to the [lower, upper] percentiles of the image, then scale to [0, 1]."""

    kind: Literal["percentile"]
    lower: float = Field(0.5, ge=0, lt=100)
    upper: float = Field(99.5, gt=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> "Percentile":
        if self.lower >= self.upper:
            raise ValueError("lower percentile must be below upper")
        return self


Preprocessing = Annotated[CTWindow | ZScore | Percentile, Field(discriminator="kind")]


class InputSpec(_Strict):
    modality: str = Field(pattern=r"^[A-Z]{2,16}$")
    body_region: str = Field(min_length=1, max_length=64)
    channels: int = Field(1, ge=1, le=8)  # one series per channel, in the order the rule passes them
    target_spacing: tuple[float, float, float]  # (x, y, z) mm, like Geometry.spacing
    orientation: str = "LPS"  # the patient directions the (i, j, k) index axes of the network grid point to
    # Order of the spatial axes in the network's input array: "zyx" (slices first, as DICOM and
    # SimpleITK arrays; nnU-Net) or "xyz" (as NIfTI arrays; MONAI). patch_size is in this order.
    array_axes: Literal["zyx", "xyz"] = "zyx"

    @field_validator("target_spacing")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0 < s <= 20 for s in v):  # written so that NaN fails too (min/max skip it)
            raise ValueError(f"target_spacing must be three values in (0, 20] mm, got {list(v)}")
        return v

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, v: str) -> str:
        orientation_matrix(v)
        return v


class InferenceSpec(_Strict):
    patch_size: tuple[int, int, int]  # voxels of the network grid, in input.array_axes order
    overlap: float = Field(0.5, ge=0, lt=1)
    blending: Literal["gaussian", "constant"] = "gaussian"
    gaussian_sigma_scale: float = Field(0.125, gt=0, le=1)
    tta_flips: list[list[Literal["x", "y", "z"]]] = []  # each entry: axes flipped together for one extra pass
    activation: Literal["softmax", "sigmoid"] = "softmax"  # softmax: argmax, channel 0 = background
    threshold: float = Field(0.5, gt=0, lt=1)  # sigmoid only
    batch_size: int = Field(1, ge=1, le=64)

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) < 8 or max(v) > 512:
            raise ValueError(f"patch_size must be three values in 8..512, got {list(v)}")
        return v

    @field_validator("tta_flips")
    @classmethod
    def _flips(cls, v: list[list[str]]) -> list[list[str]]:
        for entry in v:
            if not entry or len(set(entry)) != len(entry):
                raise ValueError(f"each tta_flips entry must name distinct axes, got {entry}")
        return v


class MCDropout(_Strict):
    """The network has dropout: ``model_file`` is a second export of it that takes one channel mask
    per dropout site as inputs after the image (``mask0``, ``mask1``, ...; shape (1, C, 1, 1, 1)),
    so Monte-Carlo dropout passes can run in ONNX Runtime, where dropout is otherwise off."""

    model_file: str = "model_mc.onnx"
    rate: float = Field(gt=0, lt=1)  # the training dropout probability the masks are drawn with
    samples: int = Field(4, ge=2, le=32)  # MC passes an uncertainty run adds unless the rule says otherwise


class HeldOutKind(_Strict):
    """Dice on a kind of data never seen in training (e.g. a phantom family left out), measured like
    ``Validation``: it says how far the model carries beyond its domain, not that it may be used there."""

    cases: int = Field(ge=1)
    mean_dice: float = Field(ge=0, le=1)
    dice: dict[str, float]
    confidence: float | None = Field(None, ge=0, le=1)


class Validation(_Strict):
    """Measured by the training pipeline on held-out cases, on their source grids."""

    dataset: str
    cases: int = Field(ge=1)
    mean_dice: float = Field(ge=0, le=1)
    dice: dict[str, float]
    confidence: float | None = Field(None, ge=0, le=1)  # mean over the cases (see Plausibility.min_confidence)
    held_out_kinds: dict[str, HeldOutKind] = {}


# ---------------------------------------------------------------- the model's limits

PLANES = ("axial", "coronal", "sagittal")
# The body-intensity percentiles node.models.domain measures on every input: a card range for any
# other percentile would be accepted and never compared.
MEASURED_PERCENTILES = (5, 25, 50, 75, 95)


class Range(_Strict):
    """A closed interval [min, max]; written ``{min: 1.5, max: 3.0}``."""

    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def __contains__(self, value: float) -> bool:
        return self.min <= value <= self.max

    def describe(self, unit: str = "") -> str:
        return f"{self.min:g}-{self.max:g}{(' ' + unit) if unit else ''}"


class OrientationDomain(_Strict):
    """The slice planes the model was validated on, how far the slices may tilt from that plane,
    and the patient positions (DICOM PatientPosition, e.g. HFS, FFS) it has seen."""

    planes: list[Literal["axial", "coronal", "sagittal"]] = Field(["axial"], min_length=1)
    max_tilt_deg: float = Field(10.0, ge=0, le=90)
    patient_positions: list[str] = []  # empty: any

    @field_validator("patient_positions")
    @classmethod
    def _positions(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if not re.fullmatch(r"[A-Z]{2,4}", p)]
        if bad:
            raise ValueError(f"{bad} are not DICOM PatientPosition values (HFS, FFS, HFP, ...)")
        return v


class IntensityProfile(_Strict):
    """Percentiles of the input's body voxels (values above ``body_above``, e.g. HU > -500), each
    with the range seen in the training data: a wrong rescale, another kernel or another modality
    moves them."""

    body_above: float = -500.0
    # Measured on the image resampled (anti-aliased) to this isotropic grid: body-edge partial volume,
    # and so the low percentiles, would otherwise depend on the input's resolution.
    grid_mm: float = Field(4.0, gt=0, le=20)
    percentiles: dict[int, Range] = Field(min_length=1)  # percentile (one of MEASURED_PERCENTILES) -> range

    @field_validator("percentiles")
    @classmethod
    def _levels(cls, v: dict[int, Range]) -> dict[int, Range]:
        bad = sorted(p for p in v if p not in MEASURED_PERCENTILES)
        if bad:
            raise ValueError(f"percentiles {bad} are not measured on inputs; use "
                             f"{', '.join(map(str, MEASURED_PERCENTILES))}")
        return v


class ValidatedDomain(_Strict):
    """What the model was trained and validated on; the handler compares every input against it
    before inference (``node.models.domain``). Written by ``hilum train`` from the training data,
    editable by hand; a field left out is not checked."""

    modality: str | None = Field(None, pattern=r"^[A-Z]{2,16}$")
    body_regions: list[str] = []  # BodyPartExamined values; checked only when the input names one
    pixel_spacing_mm: Range | None = None  # in-plane (both row and column spacing)
    slice_thickness_mm: Range | None = None  # SliceThickness, or the slice spacing where it is absent
    fov_mm: Range | None = None  # in-plane extent of the image (the larger of width and height)
    coverage_mm: Range | None = None  # extent along the slice normal
    orientation: OrientationDomain | None = None
    intensity: IntensityProfile | None = None
    trained_on: list[str] = []  # phantom families or data sets, for people (not checked)
    validated_on: list[str] = []

    @field_validator("body_regions")
    @classmethod
    def _regions(cls, v: list[str]) -> list[str]:
        # Inputs' BodyPartExamined is compared upper-cased (DICOM writes it so): `Chest` here
        # would flag every input.
        if any(not r.strip() for r in v):
            raise ValueError(f"empty body region in {v}")
        return [r.strip().upper() for r in v]


class LabelPlausibility(_Strict):
    """What a result for one label must look like to be delivered without a warning."""

    volume_ml: Range | None = None  # a min above 0 makes a missing structure a failed check
    continuous: bool = False  # present on every source slice between its first and last


class Plausibility(_Strict):
    """Post-inference checks: per label (by name) and a confidence floor (mean max-softmax inside
    the predicted labels, on the network grid; see ``node.models.inference.Confidence``)."""

    labels: dict[str, LabelPlausibility] = {}
    min_confidence: float | None = Field(None, ge=0, le=1)


TASKS = ("segmentation", "detection")


class DetectionSpec(_Strict):
    """How a detection model's output becomes candidates (``task: detection``).

    ``heatmap``: the model is run like a segmentation model (same grid, patches, blending); its one
    label's probability is the heat map, and every connected region at or above ``threshold`` is one
    candidate, centred on its probability-weighted centroid. ``boxes``: the model maps one patch
    (B, C, z, y, x) to (B, N, 7) rows ``z0, y0, x0, z1, y1, x1, score`` in patch voxels (network grid);
    boxes scoring at least ``threshold`` are candidates, overlapping ones merged (the stronger kept).
    """

    output: Literal["heatmap", "boxes"]
    threshold: float = Field(0.5, gt=0, lt=1)
    min_distance_mm: float = Field(4.0, ge=0, le=50)  # two candidates closer than this are one
    max_candidates: int = Field(200, ge=1, le=5000)


class ModelCard(_Strict):
    name: str
    task: Literal["segmentation", "detection"] = "segmentation"
    version: str = Field(pattern=r"^[0-9A-Za-z.+_-]{1,16}$")
    description: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    limitations: list[str] = Field(min_length=1)
    training_data: str = Field(min_length=1)
    model_file: str = "model.onnx"
    input: InputSpec
    preprocessing: Preprocessing
    inference: InferenceSpec
    labels: list[LabelSpec] = Field(min_length=1)
    emit: list[Literal["SEG", "RTSTRUCT", "SR"]] = ["SEG"]
    validation: Validation | None = None
    validated_domain: ValidatedDomain | None = None  # None: no domain checks
    plausibility: Plausibility | None = None  # None: no post-inference checks
    detection: DetectionSpec | None = None  # task detection only
    mc_dropout: MCDropout | None = None  # None: no dropout, no Monte-Carlo passes

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r}: use 1-48 lower-case letters, digits, '.', '_' or '-'")
        return v

    @model_validator(mode="after")
    def _labels_consistent(self) -> "ModelCard":
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values):
            raise ValueError(f"labels: duplicate values {values}")
        for what in ("name", "finding_key"):
            keys = [getattr(lab, what) for lab in self.labels]
            if len(set(keys)) != len(keys):
                raise ValueError(f"labels: duplicate {what}s {keys}")
        if self.inference.activation == "softmax" and sorted(values) != list(range(1, len(values) + 1)):
            raise ValueError(f"labels: softmax models need values 1..{len(values)} (channel indices), got {values}")
        if not self.emit:
            raise ValueError("emit: name at least one of SEG, RTSTRUCT, SR")
        if "SR" in self.emit and not ({"SEG", "RTSTRUCT"} & set(self.emit)):
            raise ValueError("emit: SR volumes reference segments, so SEG or RTSTRUCT must be emitted too")
        self._task_consistent()
        if self.plausibility is not None:
            names = {lab.name for lab in self.labels}
            unknown = sorted(set(self.plausibility.labels) - names)
            if unknown:
                raise ValueError(f"plausibility.labels: {unknown} are not label names of this card ({sorted(names)})")
        return self

    def _task_consistent(self) -> None:
        if self.task == "segmentation":
            if self.detection is not None:
                raise ValueError("detection: only a task: detection card has a detection section")
            return
        if self.detection is None:
            raise ValueError("detection: a task: detection card needs a detection section "
                             "(output: heatmap or boxes, threshold)")
        if self.detection.output == "heatmap" and len(self.labels) != 1:
            raise ValueError(f"labels: a heat-map detector has one label (what it detects), got {len(self.labels)}")
        if self.plausibility is not None and self.plausibility.labels:
            raise ValueError("plausibility.labels: volume checks are for segmentation models, not detectors")

    @property
    def output_channels(self) -> int:
        """Channels the network must produce: background + labels (softmax), one per label (sigmoid)."""
        return len(self.labels) + (1 if self.inference.activation == "softmax" else 0)


def orientation_matrix(code: str) -> np.ndarray:
    """3x3 direction matrix (columns = index axes) of an orientation code such as 'LPS' or 'RAS'."""
    if len(code) != 3 or any(c not in _AXES for c in code):
        raise ValueError(f"orientation {code!r} must be three letters from L/R, P/A, S/I, e.g. 'LPS'")
    m = np.zeros((3, 3))
    for col, c in enumerate(code):
        axis, sign = _AXES[c]
        m[axis, col] = sign
    if sorted(_AXES[c][0] for c in code) != [0, 1, 2]:
        raise ValueError(f"orientation {code!r} names one patient axis twice")
    return m


def format_validation_error(exc: ValidationError) -> str:
    """``field.path: message; ...`` — one line per problem, without pydantic's boilerplate."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def load_card(path: str | Path) -> ModelCard:
    """Read and validate ``card.yaml`` (the file or its folder); CardError names file and field."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    try:
        raw = safe_load_unique(path.read_text())  # a key written twice is an error, not last-wins
    except OSError as exc:
        raise CardError(f"{path}: cannot read the card: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CardError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise CardError(f"{path}: a card is a YAML mapping, got {type(raw).__name__}")
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise CardError(f"{path}: {format_validation_error(exc)}") from None
    model = path.parent / card.model_file
    if not model.is_file():
        raise CardError(f"{path}: model_file: {model} does not exist")
    if card.mc_dropout is not None and not (path.parent / card.mc_dropout.model_file).is_file():
        raise CardError(f"{path}: mc_dropout.model_file: {path.parent / card.mc_dropout.model_file} does not exist")
    return card
