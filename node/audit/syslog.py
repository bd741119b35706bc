"""Audit entries as RFC 5424 syslog messages, over UDP (RFC 5426) or TCP (RFC 6587 octet counting).

Facility 10 (security/authorization, the one IHE ATNA uses); severity notice for successes,
warning for failures. The structured data carries the sequence number (``meta sequenceId``,
an IANA-registered SD-ID) so a collector can see gaps; the message is the entry's JSON.
"""
from __future__ import annotations

import json
import socket
from typing import Iterable

from node.audit.chain import escape_surrogates

FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE, SEVERITY_WARNING = 5, 4
APP_NAME = "hilum"
MAX_UDP = 65000


def format_rfc5424(entry: dict, hostname: str | None = None) -> bytes:
    severity = SEVERITY_NOTICE if entry.get("outcome", 0) == 0 else SEVERITY_WARNING
    pri = FACILITY_AUTHPRIV * 8 + severity
    host = (hostname or socket.gethostname() or "-")[:255].replace(" ", "_")
    msgid = str(entry.get("event", "-"))[:32] or "-"
    seq = entry.get("seq")
    sd = f'[meta sequenceId="{seq}"]' if isinstance(seq, int) else "-"
    header = f"<{pri}>1 {entry.get('time', '-')} {host} {APP_NAME} - {msgid} {sd} "
    # BOM: the message is UTF-8 (RFC 5424 6.4).
    return header.encode("ascii", "replace") + b"\xef\xbb\xbf" + escape_surrogates(json.dumps(entry, ensure_ascii=False)).encode()


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--syslog: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def send(entries: Iterable[dict], host: str, port: int, transport: str = "udp", timeout: float = 10.0) -> int:
    """Send every entry; returns how many were sent. Raises OSError when the collector is unreachable."""
    n = 0
    if transport == "tcp":
        with socket.create_connection((host, port), timeout=timeout) as s:
            for e in entries:
                msg = format_rfc5424(e)
                s.sendall(f"{len(msg)} ".encode() + msg)
                n += 1
        return n
    if transport != "udp":
        raise ValueError(f"--transport: {transport!r} is not udp or tcp")
    family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        for e in entries:
            msg = format_rfc5424(e)
            if len(msg) > MAX_UDP:
                raise ValueError(f"audit entry {e.get('seq')} is {len(msg)} bytes: too large for UDP, use --transport tcp")
            s.sendto(msg, (host, port))
            n += 1
    return n
