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

import io
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
from node.receive.ingest import MAX_INSTANCE, OUT_OF_RESOURCES, Ingest, Origin
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
# Deadlines, not per-recv timeouts: a peer trickling a byte now and then must not hold a connection.
NETWORK_TIMEOUT_S = 60.0  # for the next PDU to arrive whole in an association (plus MIN_PDU_RATE below)
MIN_PDU_RATE = 32 << 10  # bytes/s: a PDU of n bytes gets n / MIN_PDU_RATE seconds more (slow links)
ACSE_TIMEOUT_S = 30.0  # from connect to the whole A-ASSOCIATE-RQ (the TLS handshake included)
MAX_PDU = 16 << 20  # advertised in the A-ASSOCIATE-AC and enforced
MAX_RQ_PDU = 64 << 10  # an A-ASSOCIATE-RQ is a few hundred bytes to a few KiB
MAX_COMMAND = 64 << 10


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


def _timed_out(ip: str, why: str) -> _Aborted:
    log.warning("closing the connection from %s: %s", ip, why, extra={"source_ip": ip})
    return _Aborted(f"timed out: {why}")


class _DeadlineIO(io.RawIOBase):
    """The socket for a BufferedReader, each recv bounded by the time left to ``deadline`` (a
    monotonic time): a socket timeout alone bounds one recv, which a peer sending a byte now and
    then never lets expire."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = 0.0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


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
            t = threading.Thread(target=self._serve, args=(sock, addr[0], ctx, time.monotonic()), name="dicom-assoc",
                                 daemon=True)
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
    def _serve(self, sock: socket.socket, ip: str, ctx: ssl.SSLContext | None, accepted_at: float) -> None:
        assoc_id = uuid.uuid4().hex[:12]
        has_slot = self._slots.acquire(blocking=False)
        acse_deadline = accepted_at + ACSE_TIMEOUT_S
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # For a handshake the timeout bounds it whole (Python >= 3.5), not each recv.
            sock.settimeout(max(acse_deadline - time.monotonic(), 0.001))
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_side=True)
                try:
                    sock.do_handshake()  # the node's context defers it to this thread (node/tls)
                except TimeoutError:
                    raise _timed_out(ip, f"no TLS handshake within {ACSE_TIMEOUT_S:g} s of connecting") from None
            _Association(self, sock, ip, assoc_id, has_slot).run(acse_deadline)
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
        self.raw = _DeadlineIO(sock)
        self.reader = io.BufferedReader(self.raw, 256 << 10)
        self.peer_max_pdu = 0
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted id → (abstract syntax, transfer syntax)
        self.origin: Origin | None = None
        # Stores the node's own C-MOVE sub-operations while this thread reads the next one (started
        # at the first; drained and stopped when the association ends, whichever way).
        self.later: StoreThread | None = None

    def _read_pdu(self, limit: int = MAX_PDU + 6, deadline: float | None = None) -> tuple[int, bytes]:
        """The next PDU, whole by ``deadline`` (default: NETWORK_TIMEOUT_S from now, plus the time its
        length allows at MIN_PDU_RATE), else the connection is closed."""
        raw = self.raw
        if deadline is None:
            raw.deadline = time.monotonic() + NETWORK_TIMEOUT_S
            what = f"no complete PDU within {NETWORK_TIMEOUT_S:g} s"
        else:
            raw.deadline = deadline
            what = f"no complete A-ASSOCIATE-RQ within {ACSE_TIMEOUT_S:g} s of connecting"
        try:
            head = self.reader.read(6)
            if len(head) < 6:
                raise _Aborted("connection closed by the peer")
            kind, length = head[0], struct.unpack_from(">I", head, 2)[0]
            if length > limit:
                self._abort(f"PDU of {length} bytes (the limit is {limit})")
            if deadline is None:
                raw.deadline += length / MIN_PDU_RATE
            body = self.reader.read(length)
        except TimeoutError:
            raise _timed_out(self.ip, what) from None
        if len(body) < length:
            raise _Aborted("connection closed in the middle of a PDU")
        return kind, body

    def _send(self, data: bytes) -> None:
        self.sock.settimeout(NETWORK_TIMEOUT_S)  # all of it (sendall), whatever a read left
        self.sock.sendall(data)

    def _abort(self, why: str, level: int = logging.WARNING) -> None:
        log.log(level, "A-ABORT to %s: %s", self.ip, why, extra={"assoc": self.assoc_id, "source_ip": self.ip})
        try:
            self._send(ul.abort())
        except OSError:
            pass
        self._linger()
        raise _Aborted(why)

    def _linger(self, artim_s: float = 5.0) -> None:
        """Let the peer close first (PS3.8 ARTIM): closing at once could reset the connection and
        destroy the last PDU (an RJ, an RP, an A-ABORT) before the peer has read it. ``artim_s`` in
        all, however the peer trickles its bytes."""
        deadline = time.monotonic() + artim_s
        try:
            if not isinstance(self.sock, ssl.SSLSocket):
                self.sock.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(65536):
                    break
        except (OSError, ValueError):
            pass

    def run(self, acse_deadline: float) -> None:
        kind, body = self._read_pdu(MAX_RQ_PDU, acse_deadline)
        if kind != ul.ASSOCIATE_RQ:
            self._abort(f"expected A-ASSOCIATE-RQ, got PDU type {kind}")
        try:
            rq = ul.parse_associate_rq(body)
        except ul.ProtocolError as exc:
            self._abort(f"malformed A-ASSOCIATE-RQ: {exc}")
        if not self._accept(rq):
            return
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
            self._send(ul.associate_rj(result, source, reason))
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
        self._send(ul.associate_ac(rq, results, MAX_PDU, IMPLEMENTATION_UID, IMPLEMENTATION_VERSION))
        return True

    def _messages(self) -> None:
        command = bytearray()
        command_cost = 0  # its bytes, and PDV_COST per fragment (a peer may send millions of tiny ones)
        # The data set's fragments as they came (views into the PDUs read, small ones copied together),
        # joined once with the Part 10 header: growing one buffer PDV by PDV reallocated and copied it over
        # and over (about a third of this thread's time per 512x512 slice), and the header was then
        # prepended with a copy more.
        dataset = ul.Fragments(MAX_INSTANCE)
        cmd: ul.Command | None = None
        cmd_context = 0
        while True:
            if self.scp._stopping.is_set() and cmd is None and not command:
                self._abort("the node is stopping", logging.INFO)
            kind, body = self._read_pdu()
            if kind == ul.RELEASE_RQ:
                self._send(ul.release_rp())
                self._linger()
                return
            if kind == ul.ABORT:
                raise _Aborted("aborted by the peer")
            if kind != ul.P_DATA_TF:
                self._abort(f"unexpected PDU type {kind}")
            for cid, mch, data in ul.iter_pdvs(body):
                if cid not in self.contexts:
                    self._abort(f"PDV on presentation context {cid}, which was not accepted")
                if mch & 1:  # command fragment
                    if cmd is not None:
                        self._abort("a command arrived before the previous data set was complete")
                    if not data and not mch & 2:
                        self._abort("an empty command PDV that is not the last fragment")
                    command += data
                    command_cost += len(data) + ul.PDV_COST
                    if command_cost > MAX_COMMAND:
                        self._abort(f"a command set over {MAX_COMMAND} bytes (with {ul.PDV_COST} bytes counted "
                                    "per PDV)")
                    if mch & 2:
                        try:
                            cmd = ul.parse_command(bytes(command))
                        except ul.ProtocolError as exc:
                            self._abort(f"malformed command: {exc}")
                        command.clear()
                        command_cost = 0
                        cmd_context = cid
                        if not cmd.has_dataset:
                            self._dispatch(cmd, cid, None, 0)
                            cmd = None
                else:  # data set fragment
                    if cmd is None or cid != cmd_context:
                        self._abort("a data set fragment without its command")
                    try:
                        dataset.add(data, mch & 2)
                    except ul.ProtocolError as exc:
                        self._abort(str(exc))
                    if mch & 2:
                        self._dispatch(cmd, cid, dataset.take(), dataset.size)
                        dataset = ul.Fragments(MAX_INSTANCE)
                        cmd = None

    def _dispatch(self, cmd: ul.Command, cid: int, dataset: list | None, size: int) -> None:
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
                               lambda: self._store(self._part10(cmd, ts, dataset), batch, cmd.sop_instance))
                return
            else:
                try:
                    status, reason = self._store(self._part10(cmd, ts, dataset), None, cmd.sop_instance)
                except Exception as exc:  # noqa: BLE001 - one instance failed: answer it, keep the association
                    log.exception("storing an instance failed", extra={"assoc": self.assoc_id,
                                                                        "sop_uid": cmd.sop_instance})
                    status, reason = OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}"
            rsp = ul.response(ul.C_STORE_RSP, cmd.message_id, status, cmd.sop_class, cmd.sop_instance,
                              comment=reason if status else "")
        else:
            # 0x0211: unrecognised operation (PS3.7 C.5.4)
            rsp = ul.response(cmd.field | 0x8000, cmd.message_id, 0x0211, cmd.sop_class or abstract)
        self._respond(cid, rsp)

    def _respond(self, cid: int, rsp: bytes) -> None:
        self.sock.settimeout(NETWORK_TIMEOUT_S)  # all of it (sendall), whatever a read left
        for pdu in ul.p_data(cid, True, rsp, self.peer_max_pdu):
            self.sock.sendall(pdu)

    def _retrieve_batch(self, cmd: ul.Command):
        """The batch of the node's own retrieve this C-STORE belongs to (its Move Originator names
        it), with a store begun in it; None for anything else, which is stored before it is answered."""
        if cmd.move_originator is None:
            return None
        batch = self.scp.ingest.move_batch(*cmd.move_originator)
        return batch if batch is not None and batch.begin() else None

    def _part10(self, cmd: ul.Command, ts: str, dataset: list) -> bytes:
        return b"".join((ul.part10_header(cmd.sop_class, cmd.sop_instance, ts, self.origin.calling_ae,
                                          IMPLEMENTATION_UID, IMPLEMENTATION_VERSION), *dataset))

    def _store(self, raw: bytes, batch, sop_uid: str) -> tuple[int, str]:
        status, reason = self.scp.ingest.store(raw, self.origin, batch, sop_uid=sop_uid)
        if status != 0:
            log.warning("C-STORE failed 0x%04X: %s", status, reason, extra={"assoc": self.assoc_id})
        return status, reason
