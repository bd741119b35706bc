"""The DICOM SCP: C-ECHO and C-STORE for every storage SOP class.

Its own acceptor (node/receive/ul.py for the bytes), not pynetdicom's: pynetdicom's per-PDU
event machinery, polling reactors and pydicom-built command sets cost several milliseconds per
instance, more than the durable write itself. Here one thread per association reads PDUs,
reassembles the data set into one buffer, hands it with a Part 10 header to ``Ingest.store``
and answers with a command set built from bytes. pynetdicom stays the SCU (destinations) and
the independent peer in the tests, with DCMTK.

Association policy (called AE, calling-AE allow-list with optional source host, AE bound to a
TLS client certificate, free-disk watermark, association limit) is decided on the A-ASSOCIATE-RQ,
so a refused peer gets a proper A-ASSOCIATE-RJ with a reason, not a dropped connection.
"""
from __future__ import annotations

import logging
import shutil
import socket
import ssl
import struct
import threading
import time
import uuid

from pynetdicom.presentation import AllStoragePresentationContexts

from node import __version__
from node.audit import NULL_AUDIT, AuditTrail
from node.config import Settings
from node.receive import ul
from node.receive.batch import StoreThread
from node.receive.ingest import Ingest, Origin
from node.tls import binding_violation, peer_identity, server_context
from node.uids import derived_uid

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
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit exceeded

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
IMPLEMENTATION_UID = derived_uid("hilum", "implementation-class")
IMPLEMENTATION_VERSION = f"HILUM_{__version__}"[:16]
MAX_ASSOCIATIONS = 32
MAX_CONNECTIONS = 2 * MAX_ASSOCIATIONS  # beyond this a connection is closed before a byte is read
NETWORK_TIMEOUT_S = 60.0  # silence from the peer in the middle of an association
ACSE_TIMEOUT_S = 30.0  # from connect to the A-ASSOCIATE-RQ
MAX_PDU = 16 << 20  # advertised in the A-ASSOCIATE-AC and enforced
MAX_RQ_PDU = 64 << 10  # an A-ASSOCIATE-RQ is a few hundred bytes to a few KiB
MAX_COMMAND = 64 << 10
MAX_INSTANCE = (1 << 31) - (2 << 20)  # what the spool seals in one piece (node/store/envelope.py)


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


class _Aborted(Exception):
    """The association ends now (peer abort, protocol error, timeout, node stopping)."""


