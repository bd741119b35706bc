"""C-GET, C-MOVE and C-FIND as the requestor, on the node's own upper layer (node/receive/ul.py),
not pynetdicom's.

A C-GET receives a whole study on the association it opened: a PACS sends each instance as PDUs of
its own maximum size (Orthanc: 16 KB, 35 per 512x512 slice) and waits for the C-STORE response
before it sends the next. pynetdicom spends Python time on every PDU (a reader thread polling the
socket, a PDU object, a state-machine event, DIMSE reassembly) and builds every command set
through pydicom: with it a retrieve took 2-3x DCMTK's getscu. Here the calling thread reads the
socket itself, as the node's SCP does for a push: a PDU is a header and one read, its PDVs are
appended to one buffer, and command sets are bytes. A C-MOVE's association carries one pending
response per sub-operation while the instances reach the node's SCP in the same process: through
pynetdicom each was decoded by pydicom in a reader thread that took the GIL from the SCP's thread
(about 1 ms of CPU per instance). A C-FIND's answers are decoded once, by the caller's decoder (study
answers: node/pacs/answers.py, from the bytes; others by pydicom), and nothing is formatted for a log
nobody reads (pynetdicom formats every identifier whatever the log level).

What it does: A-ASSOCIATE-RQ with the one Q/R context (for C-GET also the storage classes, with SCP
role selection), one request, then the responses (yielded to ``DimseClient``, which decides what
they mean) until the final one, then A-RELEASE; during a C-GET, C-STOREs (each handed to
``on_store``, answered with its status). Anything malformed or unexpected aborts the association
with a ``PacsError``; pynetdicom stays the C-ECHO client and the independent peer in the tests.
"""
from __future__ import annotations

import socket
import ssl
import struct
import time
from io import BytesIO
from types import SimpleNamespace
from typing import Callable, Iterator

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from node.pacs.model import PacsError
from node.receive import ul

IMPLICIT_LE = "1.2.840.10008.1.2"
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Query/Retrieve Information Model - GET
MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"  # - MOVE
FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"  # - FIND
PENDING = (0xFF00, 0xFF01)
MAX_PDU = 16 << 20  # what we accept; a PACS sends PDUs up to min(this, its own limit)
MAX_COMMAND = 64 << 10
MAX_INSTANCE = (1 << 31) - (2 << 20)  # what the spool seals in one piece (node/store/envelope.py)
# A C-FIND answer is a few short elements: a PACS sending one larger than this is not answering, and
# it is not gathered up to MAX_INSTANCE. A C-MOVE/C-GET response's Failed SOP Instance UID List grows
# with the study (~65 bytes a UID: a moved study of 100 000 instances to a wrong destination).
MAX_IDENTIFIER = 1 << 20
MAX_FAILED_LIST = 16 << 20


