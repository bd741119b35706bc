"""One client per configured source, whatever its protocol."""
from __future__ import annotations

from node.config import Settings
from node.config_pacs import DimseSource
from node.pacs.dimse import DimseClient
from node.pacs.web import DicomwebSourceClient

SourceClient = DimseClient | DicomwebSourceClient


def source_client(settings: Settings, name: str) -> SourceClient:
    try:
        cfg = settings.sources[name]
    except KeyError:
        known = ", ".join(sorted(settings.sources)) or "none configured"
        raise KeyError(f"no source named {name!r} (sources: {known})") from None
    if isinstance(cfg, DimseSource):
        return DimseClient(name, cfg, settings.ae_title)
    return DicomwebSourceClient(name, cfg)
