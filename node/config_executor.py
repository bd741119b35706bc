"""Configuration of the job executor: the local worker processes (default) or a Celery cluster.

Kept apart from ``node.config`` (which embeds it in ``Settings``) so the distributed executor's
settings read as one piece (node/jobs/celery_executor.py uses them).
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

QUEUE_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def _queue_name(v: str) -> str:
    if not QUEUE_RE.match(v):
        raise ValueError(f"queue name {v!r} must be lowercase letters, digits, '.', '-' or '_'")
    return v


class ExecutorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no NaN/inf timeouts

    kind: Literal["local", "celery"] = "local"
    broker_url: str | None = None  # redis://host:6379/0 (or amqp://… for RabbitMQ)
    default_queue: str = "cpu"
    queues: dict[str, str] = {}  # handler name → queue (e.g. {"model:lung-nodules": gpu}); rules may name one too
    max_attempts: int = Field(3, ge=1, le=20)  # attempts lost with their worker before the job fails
    worker_lost_s: float = Field(60.0, gt=0)  # a running attempt silent this long lost its worker
    lost_task_s: float = Field(30.0, gt=0)  # a task neither claimed nor in the broker this long was lost
    visibility_timeout_s: float | None = None  # broker redelivery; default: 2 × handler_timeout_s + 600

    _dq = field_validator("default_queue")(classmethod(lambda cls, v: _queue_name(v)))

    @field_validator("queues")
    @classmethod
    def _queues(cls, v: dict[str, str]) -> dict[str, str]:
        for q in v.values():
            _queue_name(q)
        return v

    @model_validator(mode="after")
    def _broker(self) -> "ExecutorSettings":
        if self.kind == "celery" and not self.broker_url:
            raise ValueError("broker_url: required for kind: celery (e.g. redis://127.0.0.1:6379/0)")
        return self

    def visibility_timeout(self, handler_timeout_s: float) -> float:
        return self.visibility_timeout_s or 2 * handler_timeout_s + 600

    def queue_for(self, handler: str, rule_queue: str | None = None) -> str:
        return rule_queue or self.queues.get(handler) or self.default_queue
