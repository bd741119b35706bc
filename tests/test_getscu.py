"""The node's own C-GET requestor (node/pacs/qrscu.py) against a PACS that misbehaves at the byte
level: a scripted peer on a raw socket (no DICOM toolkit would send these bytes), so that each way a
PACS can go wrong ends in a clear PacsError, never a hang or a crash, and what arrived before is
kept. Interoperability with real peers (Orthanc, DCMTK dcmqrscp, pynetdicom; over TLS) is tested in
test_pacs.py, test_pacs_sync.py and test_retrieve_batch.py."""
from __future__ import annotations

import socket
import struct
import threading
from io import BytesIO

import pytest

from node.config import load_settings
from node.pacs.sources import source_client
from node.pacs.model import NotRetryable, PacsError
from node.receive import ul
from tests.pacs_peers import tiny_study

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _el(elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0, elem, len(value)) + value


def _command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _el(0x0000, struct.pack("<I", len(body))) + body


def _us(v: int) -> bytes:
    return struct.pack("<H", v)


class ScriptedPacs:
    """Accepts one association and plays ``script(peer)``; records what the requestor sent."""

    def __init__(self, script) -> None:
        self.script = script
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.rq: ul.AssociateRequest | None = None
        self.rq_body = b""
        self.received: list[tuple[int, bytes]] = []  # PDUs after the association request
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.sock, _ = self.srv.accept()
            self.sock.settimeout(10)
            self.reader = self.sock.makefile("rb")
            kind, self.rq_body = self.read()
            self.rq = ul.parse_associate_rq(self.rq_body)
            self.script(self)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.srv.close()

    def read(self) -> tuple[int, bytes]:
        head = self.reader.read(6)
        if len(head) < 6:
            return 0, b""
        body = self.reader.read(struct.unpack_from(">I", head, 2)[0])
        return head[0], body

    def accept(self) -> dict[str, int]:
        """Accept every proposed context with its first transfer syntax; {abstract syntax: context id}."""
        results = [(cid, ul.PC_ACCEPT, tss[0]) for cid, _a, tss in self.rq.contexts]
        self.sock.sendall(ul.associate_ac(self.rq, results, 16384, "1.2.3.4", "SCRIPTED"))
        return {a: cid for cid, a, _t in self.rq.contexts}

    def read_message(self) -> tuple[ul.Command, bytes]:
        """The requestor's next command and its data set (C-GET request, C-STORE response)."""
        command, data = b"", b""
        cmd = None
        while True:
            kind, body = self.read()
            self.received.append((kind, body))
            assert kind == ul.P_DATA_TF, kind
            for _cid, mch, part in ul.pdvs(body):
                if mch & 1:
                    command += bytes(part)
                    if mch & 2:
                        cmd = ul.parse_command(command)
                        if not cmd.has_dataset:
                            return cmd, b""
                else:
                    data += bytes(part)
                    if mch & 2:
                        return cmd, data

    def send(self, cid: int, command: bytes, dataset: bytes | None = None) -> None:
        for pdu in ul.p_data(cid, True, command, 16384):
            self.sock.sendall(pdu)
        if dataset is not None:
            for pdu in ul.p_data(cid, False, dataset, 16384):
                self.sock.sendall(pdu)

    def get_response(self, cid: int, msg_id: int, status: int, completed: int = 0, failed: int = 0,
                     remaining: int | None = None, identifier: bytes | None = None) -> None:
        els = [_el(0x0002, b"1.2.840.10008.5.1.4.1.2.2.3"), _el(0x0100, _us(ul.C_GET_RSP)), _el(0x0120, _us(msg_id)),
               _el(0x0800, _us(0x0000 if identifier else ul.NO_DATASET)), _el(0x0900, _us(status))]
        if remaining is not None:
            els.append(_el(0x1020, _us(remaining)))
        els += [_el(0x1021, _us(completed)), _el(0x1022, _us(failed)), _el(0x1023, _us(0))]
        self.send(cid, _command(*els), identifier)

    def store_rq(self, cid: int, msg_id: int, sop: str, dataset: bytes) -> None:
        self.send(cid, _command(_el(0x0002, CT.encode()), _el(0x0100, _us(ul.C_STORE_RQ)), _el(0x0110, _us(msg_id)),
                                _el(0x0700, _us(0)), _el(0x0800, _us(0)), _el(0x1000, sop.encode())), dataset)

    def close(self) -> None:
        self.thread.join(15)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def _client(port: int, timeout_s: float = 10.0) -> DimseClient:
    settings = load_settings(sources={"odd": {"ae_title": "ODD", "host": "127.0.0.1", "port": port,
                                              "retrieve": "get", "timeout_s": timeout_s}})
    return source_client(settings, "odd")


