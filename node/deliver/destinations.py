"""Destinations: where instances go. One class per destination type, registered by config type.

Each ``send`` takes a batch of Part 10 files and returns the set of SOP Instance UIDs the peer
accepted; anything else raises or is left out, and the delivery loop retries it with backoff -
except what the returned ``Accepted`` names as refused for good (a DICOM peer that rejects the
presentation context of an item's SOP class: a configuration fact, which no retry changes).
"""
from __future__ import annotations

import hashlib
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable, ClassVar

import httpx
import pydicom
from pydicom.uid import UID
from pynetdicom import AE, build_context
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from node.archive.orthanc import ArchiveEndpoint
from node.config import DimseDestination
from node.deid import deidentify_batch, from_config
from node.tls import client_tls_args

log = logging.getLogger("hilum.deliver")


def _read_file(locator: str) -> bytes:
    return Path(locator).read_bytes()


@dataclass(frozen=True)
class Item:
    """One instance to send: its locator in the spool (or a plain file) and how to read it."""

    sop_uid: str
    locator: str
    kind: str  # result | original
    read_bytes: Callable[[str], bytes] = _read_file  # the vault's verified read, in the node

    def data(self) -> bytes:
        return self.read_bytes(self.locator)

    def dataset(self) -> pydicom.Dataset:
        return pydicom.dcmread(BytesIO(self.data()))


class DeliveryError(Exception):
    pass


class Accepted(set):
    """What ``send`` returns: the SOP Instance UIDs the peer accepted, and in ``refused`` those it
    will never accept (SOP Instance UID -> why), which the loop fails at once instead of retrying.
    Of the rest (retried), ``failed`` says why for those the peer answered with a failure (e.g. a
    C-STORE status), and ``missing_reason`` why the others were not accepted, when that is known."""

    def __init__(self, accepted=(), refused: dict[str, str] | None = None, missing_reason: str | None = None,
                 failed: dict[str, str] | None = None) -> None:
        super().__init__(accepted)
        self.refused: dict[str, str] = dict(refused or {})
        self.missing_reason = missing_reason
        self.failed: dict[str, str] = dict(failed or {})


# SOP classes newer than pydicom's UID dictionary (3.0), named in refusals.
_SOP_CLASS_NAMES = {"1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage"}

# Presentation context results (PS3.8 9.3.3.2) other than acceptance.
_CONTEXT_REFUSALS = {1: "user rejection", 2: "no reason given", 3: "abstract syntax not supported",
                     4: "transfer syntax not supported"}


def _uid_name(uid: str) -> str:
    name = _SOP_CLASS_NAMES.get(uid) or UID(uid).name
    return name if name != uid else f"SOP class {uid}"


class Destination(ABC):
    type: ClassVar[str]
    deidentifies: bool = False  # sends de-identified copies (an Export in the audit trail)
    # Batches of results sent to it at the same time (node/deliver/loop.py): a small result need
    # not wait while a large one is stored. One for a DICOM peer (a planning system may take one
    # association at a time).
    result_lanes: int = 1

    @abstractmethod
    def send(self, items: list[Item]) -> set[str]:
        """Send the batch; return the SOP Instance UIDs the peer accepted (an ``Accepted`` where the
        peer refused some for good)."""


_TYPES: dict[str, type[Destination]] = {}


def destination_type(name: str) -> Callable[[type[Destination]], type[Destination]]:
    """``@destination_type("dimse")``: a pluggable destination (mercure's target registry, typed)."""

    def deco(cls: type[Destination]) -> type[Destination]:
        cls.type = name
        _TYPES[name] = cls
        return cls

    return deco


@destination_type("orthanc")
class OrthancDestination(Destination):
    """The node's archive: every instance as its Part 10 bytes to Orthanc's REST API, as stored
    (no re-encoding).

    Results went by DICOMweb STOW-RS until session 9: for ct-anatomy's RTSTRUCT (16 MB, 16 000
    contours) Orthanc took 4.1-4.7 s to answer a STOW-RS request and 2.7 s to answer the same
    bytes posted to /instances (quiet machine; a 16 MB object of few elements takes 0.16 s either
    way), and that request decided when a job's last result was in the archive."""

    result_lanes = 2  # requests side by side: Orthanc stores each in a thread of its own

    def __init__(self, endpoint: ArchiveEndpoint) -> None:
        self.endpoint = endpoint

    def send(self, items: list[Item]) -> Accepted:
        """Each instance's own outcome: what Orthanc stored stays delivered when a later one of the
        batch fails (else it would be sent again and again, and failed with its batch-mates)."""
        ok: set[str] = set()
        refused: dict[str, str] = {}
        with self.endpoint.client(timeout=120) as c:
            for it in items:
                data = it.data()
                try:
                    r = c.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
                    outcome = _orthanc_outcome(r)
                    if outcome is None and it.kind == "result":
                        outcome = _checked_older_result_kept(c, r, data, it.sop_uid)
                except httpx.HTTPError as exc:
                    if not ok and not refused:
                        raise  # nothing of the batch got there: the loop records the error for all
                    return Accepted(ok, refused, f"Orthanc did not answer: {exc or type(exc).__name__}")
                if outcome is None:
                    ok.add(it.sop_uid)
                elif r.status_code in _ORTHANC_FOR_GOOD or r.status_code == 200:
                    refused[it.sop_uid] = outcome  # the same bytes get the same answer: not retried
                elif not ok and not refused:
                    raise DeliveryError(outcome)
                else:  # e.g. 503 while its database reconnects: the rest of the batch is retried
                    return Accepted(ok, refused, outcome)
        return Accepted(ok, refused)


