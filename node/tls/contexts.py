"""SSL contexts for DICOM over TLS, and who is at the other end.

TLS 1.2 or later only; for TLS 1.2 only forward-secret AEAD suites (ECDHE/DHE with AES-GCM or
ChaCha20-Poly1305), in line with BCP 195, which is DCMTK's default profile too. TLS 1.3 suites
are all of that kind already.

The SCP's context defers the handshake from ``accept`` to the association's own thread:
pynetdicom wraps accepted sockets in its single accept loop, where a peer that connects and
never completes the handshake would otherwise stall every other connection.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass

from node.config_security import ClientTls, DicomTls

CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!PSK:!SRP"
HANDSHAKE_TIMEOUT_S = 60.0  # also bounds a stalled TLS record, like pynetdicom's network_timeout


class _DeferredHandshakeContext(ssl.SSLContext):
    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kw):  # noqa: ARG002
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False, **kw)


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert, key, field: str) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{field}.cert/{field}.key: cannot load {cert} with {key}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca, field: str) -> None:
    try:
        ctx.load_verify_locations(str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{field}.ca: cannot load CA bundle {ca}: {exc}") from None


def server_context(cfg: DicomTls) -> ssl.SSLContext:
    ctx = _harden(_DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(ctx, cfg.cert, cfg.key, "dicom_tls")
    if cfg.ca is not None:
        _load_ca(ctx, cfg.ca, "dicom_tls")
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_tls_args(cfg: ClientTls, host: str, field: str) -> tuple[ssl.SSLContext, str]:
    """pynetdicom's ``tls_args`` for a destination: (context, server hostname)."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = cfg.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, cfg.ca, field)
    if cfg.cert is not None:
        _load_chain(ctx, cfg.cert, cfg.key, field)
    return ctx, host


def peer_identity(sock) -> tuple[bool, str | None]:
    """(over TLS?, the verified client certificate's subject CN or None) of a connection."""
    if not isinstance(sock, ssl.SSLSocket):
        return False, None
    cert = sock.getpeercert()  # only certificates that verified against the CA bundle are returned
    if not cert:
        return True, None
    subject = dict(rdn[0] for rdn in cert.get("subject", ()) if rdn)
    return True, subject.get("commonName")


def binding_violation(bindings: dict[str, str], calling_ae: str, tls: bool, cn: str | None) -> str | None:
    """Why this calling AE may not use this connection, or None. An AE bound to a certificate
    must come over TLS with that certificate; a bound certificate may only speak for its AEs."""
    ae = calling_ae.strip()
    if ae in bindings:
        if not tls:
            return f"calling AE {ae!r} is bound to a client certificate: it must use the TLS port"
        if cn != bindings[ae]:
            return f"calling AE {ae!r} needs a client certificate for {bindings[ae]!r}, got {cn!r}"
        return None
    if tls and cn is not None and cn in bindings.values():
        allowed = sorted(a for a, c in bindings.items() if c == cn)
        return f"client certificate {cn!r} may only call as {', '.join(allowed)}, not {ae!r}"
    return None


def uvicorn_tls_options(web_tls) -> dict:
    """uvicorn.Config keyword arguments for HTTPS (``web_tls``), or none for plain HTTP."""
    if web_tls is None:
        return {}
    return {"ssl_certfile": str(web_tls.cert), "ssl_keyfile": str(web_tls.key), "ssl_ciphers": CIPHERS_TLS12}


@dataclass(frozen=True)
class HandshakeProblem:
    """Why a TLS handshake failed, in words, and whether retrying can help: a certificate that does
    not verify (either way) is a setting to fix, not a transient fault, so it is ``permanent``."""

    text: str
    permanent: bool


def handshake_problem(tls_args: tuple[ssl.SSLContext, str], host: str, port: int,
                      timeout: float) -> HandshakeProblem | None:
    """Why TLS to ``host:port`` fails (the peer's certificate not trusted or not naming the host, our
    client certificate refused, no TLS at all), or None when a handshake succeeds.

    pynetdicom reports any of these as an association that was not established; a second, bare
    handshake tells the admin which setting to fix. With TLS 1.3 a refused client certificate is
    only reported after the handshake, so a short read follows it; a peer that closes there is not
    certainly refusing the certificate (it may be restarting), so that case stays retryable."""
    import socket

    ctx, server_name = tls_args
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.settimeout(min(timeout, 1.0))
            try:
                if tls.recv(1) == b"":
                    return HandshakeProblem("the peer closed the TLS connection after the handshake "
                                            "(does it accept our client certificate?)", permanent=False)
            except TimeoutError:
                return None  # the peer waits for the association request: TLS is fine
    except ssl.SSLCertVerificationError as exc:
        return HandshakeProblem(f"the peer's certificate was not accepted: {exc.verify_message} "
                                "(is tls.ca the CA that signed it?)", permanent=True)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "ALERT" in reason.upper() and ("CERTIFICATE" in reason.upper() or "UNKNOWN_CA" in reason.upper()):
            return HandshakeProblem(f"the peer refused our client certificate ({reason}): check tls.cert and "
                                    "tls.key", permanent=True)
        return HandshakeProblem(f"TLS handshake failed: {reason} (does the peer speak DICOM TLS on this port?)",
                                permanent=False)
    except OSError:
        return None  # not reachable at all: the caller's own message says so
    return None
