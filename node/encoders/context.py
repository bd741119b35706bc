"""What every encoder needs besides the result: where it goes and where it came from."""
from __future__ import annotations

from dataclasses import dataclass

from node import __version__
from node.uids import derived_uid


@dataclass(frozen=True)
class EncodeContext:
    job_key: str  # stable identity of the job (rule + study + handler + inputs); seeds the UIDs
    rule: str  # name of the rule that triggered the job
    handler: str
    handler_version: str
    model_name: str | None = None
    model_version: str | None = None
    series_number: int = 9000  # SeriesNumber of the first result series; modality series rarely reach it
    manufacturer: str = "Hilum"
    software_version: str = __version__

    def uid(self, *purpose: object) -> str:
        """Deterministic UID for one object of this job, e.g. ctx.uid("seg", "series")."""
        return derived_uid(self.job_key, *purpose)
