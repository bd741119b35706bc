"""From received bytes to a durable, indexed instance.

The C-STORE path reads only the header (``stop_before_pixels``): pixel data is never decoded
on receive, and the received bytes are written exactly as they came (no transcoding).

Durability contract: Success goes back only after the instance is on disk — sealed and
appended to the vault's log with O_DSYNC. The log is the record of truth; the index is derived
from it. Its row is committed right after (``IndexWriter``, grouped across associations, not
fsync'ed: SQLite WAL with synchronous=NORMAL), and a row lost to a crash or a power cut is
rebuilt from the log at the next start (``recover``).

The one exception is an instance the node retrieved from a PACS (node/receive/batch.py): the PACS
keeps its copy, so it is answered at once and made durable with the rest of its retrieve by one
sync, before its row is committed and before the retrieve says done.
"""
from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import Iterator

import pydicom
import pydicom.config
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_preamble

from node.receive.batch import RetrieveBatch
from node.receive.header import WANTED, read_header, read_inflated
from node.receive.spool import Quarantine, valid_uid
from node.store.index import Index, InstanceRow
from node.store.vault import Vault

log = logging.getLogger("hilum.ingest")

# DIMSE C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

MAX_INSTANCE = (1 << 31) - (2 << 20)  # what the spool seals in one piece (node/store/envelope.py)
# A deflated data set is inflated (once, bounded) before anything reads it: pydicom would inflate it
# whole in one call, and a few hundred KiB of deflate can hold gigabytes of zeros.
MAX_INFLATED = MAX_INSTANCE
DEFLATED = "1.2.840.10008.1.2.1.99"


class InflatedTooLarge(ValueError):
    """A deflated data set that inflates to more than the node keeps."""


def inflate(raw: bytes, limit: int | None = None) -> bytes | None:
    """The data set of a Part 10 instance in the deflated transfer syntax, inflated; None for any other
    syntax. ``InflatedTooLarge`` past ``limit`` (default MAX_INFLATED) bytes; ``ValueError`` if the
    deflate stream is corrupt or cut short. A bomb costs the time to inflate up to ``limit``, never the
    memory: what is kept is bounded by _INFLATE_KEEP until the whole size is known to be within
    ``limit`` (then a second pass keeps it all). Read the result with ``header.read_inflated`` or
    ``read_dataset`` (explicit VR little endian), never the raw bytes with pydicom."""
    limit = MAX_INFLATED if limit is None else limit
    fp = BytesIO(raw)
    read_preamble(fp, False)  # what pydicom.dcmread reads first, so that both see the same syntax
    meta = _read_file_meta_info(fp)
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return None
    deflated = memoryview(raw)[fp.tell():]
    chunks = _inflate_pass(deflated, limit, min(limit, _INFLATE_KEEP))
    if chunks is None:  # more than the first pass keeps, and known now to be within the limit
        chunks = _inflate_pass(deflated, limit, limit)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_INFLATE_CHUNK = 16 << 20
_INFLATE_KEEP = 64 << 20


