"""Configuration of the PACS sources the node pulls from (``sources:`` in hilum.yaml).

Kept apart from ``node.config`` (which embeds ``sources`` in ``Settings``) like the security
settings. Secrets never sit in the YAML: a DICOMweb source names an environment variable or a
file, and both are checked when the settings load, so a typo is a start-up error naming the field.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from node.config_security import ClientTls

_AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")
SOURCE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class _Strict(BaseModel):
    # NaN passes every gt/le bound (each comparison is False) and inf passes gt=0: refuse both.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _ae(v: str | None) -> str | None:
    if v is not None and (not _AE_RE.match(v) or "\\" in v or not v.strip()):
        raise ValueError(f"{v!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return v.strip() if v is not None else None


class DimseSource(_Strict):
    """A PACS answering C-FIND and C-MOVE or C-GET (Study Root)."""

    type: Literal["dimse"] = "dimse"
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    retrieve: Literal["move", "get"] = "move"
    # The AE title the PACS knows this node by (its C-MOVE destination); default: the node's ae_title.
    move_destination: str | None = None
    calling_ae_title: str | None = None  # default: the node's ae_title
    tls: ClientTls | None = None  # DICOM TLS to the PACS (same settings as a TLS destination)
    max_concurrent: int = Field(2, ge=1, le=16)  # retrieves running at once against this source
    timeout_s: float = Field(60.0, gt=0, le=3600)  # network and DIMSE timeout
    # A PACS answering every response within timeout_s can still answer forever: a C-FIND taking
    # longer than find_timeout_s in all, and a C-MOVE / C-GET whose pending responses show no change
    # in their sub-operation counts for stall_timeout_s, are aborted and fail (PacsError, retried).
    find_timeout_s: float = Field(600.0, gt=0, le=86400)
    stall_timeout_s: float = Field(600.0, gt=0, le=86400)
    # C-GET needs a presentation context per storage class; used when the PACS does not answer
    # SOPClassesInStudy (empty: a built-in list of common image and result classes).
    storage_classes: list[str] = []

    _aes = field_validator("ae_title", "move_destination", "calling_ae_title")(classmethod(lambda cls, v: _ae(v)))

    @field_validator("storage_classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        if len(v) > 120:  # 128 presentation contexts, minus the Q/R ones
            raise ValueError(f"{len(v)} storage classes: at most 120 fit in one association")
        bad = [u for u in v if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", u)]
        if bad:
            raise ValueError(f"not UIDs: {', '.join(bad)}")
        return v


class WebAuth(_Strict):
    """HTTP Basic (``username`` + password) or a bearer token, from an env variable or a file."""

    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    token_env: str | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> "WebAuth":
        given = [k for k in ("password_env", "password_file", "token_env", "token_file") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of password_env, password_file, token_env, token_file "
                             "(secrets are never written inline)")
        if given[0].startswith("password") and not self.username:
            raise ValueError("username: required with a password")
        if given[0].startswith("token") and self.username:
            raise ValueError("username: not used with a token")
        env = self.password_env or self.token_env
        if env and not os.environ.get(env):
            raise ValueError(f"{given[0]}: environment variable {env} is not set")
        path = self.password_file or self.token_file
        if path and not Path(path).is_file():
            raise ValueError(f"{given[0]}: file {path} does not exist")
        return self

    def secret(self) -> str:
        env = self.password_env or self.token_env
        if env:
            return os.environ.get(env, "")
        return Path(self.password_file or self.token_file).read_text().strip()  # type: ignore[arg-type]

    @property
    def is_token(self) -> bool:
        return bool(self.token_env or self.token_file)


class DicomwebSource(_Strict):
    """An archive answering QIDO-RS and WADO-RS."""

    type: Literal["dicomweb"] = "dicomweb"
    qido_url: str
    wado_url: str | None = None  # default: qido_url
    auth: WebAuth | None = None
    max_concurrent: int = Field(2, ge=1, le=16)
    timeout_s: float = Field(60.0, gt=0, le=3600)

    @field_validator("qido_url", "wado_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/") if v else v

    @property
    def wado(self) -> str:
        return self.wado_url or self.qido_url


def _source_kind(v: Any) -> str:
    """``type`` when given, else what the fields say (a DICOMweb source has a qido_url)."""
    if isinstance(v, dict):
        return v.get("type") or ("dicomweb" if "qido_url" in v else "dimse")
    return getattr(v, "type", "dimse")


PacsSource = Annotated[Union[Annotated[DimseSource, Tag("dimse")], Annotated[DicomwebSource, Tag("dicomweb")]],
                       Discriminator(_source_kind)]


def check_source_names(names) -> None:
    for name in names:
        if not SOURCE_NAME_RE.fullmatch(name):
            raise ValueError(f"sources: name {name!r} must be lowercase letters, digits, '-' or '_'")
