"""One running node: the stages wired in their one-way order.

SCP → spool/index → stability/router → jobs (worker processes) → encoders → delivery.
Each stage gets what it needs passed in (no global singletons); the only backward edges are
wake-ups, so a stage reacts at once instead of waiting for its next pass.
"""
from __future__ import annotations

import logging
import threading

import httpx

from node import __version__
from node.archive.orthanc import ArchiveEndpoint, ManagedOrthanc, archive_endpoint
from node.audit import open_audit
from node.config import Settings
from node.deliver.destinations import build_destinations
from node.deliver.loop import DeliveryLoop
from node.encoders.sr_templates import validate_all
from node.handler_api import get_handler, handler_names
from node.jobs.admin import retry
from node.models.registry import validate_models
from node.pacs.priors import PriorsCoordinator
from node.pacs.retriever import Retriever
from node.pacs.scheduler import PullScheduler
from node.models.versions import ModelRegistry, registry_handlers
from node.jobs.executor import Executor, LocalProcessExecutor
from node.receive.ingest import Ingest
from node.receive.scp import StoreSCP
from node.route.router import Router
from node.rules.service import RulesService
from node.store.housekeeping import Housekeeper
from node.store.index import Index
from node.store.keys import load_keyring
from node.store.retrieves import RetrieveStore
from node.store.vault import Vault

log = logging.getLogger("hilum.node")


def check_sr_templates(classes=None, directory=None) -> None:
    """Every template parses, and every handler's declared findings/measurements have an entry."""
    templates = validate_all(directory)
    problems = []
    for cls in classes if classes is not None else [get_handler(n) for n in handler_names()]:
        name = cls.name
        if cls.sr_template is None:
            continue
        t = templates.get(cls.sr_template)
        if t is None:
            problems.append(f"handler {name}: SR template {cls.sr_template!r} not found in sr_templates/")
            continue
        problems += [f"{t.path}: no findings.{k!r} (reported by handler {name})"
                     for k in sorted(cls.reports_findings - set(t.findings))]
        problems += [f"{t.path}: no measurements.{k!r} (reported by handler {name})"
                     for k in sorted(cls.reports_measurements - set(t.measurements))]
    if problems:
        raise ValueError("SR templates incomplete:\n  " + "\n  ".join(problems))


def open_index(settings: Settings) -> Index:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Index(settings.data_dir / "index.db")


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.index = open_index(settings)
        self.audit = open_audit(settings)
        self.vault = Vault(settings.data_dir, load_keyring(settings.spool_encryption, settings.data_dir), writer=True,
                           segment_mb=settings.spool_segment_mb)
        self.managed: ManagedOrthanc | None = None if settings.external_orthanc else ManagedOrthanc(settings)
        self.archive: ArchiveEndpoint = self.managed.endpoint if self.managed else archive_endpoint(settings)
        self.rules = RulesService(settings.rules_dir, settings.data_dir / "rules-history",
                                  handlers=registry_handlers(ModelRegistry.for_data_dir(settings.data_dir)),
                                  destinations=settings.destination_names, audit=self.audit,
                                  sources=settings.sources)
        self.ingest = Ingest(self.index, self.vault)
        self.scp = StoreSCP(settings, self.ingest, self.audit)
        self.delivery = DeliveryLoop(settings, self.index,
                                     build_destinations(self.archive, settings.destinations, settings.ae_title),
                                     self.vault, self.audit)
        self.executor = self._executor()
        self.housekeeper = Housekeeper(settings, self.index, self.vault, self.audit)
        self.retrieves = RetrieveStore(self.index)
        self.retriever = Retriever(settings, self.retrieves, self.ingest, self.audit)  # PACS pulls (node/pacs)
        self.pulls = PullScheduler(settings, self.rules.current, self.retrieves, on_queued=self.retriever.wake,
                                   audit=self.audit)
        self.priors = PriorsCoordinator(settings, self.index, self.retrieves, on_retrieves=self.retriever.wake,
                                        on_released=self.executor.wake, audit=self.audit)
        self.router = Router(settings, self.index, rules=self.rules.current, on_jobs=self.executor.wake,
                             on_deliveries=self.delivery.wake, audit=self.audit, on_priors=self.priors.hold)
        self.http_client: httpx.AsyncClient | None = None
        self._started = threading.Event()

    def _executor(self) -> Executor:
        if self.settings.executor.kind == "celery":
            from node.jobs.celery_executor import CeleryExecutor  # Celery is imported only where it is used

            return CeleryExecutor(self.settings, self.index, on_done=self.delivery.wake, audit=self.audit,
                                  rule_queue=self._rule_queue)
        return LocalProcessExecutor(self.settings, self.index, self.vault, on_done=self.delivery.wake,
                                    audit=self.audit)

    def _rule_queue(self, rule_name: str) -> str | None:
        rule = next((r for r in self.rules.current().rules if r.name == rule_name), None)
        return rule.action.queue if rule is not None else None

    def start(self) -> None:
        validate_models()  # every card parses and its ONNX model loads
        check_sr_templates()  # a broken or incomplete SR template is a start-up error, not a failed job
        leftovers = self.ingest.quarantine.remove_empty_tmp()
        if leftovers:
            log.warning("removed %d partial file(s) left by an interrupted write", leftovers)
        self.ingest.recover()  # rows a power cut took from the index come back from the spool log
        if self.managed:
            self.managed.start()
        self.http_client = self.archive.async_client()
        self.delivery.start()
        self.executor.start()
        self.router.start()
        self.housekeeper.start()
        self.scp.start()  # last: accept data only once every later stage is ready
        self.retriever.start()  # after the SCP: C-MOVE sends to it
        self.priors.start()
        if self.settings.sources:
            self.pulls.start()
        self._started.set()
        self.audit.node_started(__version__)

    def stop(self) -> None:
        """Stop accepting, let in-flight C-STOREs finish, leave jobs/deliveries durable, stop Orthanc."""
        log.info("shutting down")
        self.pulls.stop()
        self.priors.stop()
        self.retriever.stop()
        self.scp.stop()
        self.ingest.close()
        self.housekeeper.stop()
        self.router.stop()
        self.executor.stop()
        self.delivery.stop()
        if self.managed:
            self.managed.stop()
        if self._started.is_set():
            self.audit.node_stopped()
        self.vault.close()
        self.index.close()

    def archive_alive(self) -> bool:
        return self.archive.alive()

    def retry_job(self, job_id: int, who: str) -> dict:
        """Re-run a failed job, or re-send the failed deliveries of a finished one."""
        action = retry(self.index, job_id, who)
        self.executor.wake()
        self.delivery.wake()
        return {"job": job_id, "action": action}