def _inflate_pass(deflated: memoryview, limit: int, keep: int) -> list[bytes] | None:
    """The inflated data in chunks; None (with the size checked) once it is more than ``keep`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    chunks: list[bytes] | None = []
    total, data = 0, deflated
    while True:
        try:
            out = inflater.decompress(data, min(_INFLATE_CHUNK, limit + 1 - total))
        except zlib.error as exc:
            raise ValueError(f"corrupt deflated data set: {exc}") from None
        total += len(out)
        if total > limit:
            raise InflatedTooLarge(f"inflated size over {limit / (1 << 20):g} MB")
        if chunks is not None:
            if total > keep:
                chunks = None
            else:
                chunks.append(out)
        if inflater.eof:
            return chunks
        if not out:
            raise ValueError("deflated data set cut short")
        data, out = inflater.unconsumed_tail, None


def _read_inflated(data: bytes) -> pydicom.Dataset:
    return read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True, stop_when=_at_pixel_data)


def read_header_dataset(raw: bytes, limit: int | None = None) -> pydicom.Dataset:
    """The header (everything before the pixel data) of a Part 10 instance as a pydicom Dataset, a
    deflated one inflated within ``limit`` (``inflate``; pydicom would inflate it whole). For data that
    did not come through C-STORE (STOW-RS label uploads, a worker's results): pydicom's errors, or
    ``InflatedTooLarge``."""
    inflated = inflate(raw, limit)
    if inflated is not None:
        return _read_inflated(inflated)
    return pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)


@dataclass(frozen=True)
class Origin:
    """Who sent an instance; carried into the index for rules and audit."""

    calling_ae: str
    called_ae: str
    source_ip: str
    assoc_id: str = ""


def header_json(ds: pydicom.Dataset) -> str:
    """DICOM JSON of a header without bulk data: what rules and simulation read later."""
    return json.dumps(ds.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda el: ""))


def instance_facts(raw: bytes, header: tuple[str, dict[str, str]] | None = None) -> dict[str, str]:
    """The attributes the index keeps, and the transfer syntax; the three UIDs checked (they name things).
    ``InflatedTooLarge`` for a deflated instance over MAX_INFLATED (see ``_read_facts``); the C-GET
    SCU reads its sub-operations' UIDs with this too (never pydicom's unbounded inflate)."""
    return _read_facts(raw, header)[0]


def _read_facts(raw: bytes, header: tuple[str, dict[str, str]] | None = None) -> tuple[dict[str, str], bytes | None]:
    """(the attributes the index keeps and the transfer syntax, the inflated data set of a deflated
    instance or None); the three UIDs checked (they name things).

    Read from the bytes directly (node/receive/header.py) when the encoding allows, else by pydicom
    (header only: pixel data is never decoded on receive); a deflated data set is inflated first, bounded
    (``inflate``), and read from that. ``header``: ``read_header(raw)`` when the caller has it already (a
    C-GET's handler reads it to check the study), not read twice."""
    fast = header if header is not None else read_header(raw)
    inflated = None
    if fast is not None:
        ts, facts = fast
        facts["TransferSyntaxUID"] = ts
    elif (inflated := inflate(raw)) is not None:
        facts = read_inflated(inflated)
        if facts is None:
            ds = _read_inflated(inflated)
            facts = {k: _text(ds, k) for k in WANTED.values()}
        facts["TransferSyntaxUID"] = DEFLATED
    else:
        ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
        facts = {k: _text(ds, k) for k in WANTED.values()}
        facts["TransferSyntaxUID"] = str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else ""
    bad = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not valid_uid(facts.get(k))]
    if bad:
        raise ValueError(f"missing or invalid {', '.join(bad)}")
    return facts, inflated


def _header_json_of(raw: bytes, sop: str, inflated: bytes | None = None) -> str:
    """DICOM JSON of the header (the first instance of each series: what rules read later).
    ``inflated``: ``inflate(raw)``, for a deflated instance."""
    try:
        if inflated is not None:
            return header_json(_read_inflated(inflated))
        return header_json(read_header_dataset(raw))  # never pydicom's own unbounded inflate
    except Exception as exc:  # noqa: BLE001 - a header pydicom cannot express as JSON
        log.warning("header not representable as DICOM JSON: %s", exc, extra={"sop_uid": sop})
        return "{}"


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    v = ds.get(keyword, "")
    return "" if v is None else str(v)