def _dataset_of(path) -> bytes:
    """The data set of a Part 10 file as a PACS sends it (explicit VR little endian, no file meta)."""
    import pydicom
    from pynetdicom.dsutils import encode

    return encode(pydicom.dcmread(path), False, True)


def test_role_selection_pending_counts_and_failed_uids_of_the_final_response(tmp_path):
    """The A-ASSOCIATE-RQ asks for the SCP role for each storage class; a C-STORE is handed over
    with its file meta written from the request; the final response's counts and Failed SOP
    Instance UID List reach the outcome; the association is released."""
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    st = tiny_study(tmp_path / "s", series=(("AX", 1.0, 2),))
    files = sorted(st.files)
    seen: dict = {}

    def script(p: ScriptedPacs) -> None:
        ids = p.accept()
        cmd, ident = p.read_message()
        seen["get"] = (cmd.field, cmd.sop_class, ul.pdvs(p.received[-1][1])[0][0])
        import pydicom
        from pynetdicom.dsutils import decode

        seen["identifier"] = decode(BytesIO(ident), True, True)
        ds = pydicom.dcmread(files[0])
        p.store_rq(ids[CT], 7, ds.SOPInstanceUID, _dataset_of(files[0]))
        rsp, _ = p.read_message()
        seen["store_rsp"] = (rsp.field, rsp.message_id, rsp.status)
        p.get_response(ids["1.2.840.10008.5.1.4.1.2.2.3"], cmd.message_id, 0xFF00, completed=1, remaining=1)
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = "1.2.3.999"
        p.get_response(ids["1.2.840.10008.5.1.4.1.2.2.3"], cmd.message_id, 0xB000, completed=1, failed=1,
                       identifier=encode(failed, True, True))
        kind, _ = p.read()
        seen["end"] = kind
        if kind == ul.RELEASE_RQ:
            p.sock.sendall(ul.release_rp())

    peer = ScriptedPacs(script)
    stored, progress = [], []

    def store(raw: bytes, header) -> tuple[int, str]:
        stored.append((raw, header))
        return 0x0000, "stored"

    try:
        out = _client(peer.port).get(st.study_uid, None, [CT], store,
                                     lambda o, r: progress.append((o.completed, r)) or True)
    finally:
        peer.close()
    assert seen["get"] == (ul.C_GET_RQ, "1.2.840.10008.5.1.4.1.2.2.3", 1)
    assert (seen["identifier"].QueryRetrieveLevel, seen["identifier"].StudyInstanceUID) == ("STUDY", st.study_uid)
    assert seen["store_rsp"] == (ul.C_STORE_RSP, 7, 0x0000) and seen["end"] == ul.RELEASE_RQ
    # SCP role selection sub-item (0x54) for the CT class: SCU role 0, SCP role 1.
    uid = CT.encode()
    assert b"\x54\x00" + struct.pack(">H", 2 + len(uid) + 2) + struct.pack(">H", len(uid)) + uid + b"\x00\x01" \
        in peer.rq_body
    [(raw, header)] = stored
    import pydicom

    ds = pydicom.dcmread(BytesIO(raw))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT and ds.file_meta.SourceApplicationEntityTitle == "ODD"
    assert ds.SOPInstanceUID == pydicom.dcmread(files[0]).SOPInstanceUID and ds.PixelData
    assert header[1]["StudyInstanceUID"] == st.study_uid
    assert progress == [(1, 1)]
    assert (out.completed, out.failed, out.failed_uids) == (1, 1, ["1.2.3.999"])


