"""Configuration of the managed archive's index: Orthanc's SQLite (default) or PostgreSQL.

``index: postgresql`` without ``dsn``: the node runs its own PostgreSQL cluster in the data dir
(node/archive/postgres.py). With ``dsn``: an external PostgreSQL the site runs. Either way Orthanc
keeps the DICOM files on disk and only its index moves to PostgreSQL (the Orthanc book's advice).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator


class ArchiveSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # as every settings model

    index: Literal["sqlite", "postgresql"] = "sqlite"
    dsn: str | None = None  # postgresql://user:password@host:5432/orthanc (external PostgreSQL)

    @model_validator(mode="after")
    def _dsn(self) -> "ArchiveSettings":
        if self.dsn is not None and self.index != "postgresql":
            raise ValueError("dsn: only with index: postgresql")
        if self.dsn is not None and not self.dsn.startswith(("postgresql://", "postgres://")):
            raise ValueError("dsn: must be a postgresql:// URI")
        return self