class IndexWriter:
    """One thread that commits instance rows in batches, after their C-STORE has been answered.

    The spool log is where an instance becomes durable; its row follows within milliseconds,
    grouped with whatever else arrived meanwhile (across associations). A commit that fails is
    retried every second with its batch kept, and ``failure`` says why, so that ingest refuses
    new instances until the index works again. A row that never makes it (the process dies
    first) is rebuilt from the log by ``Ingest.recover`` at the next start.
    """

    def __init__(self, index: Index, max_batch: int = 256) -> None:
        self.index = index
        self.max_batch = max_batch
        self.failure: str | None = None
        self._q: queue.Queue[InstanceRow | None] = queue.Queue()
        self._pending: set[str] = set()
        self._held: set[str] = set()  # pending, but released only after their retrieve's sync
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def add(self, row: InstanceRow, hold: bool = False) -> bool:
        """Queue a row; False if the same instance is already waiting (a duplicate). ``hold``: count it
        as waiting (duplicates see it) but commit it only when ``release``d (its bytes are not yet synced)."""
        with self._cond:
            if row.sop_uid in self._pending:
                return False
            self._pending.add(row.sop_uid)
            if hold:
                self._held.add(row.sop_uid)
        if not hold:
            self._q.put(row)
        return True

    def release(self, rows: list[InstanceRow]) -> None:
        with self._cond:
            self._held.difference_update(r.sop_uid for r in rows)
        for row in rows:
            self._q.put(row)

    def drop(self, rows: list[InstanceRow]) -> None:
        """Held rows that will never be committed (their bytes could not be made durable)."""
        with self._cond:
            uids = {r.sop_uid for r in rows}
            self._pending -= uids
            self._held -= uids
            self._cond.notify_all()

    def pending(self, sop_uid: str) -> bool:
        with self._cond:
            return sop_uid in self._pending

    def held(self, sop_uid: str) -> bool:
        """Waiting for its retrieve's sync (its bytes may not be durable yet)."""
        with self._cond:
            return sop_uid in self._held

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued row is committed (tests, shutdown); held rows are not queued yet."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._pending) == len(self._held), timeout)

    def caught_up(self, timeout: float = 5.0) -> bool:
        """Wait until the rows queued now are committed, not those queued after: every instance
        acknowledged before the call is in the index (a study view or an admin's "complete" right
        after a sender finished counts them all). False at once while commits fail, or on timeout."""
        with self._cond:
            waiting = self._pending - self._held
            return self.failure is None and self._cond.wait_for(lambda: not waiting & self._pending, timeout)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        # The log made the instance durable already; this commit only has to survive a crash of
        # the process (WAL in the page cache does), not of the machine: recover() covers that.
        self.index.conn().execute("PRAGMA synchronous=NORMAL")
        while True:
            first = self._q.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                batch.append(nxt)
            while True:
                try:
                    self.index.add_instances(batch)
                    break
                except Exception as exc:  # noqa: BLE001 - disk full, I/O error: keep the rows, retry
                    if self.failure is None:
                        log.error("index commit failed, refusing new instances until it works: %s", exc)
                    self.failure = str(exc) or type(exc).__name__
                    time.sleep(1.0)
            if self.failure is not None:
                log.warning("index commits work again")
                self.failure = None
            with self._cond:
                self._pending.difference_update(r.sop_uid for r in batch)
                self._cond.notify_all()


