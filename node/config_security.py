"""Configuration of the security features: audit trail, DICOM TLS, HTTPS, de-identification.

Kept apart from ``node.config`` (which embeds these models in ``Settings``) so the security
settings and their checks read as one piece. Files named here must exist when the settings are
loaded, so a typo is a start-up error naming the field, not a failed handshake later.
"""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")
PROFILES_DIR = Path(__file__).resolve().parent / "deid" / "profiles"


class _Strict(BaseModel):
    # NaN passes every gt/le bound (each comparison is False) and inf passes gt=0: refuse both.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _existing_file(v: Path | None) -> Path | None:
    if v is not None and not Path(v).is_file():
        raise ValueError(f"file {v} does not exist")
    return v


class AuditSettings(_Strict):
    log_file: Path | None = None  # default <data_dir>/audit/audit.jsonl
    # Default <data_dir>/keys/audit.key, created 0600. Keep it outside the data directory in
    # production: whoever can rewrite the log must not also be able to read the key.
    key_file: Path | None = None


class DicomTls(_Strict):
    """A second SCP port speaking DICOM over TLS (PS3.15 B.1/B.9)."""

    port: int = Field(ge=1, le=65535)
    cert: Path  # the node's certificate (PEM, chain allowed)
    key: Path  # its private key (PEM, unencrypted)
    ca: Path | None = None  # CA bundle that client certificates must chain to
    require_client_cert: bool = True  # mutual TLS; False: verify a client certificate only if one is sent
    bind_ae_to_cert: dict[str, str] = {}  # calling AE title -> certificate subject CN it must present

    _files = field_validator("cert", "key", "ca")(classmethod(lambda cls, v: _existing_file(v)))

    @field_validator("bind_ae_to_cert")
    @classmethod
    def _aes(cls, v: dict[str, str]) -> dict[str, str]:
        for ae, cn in v.items():
            if not AE_RE.match(ae) or "\\" in ae or not ae.strip():
                raise ValueError(f"{ae!r} is not a valid AE title")
            if not cn.strip():
                raise ValueError(f"{ae}: empty certificate CN")
        return {ae.strip(): cn.strip() for ae, cn in v.items()}

    @model_validator(mode="after")
    def _needs_ca(self) -> "DicomTls":
        if self.ca is None and (self.require_client_cert or self.bind_ae_to_cert):
            raise ValueError("ca: a client CA bundle is needed to verify client certificates "
                             "(require_client_cert or bind_ae_to_cert)")
        return self


class ClientTls(_Strict):
    """TLS for a C-STORE destination: the CA that signed the peer's certificate, and our own."""

    ca: Path
    cert: Path | None = None  # our client certificate, for peers that require one
    key: Path | None = None
    check_hostname: bool = True  # the peer certificate must name the destination's host

    _files = field_validator("ca", "cert", "key")(classmethod(lambda cls, v: _existing_file(v)))

    @model_validator(mode="after")
    def _pair(self) -> "ClientTls":
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key: give both (a client certificate needs its key) or neither")
        return self


class WebTls(_Strict):
    cert: Path
    key: Path

    _files = field_validator("cert", "key")(classmethod(lambda cls, v: _existing_file(v)))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.tsv"))


def _check_table(name: str) -> None:
    """Read a profile file as node.deid will: a bad action or tag must stop the node at start-up,
    naming the field, not only when the destinations are built (or, for tools that load the
    settings without building them, never)."""
    # Imported here: node.deid imports node.keyfile, which imports node.config, which imports us.
    from node.deid.profile import Profile, ProfileError, profile_path, read_table

    try:
        read_table(profile_path(name), Profile())
    except ProfileError as exc:
        raise ValueError(str(exc)) from None


class Deidentify(_Strict):
    """PS3.15 Annex E de-identification applied to everything a destination sends."""

    profile: str = "basic"  # a profile in node/deid/profiles, or the path of a profile file
    options: list[str] = []  # option overlays, e.g. retain-longitudinal-modified-dates, clean-descriptors
    project_key_file: Path  # per-project pseudonym key: same key at every site gives the same pseudonyms
    allow_burned_in: list[str] = []  # modalities sent even though they may carry burned-in text (e.g. SC)

    _key = field_validator("project_key_file")(classmethod(lambda cls, v: _existing_file(v)))

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str) -> str:
        if v not in profile_names() and not Path(v).is_file():
            raise ValueError(f"{v!r} is neither a built-in profile ({', '.join(profile_names())}) nor a file")
        _check_table(v)
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in profile_names() and not Path(name).is_file():
                raise ValueError(f"{name!r} is neither a built-in option ({', '.join(profile_names())}) nor a file")
            _check_table(name)
        return v

    @field_validator("allow_burned_in")
    @classmethod
    def _modalities(cls, v: list[str]) -> list[str]:
        return [m.strip().upper() for m in v]


class SpoolEncryption(_Strict):
    """AES-256-GCM for everything spooled (received instances, results, quarantine).

    Exactly one key source. ``key_file`` holds a keyring (JSON) and is the one ``hilum keys
    rotate`` can rotate; ``key_env`` (a variable's name) and ``key_command`` (argv, for a KMS/HSM
    hook printing the keyring on stdout) are rotated by whoever provides them, then applied with
    ``hilum keys rewrap``. A keyring is ``{"active": id, "keys": {id: base64 32 bytes}}`` or
    a single base64 key.
    """

    key_file: Path | None = None
    key_env: str | None = None
    key_command: list[str] | None = None
    create_key_file: bool = True  # first start: create key_file (0600) when it does not exist

    @model_validator(mode="after")
    def _one_source(self) -> "SpoolEncryption":
        given = [n for n in ("key_file", "key_env", "key_command") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(f"exactly one of key_file, key_env, key_command is needed, got {given or 'none'}")
        if self.key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.key_env):
            raise ValueError(f"key_env: {self.key_env!r} is not an environment variable name")
        return self


class Retention(_Strict):
    """How long spooled copies stay after they are safely delivered (None: kept until deleted by hand).

    An original goes when the archive has it, no job of its study is pending or running, and
    ``originals_days`` have passed since its delivery; a result goes when every destination has it
    and ``results_days`` have passed. Orthanc's own storage is not touched."""

    originals_days: float | None = Field(None, ge=0)
    results_days: float | None = Field(None, ge=0)
    check_every_s: float = Field(600.0, gt=0)