# Orthanc's answers to POST /instances that no retry of the same bytes changes: 400 (not a DICOM
# file it can parse), 415, 422. Others (401/403: credentials an admin fixes; 5xx) are retried.
_ORTHANC_FOR_GOOD = frozenset({400, 415, 422})


def _orthanc_outcome(r: httpx.Response) -> str | None:
    """None when Orthanc stored the instance (or already held it), else why not. Orthanc answers
    200 with {"Status": "FilteredOut"} when a filter of its configuration (Lua, a plugin) drops an
    instance: not stored, so not delivered."""
    if r.status_code != 200:
        return f"Orthanc refused the instance: HTTP {r.status_code} {r.text[:200]}"
    try:
        status = r.json().get("Status")
    except (ValueError, AttributeError):
        return f"Orthanc answered HTTP 200 with no store status: {r.text[:200]!r}"
    if status in ("Success", "AlreadyStored"):
        return None
    if status == "FilteredOut":
        return "Orthanc filtered the instance out (a filter of its configuration refused to store it)"
    return f"Orthanc did not store the instance: status {status!r}"


def _checked_older_result_kept(c: httpx.Client, r: httpx.Response, data: bytes, sop_uid: str) -> str | None:
    """``_older_result_kept``, where a check that cannot be made (the archive account may not read,
    an answer without its ID) leaves the result stored as Orthanc said, with a warning in the log."""
    try:
        return _older_result_kept(c, r, data)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        log.warning("result %s: Orthanc answered AlreadyStored and its stored version could not be compared "
                    "(%s); taken as stored", sop_uid, exc or type(exc).__name__)
        return None


def _older_result_kept(c: httpx.Client, r: httpx.Response, data: bytes) -> str | None:
    """None unless Orthanc answered "AlreadyStored" to a result and holds other bytes under its UID.

    Result UIDs are deterministic (node/uids.py): a re-run job's result replaces the old one only in
    an Orthanc with OverwriteInstances (the managed one sets it; Orthanc's default does not), else
    Orthanc keeps the old version and still answers "AlreadyStored". Orthanc stores the bytes as
    received, so their MD5 tells the two apart. An original answered "AlreadyStored" is the same
    instance and is not checked."""
    answer = r.json()
    if answer.get("Status") != "AlreadyStored":
        return None
    instance = f"/instances/{answer['ID']}"
    held = c.get(f"{instance}/attachments/dicom/md5")
    if held.status_code == 404:  # no MD5 kept (StoreMD5ForAttachments: false): the stored file's
        held = c.get(f"{instance}/file")
        held.raise_for_status()
        md5 = hashlib.md5(held.content).hexdigest()
    else:
        held.raise_for_status()
        md5 = held.text.strip()
    if md5 == hashlib.md5(data).hexdigest():
        return None
    return ("the archive kept an older version of this result (Orthanc answered AlreadyStored and holds other "
            "bytes under its SOP Instance UID); set OverwriteInstances: true on it")