class Ingest:
    def __init__(self, index: Index, vault: Vault) -> None:
        # Ingest reads a few header attributes and stores the bytes as sent: checking every value
        # against its VR here costs time per instance and would only produce warnings.
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        self.index = index
        self.vault = vault
        self.quarantine = Quarantine(vault.data_dir, vault.write_file)
        self.writer = IndexWriter(index)
        self._known_series: set[str] = set()
        # C-MOVE retrieves in flight: (calling AE of the C-MOVE, its message ID) → batch. The C-STOREs
        # of its sub-operations name both (Move Originator, PS3.7 9.1.1.1), which is how the SCP finds it.
        self._moves: dict[tuple[str, int], RetrieveBatch] = {}
        self._moves_lock = threading.Lock()

    def close(self) -> None:
        self.writer.close()

    @contextmanager
    def retrieve_batch(self, move: tuple[str, int] | None = None,
                       study_uid: str | None = None) -> Iterator[RetrieveBatch]:
        """A batch for one retrieve (``move``: the C-MOVE's calling AE and message ID, so that the SCP
        routes its sub-operations here; ``study_uid``: the study asked for, the only one stored);
        committed and closed on the way out, whatever happened."""
        batch = RetrieveBatch(study_uid)
        if move is not None:
            with self._moves_lock:
                self._moves[move] = batch
        try:
            yield batch
        finally:
            if move is not None:
                with self._moves_lock:
                    self._moves.pop(move, None)
            if not batch.wait_idle(60):
                log.error("a retrieve's instances are still being stored after 60 s: each becomes durable on its own")
            self.commit(batch, close=True)

    def move_batch(self, originator_ae: str, message_id: int) -> RetrieveBatch | None:
        with self._moves_lock:
            return self._moves.get((originator_ae.strip(), message_id))

    def commit(self, batch: RetrieveBatch, close: bool = False) -> None:
        """Sync the log once for every instance of ``batch`` so far, then let their rows be indexed.
        OSError if the sync fails: those rows are dropped (never indexed) and the retrieve must retry."""
        rows = batch.take(close)
        if not rows:
            return
        try:
            self.vault.sync()
        except OSError:
            self.writer.drop(rows)
            raise
        self.writer.release(rows)

    def store(self, raw: bytes, origin: Origin, batch: RetrieveBatch | None = None,
              header: tuple[str, dict[str, str]] | None = None, sop_uid: str | None = None) -> tuple[int, str]:
        """Persist one Part 10 byte string. Returns (DIMSE status, reason). With ``batch`` (a retrieve),
        durable at the batch's next commit rather than before returning. ``header``: what
        ``read_header(raw)`` returned, if the caller read it already. ``sop_uid``: the C-STORE
        request's Affected SOP Instance UID, which the data set's must equal (PS3.7 9.1.1)."""
        try:
            facts, inflated = _read_facts(raw, header)
        except InflatedTooLarge as exc:
            return self._reject(raw, origin, str(exc), OUT_OF_RESOURCES)
        except (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError, EOFError, OSError) as exc:
            return self._reject(raw, origin, f"unparseable or incomplete dataset: {exc}", CANNOT_UNDERSTAND)
        except Exception as exc:  # noqa: BLE001 - hostile input must never kill the association thread
            return self._reject(raw, origin, f"unparseable dataset ({type(exc).__name__}): {exc}", CANNOT_UNDERSTAND)
        sop, series = facts["SOPInstanceUID"], facts["SeriesInstanceUID"]
        if sop_uid is not None and sop != sop_uid:
            # The file meta (written from the request) and the index (from the data set) would name
            # different instances, and the sender was answered for one it did not send.
            return self._reject(raw, origin, f"the data set's SOP Instance UID {sop} is not the request's {sop_uid}",
                                CANNOT_UNDERSTAND)
        if batch is not None and batch.study_uid and facts["StudyInstanceUID"] != batch.study_uid:
            log.warning("a retrieve received an instance of another study: not stored",
                        extra={"sop_uid": sop, "assoc": origin.assoc_id})
            return CANNOT_UNDERSTAND, "instance of another study, not asked for: not stored"
        if (failure := self.writer.failure) is not None:
            return OUT_OF_RESOURCES, f"index unavailable: {failure}"[:64]

        # Pending first, then the index: the writer forgets a row only after committing it, so one of
        # the two sees an instance stored a moment ago (the other order misses a commit in between).
        pending = self.writer.pending(sop)
        try:
            state = self.index.instance_state(sop)
            if state == "purged" and not pending:
                self.index.forget_purged(sop)  # sent again after retention deleted our copy: keep it anew
        except sqlite3.Error as exc:  # disk full, locked: refused, and the peer may send it again later
            log.error("index unavailable, instance refused: %s", exc, extra={"sop_uid": sop, "assoc": origin.assoc_id})
            return OUT_OF_RESOURCES, f"index unavailable: {exc}"[:64]
        if pending and batch is None and self.writer.held(sop):
            # A push of an instance a retrieve holds, not yet synced: once answered, the sender may
            # delete its copy, and the held one would be lost if the retrieve's sync then failed. Make
            # it durable now, as the push's own store would have been.
            try:
                self.vault.sync()
            except OSError as exc:
                log.error("cannot persist instance: %s", exc, extra={"sop_uid": sop, "assoc": origin.assoc_id})
                return OUT_OF_RESOURCES, f"cannot persist: {exc.strerror or exc}"
        if pending or state == "held":
            self._bump("duplicates")
            log.info("duplicate instance ignored", extra={"sop_uid": sop, "assoc": origin.assoc_id})
            return SUCCESS, "duplicate"

        received_at = time.time()
        try:
            locator = self.vault.append(raw, {"calling_ae": origin.calling_ae, "called_ae": origin.called_ae,
                                              "source_ip": origin.source_ip, "received_at": received_at},
                                        durable=batch is None)
        except OSError as exc:
            log.error("cannot persist instance: %s", exc, extra={"sop_uid": sop, "assoc": origin.assoc_id})
            return OUT_OF_RESOURCES, f"cannot persist: {exc.strerror or exc}"

        hdr = "{}" if series in self._known_series else _header_json_of(raw, sop, inflated)
        row = self._row(facts, locator, len(raw), received_at, origin, hdr)
        if not self.writer.add(row, hold=batch is not None):
            return SUCCESS, "duplicate"  # a concurrent association stored it first; this record stays unreferenced
        self._known_series.add(series)
        if batch is not None and not batch.add(row):  # the retrieve ended meanwhile: durable on its own
            try:
                self.vault.sync()
            except OSError as exc:
                self.writer.drop([row])
                return OUT_OF_RESOURCES, f"cannot persist: {exc.strerror or exc}"
            self.writer.release([row])
        return SUCCESS, "stored"

    @staticmethod
    def _row(facts: dict[str, str], locator: str, size: int, received_at: float, origin: Origin,
             header: str) -> InstanceRow:
        f = facts.get
        return InstanceRow(
            sop_uid=f("SOPInstanceUID"), series_uid=f("SeriesInstanceUID"), study_uid=f("StudyInstanceUID"),
            sop_class_uid=f("SOPClassUID", ""), transfer_syntax=f("TransferSyntaxUID", ""),
            path=locator, size=size, received_at=received_at, header_json=header,
            modality=f("Modality", ""), series_description=f("SeriesDescription", "")[:128],
            series_number=f("SeriesNumber", ""), patient_id=f("PatientID", "")[:64],
            patient_name=f("PatientName", "")[:128], study_date=f("StudyDate", ""),
            accession=f("AccessionNumber", "")[:64], study_description=f("StudyDescription", "")[:128],
            calling_ae=origin.calling_ae, called_ae=origin.called_ae, source_ip=origin.source_ip,
        )

    def recover(self) -> int:
        """Index every record of the log that the index does not know (rows lost to a power cut
        between the log write and the index's next sync). Returns how many were indexed."""
        known = self.index.log_locators()
        rows = []
        for segment in self.vault.log.segments():
            for rec in self.vault.log.scan(segment):
                if rec.locator in known:
                    continue
                try:
                    meta, raw = self.vault.log.read(rec.locator)
                    facts, inflated = _read_facts(raw)
                except Exception as exc:  # noqa: BLE001 - one bad record must not keep the node from starting
                    log.error("spool record %s cannot be read back: %s", rec.locator, exc)
                    continue
                if self.index.has_instance(facts["SOPInstanceUID"]):
                    continue  # a duplicate the peer sent twice, or the loser of a concurrent store
                origin = Origin(str(meta.get("calling_ae", "")), str(meta.get("called_ae", "")),
                                str(meta.get("source_ip", "")), "recovered")
                rows.append(self._row(facts, rec.locator, len(raw), float(meta.get("received_at", time.time())),
                                      origin, _header_json_of(raw, facts["SOPInstanceUID"], inflated)))
        for i in range(0, len(rows), 256):
            self.index.add_instances(rows[i: i + 256])
        if rows:
            log.warning("indexed %d instance(s) found in the spool log but not in the index", len(rows))
        return len(rows)

    def _reject(self, raw: bytes, origin: Origin, reason: str, status: int) -> tuple[int, str]:
        where = self.quarantine.quarantine(raw, reason, {
            "calling_ae": origin.calling_ae, "source_ip": origin.source_ip, "assoc": origin.assoc_id,
            "at": time.time()})
        log.warning("instance quarantined: %s", reason,
                    extra={"assoc": origin.assoc_id, "quarantine": str(where) if where else "FAILED"})
        self._bump("quarantined")
        return status, reason

    def _bump(self, key: str) -> None:
        """Count, best effort: a counter the index cannot bump (disk full, locked) never fails a store."""
        try:
            self.index.bump(key)
        except sqlite3.Error as exc:
            log.warning("counter %r not bumped: %s", key, exc)
