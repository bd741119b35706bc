"""What every encoder needs besides the result: where it goes and where it came from."""
from __future__ import annotations

import datetime as _dt
import socket
from dataclasses import dataclass, field

from node import __version__
from node.uids import derived_uid

# The node that wrote the object (Enhanced General Equipment needs a Device Serial Number): its host.
NODE_DEVICE_SERIAL = (socket.gethostname() or "hilum")[:64]


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
    # The one time every object of the job carries (creation, content, series dates): the job's own
    # creation time, so the same job encoded twice - again, or on another worker - gives the same bytes.
    created: _dt.datetime = field(default_factory=_dt.datetime.now)
    # The node's device serial, also when a remote worker encodes: the objects name the node that
    # answers for them, and a job's bytes do not depend on which host ran it.
    device_serial: str = NODE_DEVICE_SERIAL
    # The job's views of its source headers (common.header_views), made once and shared by its
    # encoders: what one SEG decoded of 300 headers, the next need not decode again.
    header_views: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    # A label map's pixel counts per value and slice (common.pixels_per_slice), counted once per job:
    # the report's key slices and each SEG's present segments read the same counts.
    label_counts: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def date(self) -> str:
        """``created`` as a DICOM DA value."""
        return self.created.strftime("%Y%m%d")

    @property
    def time(self) -> str:
        """``created`` as a DICOM TM value, to the second."""
        return self.created.strftime("%H%M%S")

    def uid(self, *purpose: object) -> str:
        """Deterministic UID for one object of this job, e.g. ctx.uid("seg", "series")."""
        return derived_uid(self.job_key, *purpose)
