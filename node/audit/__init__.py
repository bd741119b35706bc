"""Tamper-evident audit trail: HMAC-chained JSON lines, verify, search, syslog export."""
from __future__ import annotations

import logging
from pathlib import Path

from node.audit.chain import ChainedLog
from node.audit.query import search
from node.audit.trail import NULL_AUDIT, AuditTrail, NullAudit
from node.audit.verify import Verdict, verify
from node.keyfile import read_key

__all__ = ["AuditTrail", "ChainedLog", "NULL_AUDIT", "NullAudit", "Verdict", "audit_paths", "open_audit",
           "open_log", "search", "verify"]

log = logging.getLogger("hilum.audit")


def audit_paths(settings) -> tuple[Path, Path]:
    """(log file, key file) from ``settings.audit``, defaults under the data directory."""
    a = settings.audit
    return (a.log_file or settings.data_dir / "audit" / "audit.jsonl",
            a.key_file or settings.data_dir / "keys" / "audit.key")


def open_log(settings, create_key: bool = False) -> ChainedLog:
    """The chained log; its key must exist unless ``create_key`` (KeyFileError names ``audit.key_file``)."""
    log_file, key_file = audit_paths(settings)
    return ChainedLog(log_file, read_key(key_file, "audit.key_file", create=create_key),
                      marker=key_file.with_name(key_file.name + ".used"))


def open_audit(settings) -> AuditTrail:
    """The node's audit trail; creates the key on first start."""
    log_file, key_file = audit_paths(settings)
    if key_file.resolve().is_relative_to(settings.data_dir.resolve()):
        log.warning("SECURITY: the audit key %s is inside the data directory; set audit.key_file to a path "
                    "outside it so that whoever can rewrite the log cannot also re-key it", key_file)
    return AuditTrail(open_log(settings, create_key=True), settings.ae_title)
