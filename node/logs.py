"""Structured logs: one JSON object per line, with the correlation ids a record carries
(association, study, job, SOP instance) so one study can be followed from C-STORE to delivery."""
from __future__ import annotations

import json
import logging
import sys
import time

CORRELATION = ("assoc", "study_uid", "job", "sop_uid", "calling_ae", "source_ip", "quarantine")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "t": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
        }
        for key in CORRELATION:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO: keep its warnings, not its chatter.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
