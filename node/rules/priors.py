"""``priors:`` on a routing rule: the same patient's earlier studies a job should be handed.

    priors: {source: pacs, max: 2, within: 5y, match: {Modality: CT, BodyPartExamined: CHEST}, wait: 10m}

``match`` keys: Modality (sent as ModalitiesInStudy) and StudyDescription select studies;
BodyPartExamined, SeriesDescription and any other series attribute select the series retrieved
(a prior study with no matching series is not a prior). node/pacs/priors.py carries it out.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from node.rules.attributes import resolve_attribute
from node.rules.spans import parse_span_s

STUDY_KEYS = ("Modality", "ModalitiesInStudy", "StudyDescription")


class PriorsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str | None = None  # a PACS source; None: only priors already in the node
    max: int = Field(2, ge=1, le=20)
    within: float = 5 * 365 * 86400.0  # seconds back from the current study
    match: dict[str, str] = {}
    wait: float | None = None  # how long the job waits for priors (default: the node's priors_wait_s)

    @field_validator("within", mode="before")
    @classmethod
    def _within(cls, v: Any) -> float:
        return parse_span_s(v)

    @field_validator("match")
    @classmethod
    def _match_keys(cls, v: dict[str, str]) -> dict[str, str]:
        # Each key is looked up in the PACS answers / stored headers (node/pacs/priors.py): a misspelt
        # one is never there, so every prior would silently be filtered out. Only DICOM keywords
        # work there: a tag, a derived name or a sequence is refused too.
        bad = []
        for k in v:
            try:
                ref = resolve_attribute(k, level="series")
            except ValueError as exc:
                bad.append(str(exc))  # names the key, suggests the likely keyword
                continue
            if ref.derived or not k.isidentifier():  # a tag such as '0018,0050' is not an identifier
                bad.append(f"match key '{k}': priors match on DICOM keywords (e.g. BodyPartExamined), "
                           "not tags or derived attributes")
            elif ref.kind == "sequence":
                bad.append(f"match key '{k}': {k} is a sequence; priors match single values")
        if bad:
            raise ValueError("; ".join(bad))
        return v

    @field_validator("wait", mode="before")
    @classmethod
    def _wait(cls, v: Any) -> float | None:
        return None if v is None else parse_span_s(v)

    def study_match(self) -> dict[str, str]:
        return {("ModalitiesInStudy" if k == "Modality" else k): v for k, v in self.match.items() if k in STUDY_KEYS}

    def series_match(self) -> dict[str, str]:
        return {k: v for k, v in self.match.items() if k not in STUDY_KEYS}