@destination_type("dimse")
class DimseStoreDestination(Destination):
    """A DICOM peer (e.g. a TPS) by C-STORE, one association per batch, files sent as stored."""

    def __init__(self, cfg: DimseDestination, local_ae: str) -> None:
        self.cfg = cfg
        self.local_ae = cfg.calling_ae_title or local_ae
        self.tls_args = client_tls_args(cfg.tls, cfg.host, "tls") if cfg.tls else None
        self.deid = from_config(cfg.deidentify) if cfg.deidentify else None
        self.deidentifies = self.deid is not None

    @property
    def peer(self) -> str:
        return f"{self.cfg.ae_title}@{self.cfg.host}:{self.cfg.port}"

    def send(self, items: list[Item]) -> Accepted:
        datasets = [(it, it.dataset()) for it in items]
        not_deidentified: dict[str, str] = {}
        if self.deid is not None:
            # Refused by the profile (e.g. burned-in annotation): failed at once with that reason,
            # not retried as if the peer had not answered - the peer never saw them.
            datasets, not_deidentified = deidentify_batch(self.deid, datasets)
            if not datasets:
                return Accepted(refused=not_deidentified)
        # One context per (SOP class, transfer syntax): files go as stored, never transcoded.
        pairs = list(dict.fromkeys((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets))
        requested = pairs[:128]  # PS3.8's limit; the rest wait for the next batch
        ae = AE(ae_title=self.local_ae)
        # A planning system may take minutes to store a large RTSTRUCT. (pynetdicom's network_timeout is
        # not checked while a C-STORE waits for its response: the reactor is paused then.)
        ae.dimse_timeout = self.cfg.dimse_timeout_s
        assoc = ae.associate(self.cfg.host, self.cfg.port, ae_title=self.cfg.ae_title, tls_args=self.tls_args,
                             contexts=[build_context(sop, [ts]) for sop, ts in requested])
        refusals = self._refusals(assoc)
        refused = {it.sop_uid: refusals[key] for it, ds in datasets
                   if (key := (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))) in refusals}
        for why in sorted(set(refused.values())):
            log.error("%s (%d instance(s) not sent)", why, sum(w == why for w in refused.values()))
        refused.update(not_deidentified)
        if not assoc.is_established:
            if refusals and len(refusals) == len(requested):
                # Every context refused: pynetdicom aborts the association, which is the peer's answer.
                return Accepted(refused=refused)
            raise DeliveryError(f"association to {self.peer} failed")
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        ok: set[str] = set()
        failed: dict[str, str] = {}  # answered with a failure status: retried, with the status in the record
        answered = 0
        lost: str | None = None
        try:
            for it, ds in datasets:
                if (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) not in accepted:
                    continue  # refused (above), or beyond the contexts one association may ask for
                started = time.monotonic()
                try:
                    code = getattr(assoc.send_c_store(ds), "Status", None)
                except RuntimeError:  # pynetdicom: the association ended (the peer aborted) since the last response
                    code = None
                if code is None:  # no response: aborted by the peer, or by pynetdicom at dimse_timeout_s
                    lost = self._lost(answered, time.monotonic() - started)
                    break
                answered += 1
                # PS3.4 B.2.3: every 0xBxxx is a warning (stored), as the retrieve side reads it (node.pacs.qrscu)
                category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(
                    code, ("Warning" if code >> 12 == 0xB else "Failure", "unknown status"))
                if category in ("Success", "Warning"):  # a warning status: stored (PS3.4 B.2.3), with a remark
                    ok.add(it.sop_uid)
                    if category == "Warning":
                        log.warning("C-STORE of %s to %s: stored with warning status 0x%04X (%s)", it.sop_uid,
                                    self.peer, code, meaning)
                else:
                    failed[it.sop_uid] = (f"{self.peer} did not store the instance: "
                                          f"C-STORE status 0x{code:04X} ({meaning})")
                    log.error("C-STORE of %s: %s", it.sop_uid, failed[it.sop_uid])
        finally:
            if assoc.is_established:
                assoc.release()
        if lost is not None:
            log.error("%s (%d stored)", lost, len(ok))
            if not answered and not refused:
                raise DeliveryError(lost)  # nothing of the batch got there: the loop records the error for all
        return Accepted(ok, refused, lost, failed)

    def _lost(self, answered: int, waited: float) -> str:
        timeout = self.cfg.dimse_timeout_s
        why = (f"no C-STORE response within dimse_timeout_s ({timeout:g} s)" if waited >= timeout
               else "aborted by the peer or the connection dropped")
        return f"association to {self.peer} lost after {answered} instance(s): {why}"

    def _refusals(self, assoc) -> dict[tuple[str, str], str]:
        """(SOP class, transfer syntax) -> why, for each requested presentation context the peer
        rejected (a rejected context carries no transfer syntax of ours: found by its ID)."""
        asked = {cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                 for cx in assoc.requestor.requested_contexts}
        out = {}
        for cx in assoc.rejected_contexts:
            sop, ts = asked[cx.context_id]
            what = _uid_name(sop) + (f" in {_uid_name(ts)}" if cx.result == 4 else "")
            out[(sop, ts)] = (f"{self.peer} does not accept {what} (presentation context rejected: "
                              f"{_CONTEXT_REFUSALS.get(cx.result, f'result {cx.result}')})")
        return out


@destination_type("hilum")
class HilumNodeDestination(DimseStoreDestination):
    """Another Hilum node: the same C-STORE, with TLS and de-identification (required by its config)."""


def build_destinations(endpoint: ArchiveEndpoint, configured: dict[str, DimseDestination],
                       local_ae: str) -> dict[str, Destination]:
    out: dict[str, Destination] = {"orthanc": _TYPES["orthanc"](endpoint)}
    for name, cfg in configured.items():
        try:
            out[name] = _TYPES[cfg.type](cfg, local_ae)
        except ValueError as exc:  # e.g. a certificate that does not load: name the destination
            raise ValueError(f"destinations.{name}.{exc}") from None
    return out
