"""The message broker between the node and its remote workers: one Celery app, one task.

Celery only carries "run attempt N of job J" (the job id and the attempt's ticket); the node's
index stays the single source of truth. The delivery guarantees come from the broker settings:
a task is acknowledged only after it ran (``acks_late``), put back if its worker process dies
(``task_reject_on_worker_lost``), taken one at a time (prefetch 1), and redelivered by Redis only
after ``visibility_timeout``, which is above the longest job timeout so a running job is never
handed to a second worker behind the first one's back.
"""
from __future__ import annotations

import hashlib
import json
import logging

from celery import Celery

log = logging.getLogger("hilum.broker")

TASK = "hilum.run_job"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue key of a priority step is NAME + SEP + step
PRIORITY_STEPS = [0, 3, 6, 9]  # kombu's Redis transport: one list per step, drained lowest step first
# A rule's priority as a broker priority. Redis serves the lowest number first, AMQP (RabbitMQ) the
# highest, so the two get mirrored numbers; either way an urgent job queued behind offpeak ones
# is the next one a free worker takes.
REDIS_PRIORITY = {"urgent": 0, "normal": 3, "offpeak": 6}
AMQP_PRIORITY = {"urgent": 9, "normal": 5, "offpeak": 0}


def broker_priority(broker_url: str, priority: str) -> int:
    table = REDIS_PRIORITY if broker_url.startswith(REDIS_SCHEMES) else AMQP_PRIORITY
    return table[priority]


def redis_keys(queue: str) -> list[str]:
    """The Redis lists a queue's waiting tasks are in: one per priority step."""
    return [queue, *(f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS if p)]


def ticket_hash(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


def make_celery(broker_url: str, visibility_timeout_s: float) -> Celery:
    app = Celery("hilum", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis: priority lists per queue, served in step order; AMQP: queues declared with a max priority.
        broker_transport_options={"visibility_timeout": int(visibility_timeout_s), "priority_steps": PRIORITY_STEPS},
        task_queue_max_priority=max(AMQP_PRIORITY.values()),
        task_serializer="json", accept_content=["json"], task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_create_missing_queues=True,
    )
    return app


class BrokerView:
    """What waits in the broker, for the reconciler and the dashboard. Redis only: for another broker
    every answer is None (unknown), and the reconciler relies on worker heartbeats alone."""

    def __init__(self, broker_url: str) -> None:
        self.redis = None
        if broker_url.startswith(REDIS_SCHEMES):
            import redis

            self.redis = redis.Redis.from_url(broker_url, socket_timeout=3, socket_connect_timeout=3)

    def queue_lengths(self, queues: list[str]) -> dict[str, int] | None:
        if self.redis is None:
            return None
        try:
            return {q: sum(self.redis.llen(k) for k in redis_keys(q)) for q in queues}
        except Exception as exc:  # noqa: BLE001 - broker down: unknown, not zero
            log.debug("broker unreachable: %s", exc)
            return None

    def task_ids(self, queues: list[str]) -> set[str] | None:
        """Ids of tasks waiting in ``queues`` or delivered to a worker and not yet acknowledged."""
        if self.redis is None:
            return None
        try:
            raw = [m for q in queues for k in redis_keys(q) for m in self.redis.lrange(k, 0, -1)]
            unacked = [json.loads(v)[0] for v in self.redis.hvals("unacked")]
        except Exception as exc:  # noqa: BLE001
            log.debug("broker unreachable: %s", exc)
            return None
        ids = set()
        for m in [json.loads(r) for r in raw] + unacked:
            tid = (m.get("headers") or {}).get("id")
            if tid:
                ids.add(tid)
        return ids

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
