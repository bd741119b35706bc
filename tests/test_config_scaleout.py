"""Settings of the scale-out features: errors name the field, defaults keep the embedded node as it was."""
from __future__ import annotations

import pytest

from node.config import ConfigError, load_settings


def test_defaults_are_the_embedded_node():
    s = load_settings()
    assert s.executor.kind == "local" and s.archive.index == "sqlite" and s.archive.dsn is None


def test_celery_needs_a_broker():
    with pytest.raises(ConfigError, match=r"executor: .*broker_url: required for kind: celery"):
        load_settings(executor={"kind": "celery"})


def test_visibility_timeout_must_exceed_the_job_timeout():
    with pytest.raises(ConfigError, match=r"executor.visibility_timeout_s: 600 s is not above handler_timeout_s"):
        load_settings(handler_timeout_s=1800, executor={"kind": "celery", "broker_url": "redis://127.0.0.1:6379/0",
                                                        "visibility_timeout_s": 600})
    s = load_settings(handler_timeout_s=1800, executor={"kind": "celery", "broker_url": "redis://x:1/0"})
    assert s.executor.visibility_timeout(s.handler_timeout_s) == 2 * 1800 + 600


def test_queue_routing_rule_then_handler_then_default():
    s = load_settings(executor={"kind": "celery", "broker_url": "redis://x:1/0", "default_queue": "cpu",
                                "queues": {"model:lungs": "gpu"}})
    assert s.executor.queue_for("model:lungs") == "gpu"
    assert s.executor.queue_for("overview") == "cpu"
    assert s.executor.queue_for("overview", "big-gpu") == "big-gpu"
    with pytest.raises(ConfigError, match=r"executor.queues: .*queue name 'GPU!'"):
        load_settings(executor={"queues": {"x": "GPU!"}})


def test_archive_dsn_only_with_postgresql():
    with pytest.raises(ConfigError, match=r"archive: .*dsn: only with index: postgresql"):
        load_settings(archive={"dsn": "postgresql://u:p@h/db"})
    with pytest.raises(ConfigError, match=r"archive.index: Input should be 'sqlite' or 'postgresql'"):
        load_settings(archive={"index": "mysql"})


def test_a_rule_names_its_queue(tmp_path):
    from node.handler_api import get_handler
    from node.rules.loader import load_rules

    files = {"r.yaml": "- name: a\n  match: {Modality: CT}\n  handler: overview\n  queue: gpu\n"}
    (rule,) = load_rules(files, handlers=get_handler, destinations={"orthanc"})
    assert rule.action.queue == "gpu"
    from node.rules.loader import RuleErrors

    with pytest.raises(RuleErrors, match="queue"):
        load_rules({"r.yaml": files["r.yaml"].replace("gpu", "GPU!")}, handlers=get_handler, destinations={"orthanc"})
