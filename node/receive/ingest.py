"""From received bytes to a durable, indexed instance.

The C-STORE path reads only the header (``stop_before_pixels``): pixel data is never decoded
on receive, and the received bytes are written exactly as they came (no transcoding).

Durability contract: Success goes back only after the file is fsync'ed, its directory entry
fsync'ed and its index row committed. Index commits are grouped: concurrent associations hand
their rows to one writer thread, which fsyncs the touched directories and commits the whole
batch in one transaction, then wakes every waiting C-STORE. One fsync'ed commit per batch
instead of one per instance, with the same guarantee.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from node.receive.spool import Spool, fsync_dirs, valid_uid, write_durable
from node.store.index import Index, InstanceRow

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
                fsync_dirs({Path(p.row.path).parent for p in batch})
                flags = self.index.add_instances([p.row for p in batch])
                for p, new in zip(batch, flags):
                    p.new = new
            except BaseException as exc:  # noqa: BLE001 - every waiter must learn of the failure
                for p in batch:
                    p.error = exc
            for p in batch:
                p.done.set()


class Ingest:
    def __init__(self, index: Index, spool: Spool) -> None:
        self.index = index
        self.spool = spool
        self.writer = IndexWriter(index)
        self._known_series: set[str] = set()

    def close(self) -> None:
        self.writer.close()

    def store(self, raw: bytes, origin: Origin) -> tuple[int, str]:
        """Persist one Part 10 byte string. Returns (DIMSE status, reason)."""
        try:
            ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
            study, series, sop = (ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
            bad = [k for k, v in (("StudyInstanceUID", study), ("SeriesInstanceUID", series),
                                  ("SOPInstanceUID", sop)) if not valid_uid(str(v) if v is not None else None)]
            if bad:
                raise ValueError(f"missing or invalid {', '.join(bad)}")
            study, series, sop = str(study), str(series), str(sop)
        except (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError, EOFError, OSError) as exc:
            return self._reject(raw, origin, f"unparseable or incomplete dataset: {exc}", CANNOT_UNDERSTAND)
        except Exception as exc:  # noqa: BLE001 - hostile input must never kill the association thread
            return self._reject(raw, origin, f"unparseable dataset ({type(exc).__name__}): {exc}", CANNOT_UNDERSTAND)

        if self.index.has_instance(sop):
            self.index.bump("duplicates")
            log.info("duplicate instance ignored", extra={"sop_uid": sop, "assoc": origin.assoc_id})
            return SUCCESS, "duplicate"

        path = self.spool.path_for(study, series, sop)
        try:
            write_durable(path, raw)
        except OSError as exc:
            log.error("cannot persist instance: %s", exc, extra={"sop_uid": sop, "assoc": origin.assoc_id})
            return OUT_OF_RESOURCES, f"cannot persist: {exc.strerror or exc}"

        try:
            hdr = header_json(ds) if series not in self._known_series else "{}"
        except Exception as exc:  # noqa: BLE001 - a header pydicom cannot express as JSON
            log.warning("header not representable as DICOM JSON: %s", exc, extra={"sop_uid": sop})
            hdr = "{}"
        row = InstanceRow(
            sop_uid=sop, series_uid=series, study_uid=study,
            sop_class_uid=_text(ds, "SOPClassUID"),
            transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else "",
            path=str(path), size=len(raw), received_at=time.time(), header_json=hdr,
            modality=_text(ds, "Modality"), series_description=_text(ds, "SeriesDescription")[:128],
            series_number=_text(ds, "SeriesNumber"), patient_id=_text(ds, "PatientID")[:64],
            patient_name=_text(ds, "PatientName")[:128], study_date=_text(ds, "StudyDate"),
            accession=_text(ds, "AccessionNumber")[:64], study_description=_text(ds, "StudyDescription")[:128],
            calling_ae=origin.calling_ae, called_ae=origin.called_ae, source_ip=origin.source_ip,
        )
        try:
            new = self.writer.submit(row)
        except Exception as exc:  # noqa: BLE001 - disk full / I/O error at commit: report, do not crash
            log.error("index commit failed: %s", exc, extra={"sop_uid": sop, "assoc": origin.assoc_id})
            try:
                path.unlink()
            except OSError:
                pass
            return OUT_OF_RESOURCES, f"cannot index: {exc}"
        self._known_series.add(series)
        if not new:  # a concurrent association stored the same instance first
            return SUCCESS, "duplicate"
        return SUCCESS, "stored"

    def _reject(self, raw: bytes, origin: Origin, reason: str, status: int) -> tuple[int, str]:
        where = self.spool.quarantine(raw, reason, {
            "calling_ae": origin.calling_ae, "source_ip": origin.source_ip, "assoc": origin.assoc_id,
            "at": time.time()})
        log.warning("instance quarantined: %s", reason,
                    extra={"assoc": origin.assoc_id, "quarantine": str(where) if where else "FAILED"})
        self.index.bump("quarantined")
        return status, reason