def _fails(script, timeout_s: float = 10.0) -> tuple[PacsError, ScriptedPacs, list]:
    peer = ScriptedPacs(script)
    stored: list = []
    with pytest.raises(PacsError) as exc:
        _client(peer.port, timeout_s).get("1.2.3.4", None, [CT], lambda raw, h: stored.append(raw) or (0, "ok"),
                                          lambda o, r: True)
    peer.close()
    return exc.value, peer, stored


def test_a_rejected_association_says_so_and_stays_retryable():
    err, _, _ = _fails(lambda p: p.sock.sendall(ul.associate_rj(1, 1, 3)))
    assert not isinstance(err, NotRetryable)
    assert "association with ODD@127.0.0.1" in str(err) and "rejected by the PACS" in str(err)


def test_malformed_bytes_from_the_pacs_abort_the_association_with_a_clear_error():
    def script(p: ScriptedPacs) -> None:
        p.accept()
        p.read_message()
        p.sock.sendall(struct.pack(">BBI", ul.P_DATA_TF, 0, 10) + struct.pack(">I", 99) + b"\x01\x03xxxx")  # PDV too long
        p.aborted = p.read()[0] == ul.ABORT

    err, peer, stored = _fails(script)
    assert "malformed DICOM" in str(err) and "PDV length" in str(err) and peer.aborted and stored == []


def test_an_abort_in_the_middle_keeps_what_arrived_and_is_retryable(tmp_path):
    st = tiny_study(tmp_path / "s", series=(("AX", 1.0, 1),))
    f = st.files[0]

    def script(p: ScriptedPacs) -> None:
        ids = p.accept()
        p.read_message()
        import pydicom

        p.store_rq(ids[CT], 1, pydicom.dcmread(f).SOPInstanceUID, _dataset_of(f))
        p.read_message()
        p.sock.sendall(ul.abort(2, 0))

    peer = ScriptedPacs(script)
    stored: list = []
    with pytest.raises(PacsError) as exc:
        _client(peer.port).get(st.study_uid, None, [CT], lambda raw, h: stored.append(raw) or (0, "ok"),
                               lambda o, r: True)
    peer.close()
    assert "the PACS aborted the association" in str(exc.value) and not isinstance(exc.value, NotRetryable)
    assert len(stored) == 1


def test_a_silent_pacs_times_out_and_a_closed_port_cannot_connect():
    def script(p: ScriptedPacs) -> None:
        p.accept()
        p.read_message()
        p.read()  # says nothing until the requestor gives up (its abort, or the connection closing)

    err, _, _ = _fails(script, timeout_s=1.0)
    assert "no answer from the PACS within 1 s" in str(err)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(PacsError, match=f"cannot connect to [A-Z]+@127.0.0.1:{port}: .*is the PACS up"):
        _client(port).get("1.2.3", None, [CT], lambda raw, h: (0, "ok"), lambda o, r: True)