class StoreSCP:
    def __init__(self, settings: Settings, ingest: Ingest, audit: AuditTrail = NULL_AUDIT) -> None:
        self.settings = settings
        self.ingest = ingest
        self.audit = audit
        self.policy = AssociationPolicy(settings, audit)
        self.transfer_syntaxes = frozenset(TRANSFER_SYNTAXES)
        self._listeners: list[socket.socket] = []
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_ASSOCIATIONS)
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._sockets: dict[threading.Thread, socket.socket] = {}

    # -- listening -------------------------------------------------------------------------
    def start(self) -> None:
        if not self.settings.allowed_callers:
            log.warning("SECURITY: no calling-AE allow-list configured: ANY peer may store to %s",
                        self.settings.ae_title)
        if self.settings.dicom_plain_enabled:
            self._listen(self.settings.dicom_port, None)
            log.info("DICOM SCP %s listening on %s:%d", self.settings.ae_title, self.settings.dicom_host,
                     self.settings.dicom_port)
        if (tls := self.settings.dicom_tls) is not None:
            self._listen(tls.port, server_context(tls))
            log.info("DICOM TLS SCP %s listening on %s:%d (client certificate %s)", self.settings.ae_title,
                     self.settings.dicom_host, tls.port, "required" if tls.require_client_cert else "optional")

    def _listen(self, port: int, ctx: ssl.SSLContext | None) -> None:
        srv = socket.create_server((self.settings.dicom_host, port), reuse_port=False, backlog=64)
        self._listeners.append(srv)
        threading.Thread(target=self._accept_loop, args=(srv, ctx), name=f"dicom-accept-{port}", daemon=True).start()

    def _accept_loop(self, srv: socket.socket, ctx: ssl.SSLContext | None) -> None:
        while not self._stopping.is_set():
            try:
                sock, addr = srv.accept()
            except OSError:
                return  # closed by stop()
            if not self._connections.acquire(blocking=False):
                log.warning("connection from %s closed: %d connections open already", addr[0], MAX_CONNECTIONS)
                sock.close()
                continue
            t = threading.Thread(target=self._serve, args=(sock, addr[0], ctx), name="dicom-assoc", daemon=True)
            with self._lock:
                self._threads.add(t)
                self._sockets[t] = sock
            t.start()

    def stop(self, wait_s: float = 30.0) -> None:
        """Stop accepting; an association finishes the C-STORE it is in, then is aborted. One that
        is idle (waiting for its peer) has its connection shut down."""
        self._stopping.set()
        for srv in self._listeners:
            srv.close()
        self._listeners.clear()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + wait_s
        for t in threads:
            t.join(max(0.0, min(1.0, deadline - time.monotonic())))
        with self._lock:
            idle = [s for t, s in self._sockets.items() if t.is_alive()]
        for sock in idle:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- one association -------------------------------------------------------------------
    def _serve(self, sock: socket.socket, ip: str, ctx: ssl.SSLContext | None) -> None:
        assoc_id = uuid.uuid4().hex[:12]
        has_slot = self._slots.acquire(blocking=False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(ACSE_TIMEOUT_S)
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_side=True)
                sock.do_handshake()  # the node's context defers it to this thread (node/tls)
            _Association(self, sock, ip, assoc_id, has_slot).run()
        except (OSError, ssl.SSLError, _Aborted, ul.ProtocolError) as exc:
            log.info("association ended: %s", exc or type(exc).__name__, extra={"assoc": assoc_id, "source_ip": ip})
        except Exception:  # noqa: BLE001 - nothing a peer sends may take the receiver down
            log.exception("association failed", extra={"assoc": assoc_id, "source_ip": ip})
        finally:
            if has_slot:
                self._slots.release()
            try:
                sock.close()
            except OSError:
                pass
            self._connections.release()
            with self._lock:
                self._threads.discard(threading.current_thread())
                self._sockets.pop(threading.current_thread(), None)


