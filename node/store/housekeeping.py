"""Background upkeep of the spool: key rotation requests and retention.

Requests come through the index (``hilum keys rotate`` runs in another process and enqueues
one), so a request made while the node is down is carried out at its next start. Retention runs
every ``retention.check_every_s``.
"""
from __future__ import annotations

import json
import logging
import threading
import time

from node.audit import NULL_AUDIT, AuditTrail
from node.config import Settings
from node.store.index import Index
from node.store.keys import load_keyring
from node.store.retention import purge_due
from node.store.rewrap import rewrap_all
from node.store.vault import Vault

log = logging.getLogger("hilum.housekeeping")
REQUEST_POLL_S = 2.0


class Housekeeper:
    def __init__(self, settings: Settings, index: Index, vault: Vault, audit: AuditTrail = NULL_AUDIT) -> None:
        self.settings = settings
        self.index = index
        self.vault = vault
        self.audit = audit
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)
        self.last_purge: dict = {}

    def start(self) -> None:
        self.index.requeue_maintenance()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():  # a start that failed early never started it
            self._thread.join(timeout=60)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        next_purge = time.monotonic()
        while not self._stop.is_set():
            try:
                while (req := self.index.next_maintenance()) is not None and not self._stop.is_set():
                    self._carry_out(req)
                if time.monotonic() >= next_purge:
                    self.last_purge = purge_due(self.settings, self.index, self.vault, self.audit).as_dict()
                    next_purge = time.monotonic() + self.settings.retention.check_every_s
            except Exception:  # noqa: BLE001 - upkeep must survive anything; the index keeps the requests
                log.exception("housekeeping error")
            self._wake.wait(REQUEST_POLL_S)
            self._wake.clear()

    def _carry_out(self, req) -> None:
        if req["kind"] != "rewrap":
            self.index.finish_maintenance(req["id"], False, f"unknown request {req['kind']!r}")
            return
        try:
            ring = load_keyring(self.settings.spool_encryption)
            self.vault.use_keyring(ring)  # new objects under the new active key from here on
            rep = rewrap_all(self.vault)
        except Exception as exc:  # noqa: BLE001 - report on the request, keep the node running
            log.error("key rewrap failed: %s", exc)
            self.index.finish_maintenance(req["id"], False, str(exc))
            self.audit.spool_keys(req["requested_by"], "rewrap-failed", {"error": str(exc)[:500]})
            return
        detail = {"active": ring.active if ring else None, **rep.as_dict()}
        ok = not rep.errors
        self.index.finish_maintenance(req["id"], ok, json.dumps(detail))
        self.audit.spool_keys(req["requested_by"], "rewrap" if ok else "rewrap-with-errors", detail)
        log.info("spool keys: %d object(s) re-wrapped under %s, %d error(s)", rep.rewrapped,
                 detail["active"], len(rep.errors))