def test_a_pacs_not_accepting_c_get_or_sending_an_unexpected_message():
    def refuses_get(p: ScriptedPacs) -> None:
        results = [(cid, ul.PC_ABSTRACT_REJECTED if a.endswith(".2.2.3") else ul.PC_ACCEPT, tss[0])
                   for cid, a, tss in p.rq.contexts]
        p.sock.sendall(ul.associate_ac(p.rq, results, 16384, "1.2.3.4", "SCRIPTED"))
        p.read()

    err, _, _ = _fails(refuses_get)
    assert "did not accept Study Root C-GET" in str(err)

    def echoes(p: ScriptedPacs) -> None:
        ids = p.accept()
        p.read_message()
        p.send(ids[CT], _command(_el(0x0002, b"1.2.840.10008.1.1"), _el(0x0100, _us(ul.C_ECHO_RQ)),
                                 _el(0x0110, _us(3)), _el(0x0800, _us(ul.NO_DATASET))))
        p.aborted = p.read()[0] == ul.ABORT

    err, peer, _ = _fails(echoes)
    assert "unexpected DIMSE message 0x0030" in str(err) and peer.aborted


def _response(field: int, model: bytes, msg_id: int, status: int, data: bool = False, **subops: int) -> bytes:
    els = [_el(0x0002, model), _el(0x0100, _us(field)), _el(0x0120, _us(msg_id)),
           _el(0x0800, _us(0x0000 if data else ul.NO_DATASET)), _el(0x0900, _us(status))]
    els += [_el(elem, _us(subops[name])) for elem, name in ((0x1020, "remaining"), (0x1021, "completed"),
                                                             (0x1022, "failed"), (0x1023, "warning")) if name in subops]
    return _command(*els)


def test_c_move_names_its_destination_counts_pending_responses_and_refuses_other_messages():
    """The C-MOVE on the node's own upper layer: Move Destination in the request, the counts of each
    pending response reported, the final one's; a message that is no C-MOVE response aborts."""
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    move_model = b"1.2.840.10008.5.1.4.1.2.2.2"
    seen: dict = {}

    def moves(p: ScriptedPacs) -> None:
        ids = p.accept()
        seen["contexts"] = [a for _c, a, _t in p.rq.contexts]
        cmd, data = p.read_message()
        seen["request"] = (cmd.field, cmd.message_id, data)
        cid = ids[move_model.decode()]
        for done in (1, 2):
            p.send(cid, _response(ul.C_MOVE_RSP, move_model, cmd.message_id, 0xFF00, remaining=3 - done,
                                  completed=done, failed=0, warning=0))
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = "1.2.3.9"
        p.send(cid, _response(ul.C_MOVE_RSP, move_model, cmd.message_id, 0xB000, data=True, remaining=0,
                              completed=2, failed=1, warning=0), encode(failed, True, True))
        seen["after"] = p.read()[0]  # A-RELEASE-RQ
        p.sock.sendall(ul.release_rp())

    peer = ScriptedPacs(moves)
    reports = []
    out = _client(peer.port).move("1.2.3", None, lambda o, r: reports.append((o.completed, r)) or True, message_id=77)
    peer.close()
    assert seen["contexts"] == [move_model.decode()]  # one context: no storage classes for a C-MOVE
    field, msg_id, ident = seen["request"]
    assert (field, msg_id) == (ul.C_MOVE_RQ, 77) and b"1.2.3" in ident
    raw = next(body for kind, body in peer.received if kind == ul.P_DATA_TF)
    assert b"HILUM" in raw  # the Move Destination (the node's AE title, the default) in the command
    assert reports == [(1, 2), (2, 1)]
    assert (out.completed, out.failed, out.failed_uids) == (2, 1, ["1.2.3.9"]) and seen["after"] == ul.RELEASE_RQ

    def stores_instead(p: ScriptedPacs) -> None:
        ids = p.accept()
        p.read_message()
        p.store_rq(ids[move_model.decode()], 5, "1.2.3.4", b"\0" * 8)
        p.aborted = p.read()[0] == ul.ABORT

    peer = ScriptedPacs(stores_instead)
    with pytest.raises(PacsError, match="unexpected DIMSE message 0x0001 on context 1 during C-MOVE"):
        _client(peer.port).move("1.2.3", None, lambda o, r: True)
    peer.close()
    assert peer.aborted