class _Association:
    def __init__(self, scp: StoreSCP, sock: socket.socket, ip: str, assoc_id: str, has_slot: bool) -> None:
        self.scp = scp
        self.sock = sock
        self.ip = ip
        self.assoc_id = assoc_id
        self.has_slot = has_slot
        self.reader = sock.makefile("rb", buffering=256 << 10)
        self.peer_max_pdu = 0
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted id → (abstract syntax, transfer syntax)
        self.origin: Origin | None = None
        # Stores the node's own C-MOVE sub-operations while this thread reads the next one (started
        # at the first; drained and stopped when the association ends, whichever way).
        self.later: StoreThread | None = None

    def _read_pdu(self, limit: int = MAX_PDU + 6) -> tuple[int, bytes]:
        head = self.reader.read(6)
        if len(head) < 6:
            raise _Aborted("connection closed by the peer")
        kind, length = head[0], struct.unpack_from(">I", head, 2)[0]
        if length > limit:
            self._abort(f"PDU of {length} bytes (the limit is {limit})")
        body = self.reader.read(length)
        if len(body) < length:
            raise _Aborted("connection closed in the middle of a PDU")
        return kind, body

    def _abort(self, why: str) -> None:
        try:
            self.sock.sendall(ul.abort())
        except OSError:
            pass
        self._linger()
        raise _Aborted(why)

    def _linger(self, artim_s: float = 5.0) -> None:
        """Let the peer close first (PS3.8 ARTIM): closing at once could reset the connection and
        destroy the last PDU (an RJ, an RP, an A-ABORT) before the peer has read it."""
        try:
            self.sock.settimeout(artim_s)
            if not isinstance(self.sock, ssl.SSLSocket):
                self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv(65536):
                pass
        except (OSError, ValueError):
            pass

    def run(self) -> None:
        kind, body = self._read_pdu(MAX_RQ_PDU)
        if kind != ul.ASSOCIATE_RQ:
            self._abort(f"expected A-ASSOCIATE-RQ, got PDU type {kind}")
        try:
            rq = ul.parse_associate_rq(body)
        except ul.ProtocolError as exc:
            self._abort(f"malformed A-ASSOCIATE-RQ: {exc}")
        if not self._accept(rq):
            return
        self.sock.settimeout(NETWORK_TIMEOUT_S)
        try:
            self._messages()
        finally:
            if self.later is not None:
                self.later.close()

    def _accept(self, rq: ul.AssociateRequest) -> bool:
        tls, cn = peer_identity(self.sock)
        verdict = self.scp.policy.check(rq.calling_ae, rq.called_ae, self.ip, tls, cn)
        if verdict is None and not self.has_slot:
            verdict = REJECT_LIMIT, f"more than {MAX_ASSOCIATIONS} associations at once"
        self.scp.audit.association(calling_ae=rq.calling_ae, called_ae=rq.called_ae, source_ip=self.ip,
                                   accepted=verdict is None, reason=verdict[1] if verdict else None, tls=tls,
                                   tls_identity=cn)
        if verdict is not None:
            (result, source, reason), why = verdict
            log.warning("association rejected: %s", why, extra={"calling_ae": rq.calling_ae, "source_ip": self.ip})
            self.sock.sendall(ul.associate_rj(result, source, reason))
            self._linger()
            return False
        results = []
        for cid, abstract, tss in rq.contexts:
            if abstract != VERIFICATION and abstract not in STORAGE_CLASSES:
                results.append((cid, ul.PC_ABSTRACT_REJECTED, ""))
                continue
            ts = next((t for t in tss if t in self.scp.transfer_syntaxes), None)
            if ts is None:
                results.append((cid, ul.PC_TS_REJECTED, ""))
                continue
            results.append((cid, ul.PC_ACCEPT, ts))
            self.contexts[cid] = (abstract, ts)
        self.peer_max_pdu = rq.max_pdu
        self.origin = Origin(calling_ae=rq.calling_ae, called_ae=rq.called_ae, source_ip=self.ip,
                             assoc_id=self.assoc_id)
        self.sock.sendall(ul.associate_ac(rq, results, MAX_PDU, IMPLEMENTATION_UID, IMPLEMENTATION_VERSION))
        return True

    def _messages(self) -> None:
        command = bytearray()
        # The data set's fragments as they came (views into the PDUs read), joined once with the Part 10
        # header: growing one buffer PDV by PDV reallocated and copied it over and over (about a third
        # of this thread's time per 512x512 slice), and the header was then prepended with a copy more.
        dataset: list[memoryview] = []
        size = 0
        cmd: ul.Command | None = None
        cmd_context = 0
        while True:
            if self.scp._stopping.is_set() and cmd is None and not command:
                self._abort("the node is stopping")
            kind, body = self._read_pdu()
            if kind == ul.RELEASE_RQ:
                self.sock.sendall(ul.release_rp())
                self._linger()
                return
            if kind == ul.ABORT:
                raise _Aborted("aborted by the peer")
            if kind != ul.P_DATA_TF:
                self._abort(f"unexpected PDU type {kind}")
            for cid, mch, data in ul.pdvs(body):
                if cid not in self.contexts:
                    self._abort(f"PDV on presentation context {cid}, which was not accepted")
                if mch & 1:  # command fragment
                    if cmd is not None:
                        self._abort("a command arrived before the previous data set was complete")
                    command += data
                    if len(command) > MAX_COMMAND:
                        self._abort(f"a command set over {MAX_COMMAND} bytes")
                    if mch & 2:
                        try:
                            cmd = ul.parse_command(bytes(command))
                        except ul.ProtocolError as exc:
                            self._abort(f"malformed command: {exc}")
                        command.clear()
                        cmd_context = cid
                        if not cmd.has_dataset:
                            self._dispatch(cmd, cid, None, 0)
                            cmd = None
                else:  # data set fragment
                    if cmd is None or cid != cmd_context:
                        self._abort("a data set fragment without its command")
                    dataset.append(ul.keepable(data))
                    size += len(data)
                    if size > MAX_INSTANCE:
                        self._abort(f"a data set over {MAX_INSTANCE} bytes")
                    if mch & 2:
                        self._dispatch(cmd, cid, dataset, size)
                        dataset, size = [], 0
                        cmd = None

    def _dispatch(self, cmd: ul.Command, cid: int, dataset: list[memoryview] | None, size: int) -> None:
        abstract, ts = self.contexts[cid]
        if cmd.field == ul.C_ECHO_RQ:
            rsp = ul.response(ul.C_ECHO_RSP, cmd.message_id, 0x0000, cmd.sop_class or abstract)
        elif cmd.field == ul.C_STORE_RQ and dataset is not None:
            if abstract == VERIFICATION or cmd.sop_class != abstract:
                status, reason = 0x0122, f"SOP class {cmd.sop_class[:40]} not negotiated on this context"
            elif not (0 < len(cmd.sop_instance) <= 64 and 0 < len(cmd.sop_class) <= 64):
                status, reason = ul.CANNOT_UNDERSTAND, "invalid UID in the command"
            elif (batch := self._retrieve_batch(cmd)) is not None:
                # A sub-operation of one of the node's own C-MOVE retrieves: answered now, stored in
                # the association's store thread while this one reads the next, durable when the
                # retrieve commits its batch
                # (node/receive/batch.py); a failure is reported by the retrieve, not to the PACS.
                try:
                    self._respond(cid, ul.response(ul.C_STORE_RSP, cmd.message_id, 0x0000, cmd.sop_class,
                                                   cmd.sop_instance))
                except BaseException:
                    batch.end("", 0x0000, "")  # never answered: the PACS counts it as failed itself
                    raise
                if self.later is None:
                    self.later = StoreThread()
                # Joined in the store thread too: this one goes back to reading the next instance.
                self.later.put(size, cmd.sop_instance, batch,
                               lambda: self._store(self._part10(cmd, ts, dataset), batch))
                return
            else:
                status, reason = self._store(self._part10(cmd, ts, dataset), None)
            rsp = ul.response(ul.C_STORE_RSP, cmd.message_id, status, cmd.sop_class, cmd.sop_instance,
                              comment=reason if status else "")
        else:
            # 0x0211: unrecognised operation (PS3.7 C.5.4)
            rsp = ul.response(cmd.field | 0x8000, cmd.message_id, 0x0211, cmd.sop_class or abstract)
        self._respond(cid, rsp)

    def _respond(self, cid: int, rsp: bytes) -> None:
        for pdu in ul.p_data(cid, True, rsp, self.peer_max_pdu):
            self.sock.sendall(pdu)

    def _retrieve_batch(self, cmd: ul.Command):
        """The batch of the node's own retrieve this C-STORE belongs to (its Move Originator names
        it), with a store begun in it; None for anything else, which is stored before it is answered."""
        if cmd.move_originator is None:
            return None
        batch = self.scp.ingest.move_batch(*cmd.move_originator)
        return batch if batch is not None and batch.begin() else None

    def _part10(self, cmd: ul.Command, ts: str, dataset: list[memoryview]) -> bytes:
        return b"".join((ul.part10_header(cmd.sop_class, cmd.sop_instance, ts, self.origin.calling_ae,
                                          IMPLEMENTATION_UID, IMPLEMENTATION_VERSION), *dataset))

    def _store(self, raw: bytes, batch) -> tuple[int, str]:
        status, reason = self.scp.ingest.store(raw, self.origin, batch)
        if status != 0:
            log.warning("C-STORE failed 0x%04X: %s", status, reason, extra={"assoc": self.assoc_id})
        return status, reason