class QrAssociation:
    """One association with a PACS that carries one C-GET, C-MOVE or C-FIND (``model``). ``open``
    raises ``PacsError`` (or says the A-ASSOCIATE-RJ via ``rejected``); ``get``, ``move`` and ``find``
    yield (status, identifier) per response."""

    def __init__(self, host: str, port: int, called_ae: str, calling_ae: str, timeout_s: float,
                 tls: tuple[ssl.SSLContext, str] | None, implementation: tuple[str, str]) -> None:
        self.host, self.port, self.called, self.calling = host, port, called_ae, calling_ae
        self.timeout_s, self.tls, self.implementation = timeout_s, tls, implementation
        self.sock: socket.socket | None = None
        self.reader = None
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted id -> (abstract syntax, transfer syntax)
        self.peer_max_pdu = 0
        self.is_established = False
        self.rejected = False

    # -- association --------------------------------------------------------------------------
    def open(self, storage: list[tuple[str, list[str]]], model: str = GET_MODEL) -> None:
        """Connect and associate for ``model`` (and, for C-GET, the ``storage`` classes as SCP);
        False in ``is_established`` (and ``rejected``) when the PACS said no. OSError /
        ssl.SSLError when the connection or the TLS handshake fails."""
        sock = socket.create_connection((self.host, self.port), timeout=min(self.timeout_s, 10.0))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                ctx, server_name = self.tls
                sock = ctx.wrap_socket(sock, server_hostname=server_name)
            sock.settimeout(self.timeout_s)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reader = sock.makefile("rb", buffering=256 << 10)
        proposed = [(1, model, [IMPLICIT_LE])]
        proposed += [(3 + 2 * i, uid, tss) for i, (uid, tss) in enumerate(storage)]  # odd ids, PS3.8 9.3.2.2
        by_id = {cid: (abstract, tss) for cid, abstract, tss in proposed}
        uid, version = self.implementation
        self.sock.sendall(ul.associate_rq(self.called, self.calling, proposed, MAX_PDU, uid, version,
                                          scp_roles=[u for u, _ in storage]))
        kind, body = self._read_pdu(1 << 20)
        if kind == ul.ASSOCIATE_RJ:
            self.rejected = True
            self.close()
            return
        if kind != ul.ASSOCIATE_AC:
            self.close()
            return  # an A-ABORT or anything else: not established
        results, self.peer_max_pdu = ul.parse_associate_ac(body)
        for cid, (result, ts) in results.items():
            if result == ul.PC_ACCEPT and cid in by_id and ts in by_id[cid][1]:
                self.contexts[cid] = (by_id[cid][0], ts)
        self.is_established = True
        if 1 not in self.contexts:
            self.abort()
            what = {GET_MODEL: "C-GET", MOVE_MODEL: "C-MOVE", FIND_MODEL: "C-FIND"}.get(model, model)
            raise PacsError(f"the PACS did not accept Study Root {what}")

    def release(self) -> None:
        """A-RELEASE; a peer that does not answer within the timeout is simply disconnected."""
        if not self.is_established:
            return
        self.is_established = False
        try:
            self.sock.sendall(ul.release_rq())
            while (kind := self._read_pdu()[0]) not in (ul.RELEASE_RP, ul.ABORT):
                if kind == ul.RELEASE_RQ:  # both released at once (PS3.8 7.2.2)
                    self.sock.sendall(ul.release_rp())
        except (OSError, PacsError, ul.ProtocolError):
            pass
        finally:
            self.close()

    def abort(self) -> None:
        self.is_established = False
        try:
            self.sock.sendall(ul.abort(0, 0))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        for f in (self.reader, self.sock):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass

    def _read_pdu(self, limit: int = MAX_PDU + 6) -> tuple[int, bytes]:
        try:
            head = self.reader.read(6)
            if len(head) < 6:
                raise PacsError("the PACS closed the connection")
            kind, length = head[0], struct.unpack_from(">I", head, 2)[0]
            if length > limit:
                raise ul.ProtocolError(f"a PDU of {length} bytes (the limit is {limit})")
            body = self.reader.read(length)
        except TimeoutError as exc:
            raise PacsError(f"no answer from the PACS within {self.timeout_s:g} s") from exc
        if len(body) < length:
            raise PacsError("the PACS closed the connection in the middle of a PDU")
        return kind, body

    def _send(self, cid: int, command: bytes, dataset: bytes | None = None) -> None:
        for pdu in ul.p_data(cid, True, command, self.peer_max_pdu):
            self.sock.sendall(pdu)
        if dataset is not None:
            for pdu in ul.p_data(cid, False, dataset, self.peer_max_pdu):
                self.sock.sendall(pdu)

    # -- the C-GET ----------------------------------------------------------------------------
    def get(self, identifier: Dataset, on_store: Callable[[str, str, str, list[memoryview]], int],
            message_id: int = 1, stall: tuple[float, str] = (float("inf"), "")
            ) -> Iterator[tuple[SimpleNamespace, Dataset | None]]:
        """Send the C-GET; yield (status, identifier or None) for each C-GET response, pending ones
        included, until the final one. Each C-STORE in between goes to ``on_store(sop_class,
        sop_instance, transfer_syntax, dataset)``, whose status is answered at once. ``stall``:
        (seconds, the setting's name): C-STOREs that keep coming with none stored for longer abort."""
        self._send(1, ul.request(ul.C_GET_RQ, message_id, GET_MODEL), encode(identifier, True, True))
        # The caller's stall check sees only C-GET responses, whose counts refused C-STOREs change (and a
        # PACS need send none): refused C-STOREs without end would hold the retrieve for ever.
        stored_at: float | None = None  # from the first C-STORE: a nearline PACS may take a while to start
        refused = 0
        for cmd, cid, data in self._messages():
            if cmd.field == ul.C_STORE_RQ and data is not None and cid != 1:
                stored_at = time.monotonic() if stored_at is None else stored_at
                abstract, ts = self.contexts[cid]
                if cmd.sop_class != abstract or not (0 < len(cmd.sop_instance) <= 64):
                    status = 0x0122 if cmd.sop_class != abstract else ul.CANNOT_UNDERSTAND
                else:
                    status = on_store(cmd.sop_class, cmd.sop_instance, ts, data)
                if status == 0x0000 or status >> 12 == 0xB:  # stored (a warning is stored too)
                    stored_at, refused = time.monotonic(), 0
                elif (idle := time.monotonic() - stored_at) > stall[0]:
                    self.abort()
                    raise PacsError(f"C-GET: the PACS sent {refused + 1} instance(s) in {idle:.0f} s and none could "
                                    f"be stored (not asked for, or refused); aborted ({stall[1]}: {stall[0]:g})")
                else:
                    refused += 1
                self._send(cid, ul.response(ul.C_STORE_RSP, cmd.message_id, status, cmd.sop_class, cmd.sop_instance))
            elif cmd.field == ul.C_GET_RSP and cid == 1 and cmd.status is not None:
                if cmd.message_id != message_id and cmd.message_id != 0:
                    self.abort()
                    raise PacsError(f"a C-GET response to message {cmd.message_id}, not {message_id}")
                ident = decode_identifier(b"".join(data)) if data else None
                yield _status(cmd), ident
                if cmd.status not in PENDING:
                    return
            else:
                self.abort()
                raise PacsError(f"unexpected DIMSE message 0x{cmd.field:04X} on context {cid} during C-GET")
        raise PacsError("the association ended without a final C-GET status")

    def move(self, identifier: Dataset, destination: str,
             message_id: int = 1) -> Iterator[tuple[SimpleNamespace, Dataset | None]]:
        """Send the C-MOVE; yield (status, identifier or None) for each C-MOVE response, pending ones
        included, until the final one. The instances go to ``destination``'s own association."""
        self._send(1, ul.request(ul.C_MOVE_RQ, message_id, MOVE_MODEL, move_destination=destination),
                   encode(identifier, True, True))
        yield from self._responses(ul.C_MOVE_RSP, message_id, "C-MOVE")

    def find(self, identifier: Dataset, message_id: int = 1,
             decode: Callable[[bytes], object] | None = None) -> Iterator[tuple[SimpleNamespace, object]]:
        """Send the C-FIND; yield (status, answer) per response until the final one: the answer
        decoded by ``decode`` from its bytes (implicit VR little endian), by default a pydicom Dataset,
        None if undecodable. Closing the generator early (a caller's limit) aborts the association."""
        self._send(1, ul.request(ul.C_FIND_RQ, message_id, FIND_MODEL), encode(identifier, True, True))
        yield from self._responses(ul.C_FIND_RSP, message_id, "C-FIND", decode or decode_identifier)

    def _responses(self, field: int, message_id: int, what: str,
                   decode: Callable[[bytes], object] | None = None) -> Iterator[tuple[SimpleNamespace, object]]:
        decode = decode or decode_identifier
        for cmd, cid, data in self._messages():
            if cmd.field != field or cid != 1 or cmd.status is None:
                self.abort()
                raise PacsError(f"unexpected DIMSE message 0x{cmd.field:04X} on context {cid} during {what}")
            if cmd.message_id != message_id and cmd.message_id != 0:
                self.abort()
                raise PacsError(f"a {what} response to message {cmd.message_id}, not {message_id}")
            yield _status(cmd), (decode(b"".join(data)) if data else None)
            if cmd.status not in PENDING:
                return
        raise PacsError(f"the association ended without a final {what} status")

    def _messages(self) -> Iterator[tuple[ul.Command, int, list[memoryview] | None]]:
        """(command, context id, data set or None) of each message the PACS sends, the data set as its
        fragments (joined once by the caller: growing one buffer PDV by PDV copied it over and over);
        ends when the PACS releases or aborts."""
        # Fragments: a PACS sending millions of empty or tiny PDVs reaches the size limit, not the
        # node's memory (node/receive/ul.py).
        command, dataset = bytearray(), ul.Fragments(MAX_IDENTIFIER)
        cmd: ul.Command | None = None
        cmd_cid = 0
        try:
            while True:
                kind, body = self._read_pdu()
                if kind == ul.ABORT:
                    self.is_established = False
                    self.close()
                    raise PacsError("the PACS aborted the association")
                if kind == ul.RELEASE_RQ:
                    self.sock.sendall(ul.release_rp())
                    self.is_established = False
                    self.close()
                    return
                if kind != ul.P_DATA_TF:
                    raise ul.ProtocolError(f"unexpected PDU type {kind}")
                for cid, mch, data in ul.iter_pdvs(body):
                    if cid not in self.contexts:
                        raise ul.ProtocolError(f"a PDV on presentation context {cid}, which was not accepted")
                    if mch & 1:  # a command fragment
                        if cmd is not None:
                            raise ul.ProtocolError("a command before the previous data set was complete")
                        command += data
                        if len(command) > MAX_COMMAND:
                            raise ul.ProtocolError(f"a command set over {MAX_COMMAND} bytes")
                        if mch & 2:
                            cmd, cmd_cid = ul.parse_command(bytes(command)), cid
                            command.clear()
                            # Only a C-STORE's data set is an instance; any other is an identifier.
                            dataset.limit = (MAX_INSTANCE if cmd.field == ul.C_STORE_RQ else MAX_FAILED_LIST
                                             if cmd.field in (ul.C_MOVE_RSP, ul.C_GET_RSP) else MAX_IDENTIFIER)
                            if not cmd.has_dataset:
                                yield cmd, cid, None
                                cmd = None
                    else:
                        if cmd is None or cid != cmd_cid:
                            raise ul.ProtocolError("a data set fragment without its command")
                        try:
                            dataset.add(data, bool(mch & 2))
                        except ul.ProtocolError as exc:
                            if dataset.limit == MAX_INSTANCE or dataset.size + dataset.cost <= dataset.limit:
                                raise
                            raise ul.ProtocolError(f"the data set of a 0x{cmd.field:04X} message (not a C-STORE: an "
                                                   f"identifier of a few short elements) over {dataset.limit} "
                                                   "bytes") from exc
                        if mch & 2:
                            done, dataset = dataset.take(), ul.Fragments(MAX_IDENTIFIER)
                            yield cmd, cid, done
                            cmd = None
        except ul.ProtocolError as exc:
            self.abort()
            raise PacsError(f"the PACS sent malformed DICOM: {exc}") from exc
        except OSError as exc:
            self.is_established = False
            self.close()
            raise PacsError(f"the connection to the PACS failed: {exc}") from exc


def _status(cmd: ul.Command) -> SimpleNamespace:
    """A C-GET / C-MOVE / C-FIND response as the attributes ``DimseClient._drain`` reads (pynetdicom's names)."""
    s = cmd.subops
    return SimpleNamespace(Status=cmd.status, ErrorComment=cmd.comment or None,
                           NumberOfRemainingSuboperations=s.get("remaining"),
                           NumberOfCompletedSuboperations=s.get("completed"),
                           NumberOfFailedSuboperations=s.get("failed"), NumberOfWarningSuboperations=s.get("warning"))


def decode_identifier(data: bytes) -> Dataset | None:
    """The identifier of a response (a C-FIND answer; a C-GET / C-MOVE's Failed SOP Instance UID
    List), or None if undecodable."""
    try:
        return decode(BytesIO(data), True, True)
    except Exception:  # noqa: BLE001 - a malformed identifier: the counts still say what failed
        return None
