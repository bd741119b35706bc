"""From received bytes to a durable, indexed instance.

The C-STORE path reads only the header (``stop_before_pixels``): pixel data is never decoded
on receive, and the received bytes are written exactly as they came (no transcoding).

Durability contract: Success goes back only after the instance is on disk — sealed and
appended to the vault's log with O_DSYNC — and its index row is committed. The log is the
record of truth: the index commit is not fsync'ed (SQLite WAL, synchronous=NORMAL), because a
row lost to a power cut is rebuilt from the log at the next start (``recover``). Index commits
are grouped: concurrent associations hand their rows to one writer thread, which commits the
whole batch in one transaction, then wakes every waiting C-STORE.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
import pydicom.config
from pydicom.errors import InvalidDicomError

from node.receive.spool import Quarantine, valid_uid
from node.store.index import Index, InstanceRow
from node.store.vault import IntegrityError, Vault

log = logging.getLogger("hilum.ingest")

# DIMSE C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
DATASET_MISMATCH = 0xA900


@dataclass(frozen=True)
class Origin:
    """Who sent an instance; carried into the index for rules and audit."""

    calling_ae: str
    called_ae: str
    source_ip: str
    assoc_id: str = ""


@dataclass
class _Pending:
    row: InstanceRow
    done: threading.Event = field(default_factory=threading.Event)
    new: bool = False
    error: BaseException | None = None


def header_json(ds: pydicom.Dataset) -> str:
    """DICOM JSON of a header without bulk data: what rules and simulation read later."""
    return json.dumps(ds.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda el: ""))


def _parse(raw: bytes) -> tuple[pydicom.Dataset, tuple[str, str, str]]:
    """The header (pixel data never decoded) and the three UIDs, checked (they name things)."""
    ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
    study, series, sop = (ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    bad = [k for k, v in (("StudyInstanceUID", study), ("SeriesInstanceUID", series),
                          ("SOPInstanceUID", sop)) if not valid_uid(str(v) if v is not None else None)]
    if bad:
        raise ValueError(f"missing or invalid {', '.join(bad)}")
    return ds, (str(study), str(series), str(sop))


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    v = ds.get(keyword, "")
    return "" if v is None else str(v)


class IndexWriter:
    """One thread that commits instance rows in batches (group commit)."""

    def __init__(self, index: Index, max_batch: int = 256) -> None:
        self.index = index
        self.max_batch = max_batch
        self._q: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def submit(self, row: InstanceRow, timeout: float = 60.0) -> bool:
        p = _Pending(row)
        self._q.put(p)
        if not p.done.wait(timeout):
            raise TimeoutError("index commit did not complete")
        if p.error is not None:
            raise p.error
        return p.new

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
            try:
                flags = self.index.add_instances([p.row for p in batch])
                for p, new in zip(batch, flags):
                    p.new = new
            except BaseException as exc:  # noqa: BLE001 - every waiter must learn of the failure
                for p in batch:
                    p.error = exc
            for p in batch:
                p.done.set()


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

    def close(self) -> None:
        self.writer.close()

    def store(self, raw: bytes, origin: Origin) -> tuple[int, str]:
        """Persist one Part 10 byte string. Returns (DIMSE status, reason)."""
        try:
            ds, (study, series, sop) = _parse(raw)
        except (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError, EOFError, OSError) as exc:
            return self._reject(raw, origin, f"unparseable or incomplete dataset: {exc}", CANNOT_UNDERSTAND)
        except Exception as exc:  # noqa: BLE001 - hostile input must never kill the association thread
            return self._reject(raw, origin, f"unparseable dataset ({type(exc).__name__}): {exc}", CANNOT_UNDERSTAND)

        if self.index.has_instance(sop):
            self.index.bump("duplicates")
            log.info("duplicate instance ignored", extra={"sop_uid": sop, "assoc": origin.assoc_id})
            return SUCCESS, "duplicate"
        self.index.forget_purged(sop)  # sent again after retention deleted our copy: keep it anew

        received_at = time.time()
        try:
            locator = self.vault.append(raw, {"calling_ae": origin.calling_ae, "called_ae": origin.called_ae,
                                              "source_ip": origin.source_ip, "received_at": received_at})
        except OSError as exc:
            log.error("cannot persist instance: %s", exc, extra={"sop_uid": sop, "assoc": origin.assoc_id})
            return OUT_OF_RESOURCES, f"cannot persist: {exc.strerror or exc}"

        row = self._row(ds, locator, len(raw), received_at, origin, with_header=series not in self._known_series)
        try:
            new = self.writer.submit(row)
        except Exception as exc:  # noqa: BLE001 - disk full / I/O error at commit: report, do not crash
            # The record stays in the log unreferenced; recover() would index it at the next start,
            # which is harmless: the peer was told to send it again and a duplicate is ignored.
            log.error("index commit failed: %s", exc, extra={"sop_uid": sop, "assoc": origin.assoc_id})
            return OUT_OF_RESOURCES, f"cannot index: {exc}"
        self._known_series.add(series)
        if not new:  # a concurrent association stored the same instance first
            return SUCCESS, "duplicate"
        return SUCCESS, "stored"

    def _row(self, ds: pydicom.Dataset, locator: str, size: int, received_at: float, origin: Origin,
             with_header: bool) -> InstanceRow:
        hdr = "{}"
        if with_header:
            try:
                hdr = header_json(ds)
            except Exception as exc:  # noqa: BLE001 - a header pydicom cannot express as JSON
                log.warning("header not representable as DICOM JSON: %s", exc, extra={"sop_uid": ds.SOPInstanceUID})
        return InstanceRow(
            sop_uid=str(ds.SOPInstanceUID), series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID),
            sop_class_uid=_text(ds, "SOPClassUID"),
            transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else "",
            path=locator, size=size, received_at=received_at, header_json=hdr,
            modality=_text(ds, "Modality"), series_description=_text(ds, "SeriesDescription")[:128],
            series_number=_text(ds, "SeriesNumber"), patient_id=_text(ds, "PatientID")[:64],
            patient_name=_text(ds, "PatientName")[:128], study_date=_text(ds, "StudyDate"),
            accession=_text(ds, "AccessionNumber")[:64], study_description=_text(ds, "StudyDescription")[:128],
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
                    ds, (_, _, sop) = _parse(raw)
                except (IntegrityError, InvalidDicomError, ValueError, OSError) as exc:
                    log.error("spool record %s cannot be read back: %s", rec.locator, exc)
                    continue
                if self.index.has_instance(sop):
                    continue  # a duplicate the peer sent twice, or the loser of a concurrent store
                origin = Origin(str(meta.get("calling_ae", "")), str(meta.get("called_ae", "")),
                                str(meta.get("source_ip", "")), "recovered")
                rows.append(self._row(ds, rec.locator, len(raw), float(meta.get("received_at", time.time())),
                                      origin, with_header=True))
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
        self.index.bump("quarantined")
        return status, reason
