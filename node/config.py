"""Typed node configuration.

Sources, later ones winning: embedded defaults < YAML file (``--config``) < ``HILUM_*``
environment variables < command-line options. Validated once at start-up; an error names the
field (``destinations.tps.port: Input should be less than or equal to 65535``).
"""
from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.config_pacs import PacsSource, check_source_names
from node.config_archive import ArchiveSettings
from node.config_executor import ExecutorSettings
from node.config_security import AuditSettings, ClientTls, Deidentify, DicomTls, Retention, SpoolEncryption, WebTls

AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")


def _check_ae(v: str) -> str:
    if not AE_RE.match(v) or "\\" in v or not v.strip():
        raise ValueError(f"{v!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return v.strip()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: not loopback


class Strict(BaseModel):
    # allow_inf_nan=False: YAML reads .nan / .inf as floats, and NaN passes every gt/le bound (each
    # comparison is False), so a NaN or infinite timeout would otherwise be accepted.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AllowedCaller(Strict):
    ae_title: str
    host: str | None = None  # optional source address the AE must come from

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None:
            ipaddress.ip_address(v)
        return v


class DimseDestination(Strict):
    """A DICOM peer receiving results by C-STORE (e.g. a treatment planning system). Type ``hilum``:
    another Hilum node (multi-centre research), which needs both ``tls`` and ``deidentify``."""

    type: Literal["dimse", "hilum"] = "dimse"
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = None  # defaults to the node's AE title
    tls: ClientTls | None = None  # DICOM TLS to this peer
    deidentify: Deidentify | None = None  # send de-identified copies (PS3.15 Annex E profile)
    # Only instances of these modalities go to this peer (e.g. [CT, RTSTRUCT] for a planning system,
    # which reads contours, not SEG or SR); None: every instance a rule sends it.
    modalities: list[str] | None = None
    # Seconds to wait for each C-STORE response. pynetdicom's default (30 s) aborts the association
    # while a planning system is still storing a large RTSTRUCT; the instances it had stored stay
    # delivered, the rest is retried.
    dimse_timeout_s: float = Field(120.0, gt=0, le=3600)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty list sends nothing to this destination; leave it out to send everything")
        bad = [m for m in v if not isinstance(m, str) or not re.fullmatch(r"[A-Z0-9_]{1,16}", m)]
        if bad:
            raise ValueError(f"{bad} are not DICOM Modality values (upper case, e.g. CT, RTSTRUCT, SEG, SR)")
        return v

    @model_validator(mode="after")
    def _hilum_peer(self) -> "DimseDestination":
        missing = [f for f in ("tls", "deidentify") if self.type == "hilum" and getattr(self, f) is None]
        if missing:
            raise ValueError(f"{' and '.join(missing)}: required for a 'hilum' destination (data leaving the site "
                             "goes encrypted and de-identified)")
        return self


class ExternalOrthanc(Strict):
    url: str
    username: str | None = None
    password: str | None = None


class Settings(Strict):
    data_dir: Path = Path("./var")
    ae_title: str = "HILUM"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=1, le=65535)
    web_host: str = "127.0.0.1"
    web_port: int = Field(8080, ge=0, le=65535)
    orthanc_http_port: int = Field(8042, ge=1, le=65535)
    orthanc_dicom_port: int = Field(4242, ge=1, le=65535)
    orthanc_dicom_enabled: bool = False  # Orthanc 1.10 cannot bind DICOM to loopback: off unless asked
    external_orthanc: ExternalOrthanc | None = None
    archive: ArchiveSettings = ArchiveSettings()  # the managed Orthanc's index: SQLite or PostgreSQL
    rules_dir: Path = Path("./rules")
    stable_after: float = Field(30.0, gt=0, le=86400)
    allowed_callers: list[AllowedCaller] = []  # empty: accept any calling AE (logged loudly)
    destinations: dict[str, DimseDestination] = {}
    store_originals_in_orthanc: bool = True
    min_free_disk_mb: int = Field(1024, ge=0)
    workers: int = Field(1, ge=1, le=64)
    handler_timeout_s: float = Field(1800.0, gt=0)
    handler_memory_mb: int = Field(8192, ge=256)
    delivery_max_attempts: int = Field(6, ge=1, le=100)
    delivery_backoff_s: float = Field(5.0, gt=0)
    delivery_backoff_max_s: float = Field(900.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    session_idle_s: float = Field(1800.0, gt=0, le=86400)  # browser sessions end after this much inactivity
    stow_max_mb: int = Field(2048, ge=1)  # largest STOW-RS request the web gateway accepts
    audit: AuditSettings = AuditSettings()  # tamper-evident audit trail (node/audit)
    dicom_tls: DicomTls | None = None  # a second SCP port speaking DICOM over TLS
    dicom_plain_enabled: bool = True  # the plain (unencrypted) SCP port; off: TLS only
    web_tls: WebTls | None = None  # HTTPS for the web server (certificate and key, PEM)
    web_allow_plain_http: bool = False  # plain HTTP on a non-loopback web_host (e.g. behind a TLS proxy)
    spool_encryption: SpoolEncryption | None = None  # AES-256-GCM at rest for the spool (node/store)
    spool_segment_mb: int = Field(512, ge=8, le=65536)  # size of one received-instance log segment
    retention: Retention = Retention()  # delete spooled copies after delivery + a period
    sources: dict[str, PacsSource] = {}  # PACS the node pulls from (node/pacs; node/config_pacs.py)
    retrieve_max_attempts: int = Field(5, ge=1, le=100)  # a failed PACS retrieve is tried again this often
    retrieve_backoff_s: float = Field(5.0, gt=0)
    retrieve_backoff_max_s: float = Field(600.0, gt=0)
    priors_wait_s: float = Field(600.0, gt=0, le=86400)  # a job waits this long for its priors, then runs without
    executor: ExecutorSettings = ExecutorSettings()  # local worker processes, or a Celery cluster

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @model_validator(mode="after")
    def _names(self) -> "Settings":
        if "orthanc" in self.destinations:
            raise ValueError("destinations: 'orthanc' is reserved for the node's archive")
        for name in self.destinations:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
                raise ValueError(f"destinations: name {name!r} must be lowercase letters, digits, '-' or '_'")
        check_source_names(self.sources)  # a source may share a destination's name (the same PACS both ways)
        return self

    @model_validator(mode="after")
    def _dicom_ports(self) -> "Settings":
        if not self.dicom_plain_enabled and self.dicom_tls is None:
            raise ValueError("dicom_plain_enabled: false leaves no DICOM port; configure dicom_tls")
        if self.dicom_plain_enabled and self.dicom_tls is not None and self.dicom_tls.port == self.dicom_port:
            raise ValueError(f"dicom_tls.port: {self.dicom_port} is the plain dicom_port too; give it its own port")
        return self

    @model_validator(mode="after")
    def _plain_http_only_on_loopback(self) -> "Settings":
        if self.web_tls is None and not self.web_allow_plain_http and not _is_loopback(self.web_host):
            raise ValueError(f"web_allow_plain_http: web_host {self.web_host} is not loopback, so plain HTTP would "
                             "carry passwords and images over the network; configure web_tls, or set "
                             "web_allow_plain_http: true (e.g. behind a TLS-terminating proxy)")
        return self

    @model_validator(mode="after")
    def _spool_key_outside_data(self) -> "Settings":
        enc = self.spool_encryption
        if enc is not None and enc.key_file is not None and \
                enc.key_file.resolve().is_relative_to(self.data_dir.resolve()):
            raise ValueError(f"spool_encryption.key_file: {enc.key_file} is inside data_dir {self.data_dir}; a key "
                             "kept beside the data it encrypts protects nothing (a stolen disk or backup has both)")
        return self

    @model_validator(mode="after")
    def _visibility_above_timeout(self) -> "Settings":
        vt = self.executor.visibility_timeout_s
        if vt is not None and vt <= self.handler_timeout_s:
            raise ValueError(f"executor.visibility_timeout_s: {vt:g} s is not above handler_timeout_s "
                             f"({self.handler_timeout_s:g} s); the broker would hand a running job to a second worker")
        return self

    @property
    def destination_names(self) -> set[str]:
        return {"orthanc", *self.destinations}

    def takes(self, destination: str, modality: str | None) -> bool:
        """Whether ``destination`` is sent instances of ``modality`` (its ``modalities``). The archive
        and a name not configured take everything: the delivery loop reports the latter."""
        cfg = self.destinations.get(destination)
        return cfg is None or cfg.modalities is None or modality in cfg.modalities

    def result_deliveries(self, results: list[dict], destinations: list[str]) -> list[tuple[str, str]]:
        """(SOP Instance UID, destination) for each result and each of ``destinations`` that takes it."""
        return [(r["sop_instance_uid"], d) for r in results for d in destinations if self.takes(d, r["modality"])]


class ConfigError(ValueError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key written twice in one mapping. PyYAML silently keeps
    the last one, so a second ``destinations:`` drops the first block (its de-identification
    included) without a word. Also used for model cards (node.models.card)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges; keys written beside it override, as YAML intends
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} is written twice (lines {seen[key]} and {line})",
                            key_node.start_mark)
                    seen[key] = line
                except TypeError:
                    continue  # an unhashable key: SafeLoader's own error follows
        return super().construct_mapping(node, deep)


def safe_load_unique(text: str) -> Any:
    """Like ``yaml.safe_load``, but a duplicate mapping key is a yaml.YAMLError naming key and line."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


_ENV_PREFIX = "HILUM_"


def _env_values() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in Settings.model_fields.items():
        raw = os.environ.get(_ENV_PREFIX + key.upper())
        if raw is None:
            continue
        # Structured fields come as YAML/JSON in the variable; scalars as plain strings
        # (pydantic parses "true"/"false", so no string booleans leak into the code).
        out[key] = safe_load_unique(raw) if field.annotation not in (str, Path) else raw
    return out


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build validated Settings; raises ConfigError whose message names each bad field."""
    values: dict[str, Any] = {}
    if config_file:
        try:
            loaded = safe_load_unique(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file}: top level must be a mapping")
        values.update(loaded)
    values.update(_env_values())
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{loc}: {err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
