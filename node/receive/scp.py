"""The DICOM SCP: C-ECHO and C-STORE for every storage SOP class (pynetdicom).

Association policy (calling-AE allow-list with optional source host, free-disk watermark) is
enforced during negotiation, so a refused peer gets a proper A-ASSOCIATE-RJ with a reason,
not a dropped connection. pynetdicom has no hook for custom rejection; the documented
EVT_CONN_OPEN event fires before negotiation, and there we give the association a policy-aware
ACSE. That is the one place Hilum reaches into pynetdicom.
"""
from __future__ import annotations

import logging
import shutil
import socket
import threading
import uuid

from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from node.audit import NULL_AUDIT, AuditTrail
from node.config import Settings
from node.receive.ingest import Ingest, Origin
from node.tls import binding_violation, peer_identity, server_context

log = logging.getLogger("hilum.scp")

# Stored exactly as received: uncompressed and the compressed syntaxes modalities really send.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

# A-ASSOCIATE-RJ (result, source, reason) — PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_CONGESTION = (0x02, 0x03, 0x01)  # transient, service-provider (presentation), temporary congestion


class AssociationPolicy:
    def __init__(self, settings: Settings, audit: AuditTrail = NULL_AUDIT) -> None:
        self.settings = settings
        self.audit = audit
        self.callers = [(c.ae_title, c.host) for c in settings.allowed_callers]
        self.bindings = settings.dicom_tls.bind_ae_to_cert if settings.dicom_tls else {}

    def check(self, calling_ae: str, called_ae: str, source_ip: str, tls: bool = False,
              tls_cn: str | None = None) -> tuple[tuple[int, int, int], str] | None:
        """None to accept, else (reject result/source/reason, human reason)."""
        if called_ae.strip() != self.settings.ae_title:
            return REJECT_CALLED_AE, f"called AE {called_ae.strip()!r} is not {self.settings.ae_title!r}"
        if bound := binding_violation(self.bindings, calling_ae, tls, tls_cn):
            return REJECT_CALLING_AE, bound
        if self.callers and not any(
            calling_ae.strip() == ae and (host is None or host == source_ip) for ae, host in self.callers
        ):
            return REJECT_CALLING_AE, f"calling AE {calling_ae.strip()!r} from {source_ip} is not allowed"
        free_mb = shutil.disk_usage(self.settings.data_dir).free // (1024 * 1024)
        if free_mb < self.settings.min_free_disk_mb:
            return REJECT_CONGESTION, f"free disk {free_mb} MB below watermark {self.settings.min_free_disk_mb} MB"
        return None


class _PolicyACSE(ACSE):
    def __init__(self, assoc, policy: AssociationPolicy) -> None:
        super().__init__(assoc)
        self._policy = policy

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        calling = rq.calling_ae_title
        called = rq.called_ae_title
        ip = self.assoc.requestor.address
        tls, cn = peer_identity(self.assoc)
        verdict = self._policy.check(calling, called, ip, tls, cn)
        self._policy.audit.association(calling_ae=calling, called_ae=called, source_ip=ip, accepted=verdict is None,
                                       reason=verdict[1] if verdict else None, tls=tls, tls_identity=cn)
        if verdict is None:
            super()._negotiate_as_acceptor()
            return
        (result, source, reason), why = verdict
        log.warning("association rejected: %s", why, extra={"calling_ae": calling, "source_ip": ip})
        self.requestor.ae_title = calling
        self.send_reject(result, source, reason)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


class StoreSCP:
    def __init__(self, settings: Settings, ingest: Ingest, audit: AuditTrail = NULL_AUDIT) -> None:
        self.settings = settings
        self.ingest = ingest
        self.policy = AssociationPolicy(settings, audit)
        self._server = None
        self._tls_server = None
        self._lock = threading.Lock()

        ae = AE(ae_title=settings.ae_title)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger P-DATA PDUs
        ae.maximum_associations = 32
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        ae.acse_timeout = 30
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae = ae

    def start(self) -> None:
        if not self.settings.allowed_callers:
            log.warning("SECURITY: no calling-AE allow-list configured: ANY peer may store to %s",
                        self.settings.ae_title)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, self._on_store),
        ]
        if self.settings.dicom_plain_enabled:
            self._server = self.ae.start_server(
                (self.settings.dicom_host, self.settings.dicom_port), block=False, evt_handlers=handlers
            )
            log.info("DICOM SCP %s listening on %s:%d", self.settings.ae_title, self.settings.dicom_host,
                     self.settings.dicom_port)
        if (tls := self.settings.dicom_tls) is not None:
            self._tls_server = self.ae.start_server((self.settings.dicom_host, tls.port), block=False,
                                                    evt_handlers=handlers, ssl_context=server_context(tls))
            log.info("DICOM TLS SCP %s listening on %s:%d (client certificate %s)", self.settings.ae_title,
                     self.settings.dicom_host, tls.port, "required" if tls.require_client_cert else "optional")

    def stop(self) -> None:
        """Stop accepting; let in-flight associations finish their current C-STORE."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._tls_server is not None:
            self._tls_server.shutdown()
            self._tls_server = None

    def _on_open(self, event) -> None:
        assoc = event.assoc
        try:
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            pass
        assoc.hilum_id = uuid.uuid4().hex[:12]
        assoc.acse = _PolicyACSE(assoc, self.policy)

    def _on_store(self, event) -> int:
        assoc = event.assoc
        origin = Origin(
            calling_ae=assoc.requestor.ae_title.strip(),
            called_ae=assoc.acceptor.ae_title.strip(),
            source_ip=assoc.requestor.address,
            assoc_id=getattr(assoc, "hilum_id", ""),
        )
        try:
            raw = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - a broken request must not kill the association
            log.error("cannot read C-STORE request: %s", exc, extra={"assoc": origin.assoc_id})
            return 0xC001
        status, reason = self.ingest.store(raw, origin)
        if status != 0:
            log.warning("C-STORE failed 0x%04X: %s", status, reason, extra={"assoc": origin.assoc_id})
        return status