def test_c_find_answers_an_undecodable_one_and_a_limit_that_aborts():
    """C-FIND answers are decoded once; one that cannot be is counted as malformed; a caller's limit
    ends the C-FIND with an A-ABORT while the PACS is still answering (no wait for the rest)."""
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    from node.pacs.model import StudyQuery

    find_model = b"1.2.840.10008.5.1.4.1.2.2.1"

    def answer(uid: str) -> bytes:
        d = Dataset()
        d.QueryRetrieveLevel, d.StudyInstanceUID, d.PatientID, d.NumberOfStudyRelatedInstances = "STUDY", uid, "P", "3"
        return encode(d, True, True)

    def finds(p: ScriptedPacs) -> None:
        ids = p.accept()
        cmd, data = p.read_message()
        p.ident = data
        cid = ids[find_model.decode()]
        for body in (answer("1.2.3.1"), b"\x08\x00\x52\x00\xff\xff\xff\x7f", answer("1.2.3.2")):  # a bad length
            p.send(cid, _response(ul.C_FIND_RSP, find_model, cmd.message_id, 0xFF00, data=True), body)
        p.send(cid, _response(ul.C_FIND_RSP, find_model, cmd.message_id, 0x0000))
        p.last = p.read()[0]
        p.sock.sendall(ul.release_rp())

    peer = ScriptedPacs(finds)
    found, bad = _client(peer.port).find_studies(StudyQuery(patient_id="P"))
    peer.close()
    assert [m.study_uid for m in found] == ["1.2.3.1", "1.2.3.2"] and bad == 1 and found[0].instances == 3
    assert b"P " in peer.ident and peer.last == ul.RELEASE_RQ

    def many(p: ScriptedPacs) -> None:
        ids = p.accept()
        cmd, _ = p.read_message()
        for i in range(50):
            p.send(ids[find_model.decode()], _response(ul.C_FIND_RSP, find_model, cmd.message_id, 0xFF00, data=True),
                   answer(f"1.2.3.{i + 1}"))
        while (kind := p.read()[0]) == ul.P_DATA_TF:
            pass
        p.last = kind

    peer = ScriptedPacs(many)
    client = _client(peer.port)
    found, _ = client.find_studies(StudyQuery(patient_id="P"), limit=5)
    peer.close()
    assert len(found) == 5 and peer.last == ul.ABORT and client.warnings == []


def test_a_failed_sop_instance_uid_list_of_a_large_study_is_read_not_called_malformed(tmp_path):
    """A C-GET of a large study refused as a whole lists every instance in its final response (~65 bytes
    a UID): 40 000 of them (1.7 MB) are the PACS's honest answer, read as the refusal it is, while a
    C-FIND answer that size is not (test_pacs_faults)."""
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    st = tiny_study(tmp_path / "s", patient_id="ODD", series=(("AX", 1.0, 1),))

    def script(p: ScriptedPacs) -> None:
        ids = p.accept()
        cmd, _ = p.read_message()
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = [f"1.2.826.0.1.3680043.10.1234.{i}.{i * 7919}" for i in range(40_000)]
        identifier = encode(failed, True, True)
        assert len(identifier) > 1 << 20  # over the C-FIND answer limit
        p.get_response(ids["1.2.840.10008.5.1.4.1.2.2.3"], cmd.message_id, 0xA702, failed=40_000,
                       identifier=identifier)
        kind, _ = p.read()
        if kind == ul.RELEASE_RQ:
            p.sock.sendall(ul.release_rp())

    peer = ScriptedPacs(script)
    try:
        with pytest.raises(PacsError) as refused:
            _client(peer.port).get(st.study_uid, None, [CT], lambda raw, header: (0x0000, "stored"),
                                   lambda o, r: True)
    finally:
        peer.close()
    assert "malformed" not in str(refused.value) and "identifier of a few short elements" not in str(refused.value)
    assert "0xA702" in str(refused.value) or "40000" in str(refused.value), refused.value
