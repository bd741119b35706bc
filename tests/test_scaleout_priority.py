"""A rule's priority reaches the broker: with one busy worker, an urgent job queued after offpeak ones
runs before them (real `hilum up`, real redis-server, a real `hilum worker`)."""
from __future__ import annotations

import textwrap

import pytest

from node.jobs.broker import AMQP_PRIORITY, REDIS_PRIORITY, broker_priority
from node.phantom import generate_ct
from tests.nodeproc import storescu, wait_for
from tests.redisproc import redis_server
from tests.test_scaleout import ClusterNode, Worker, _jobs_done


def _rules(node: ClusterNode) -> None:
    """Head-first CTs are bulk work (offpeak, slow), feet-first ones a stat read (urgent). A bulk job
    lasts long enough (10 s) for the stat study to be received, routed and queued while the first runs,
    on a slow machine too."""
    (node.tmp / "rules" / "ct.yaml").write_text(textwrap.dedent("""\
        - name: bulk
          level: series
          match: {Modality: CT, PatientPosition: HFS}
          handler: {name: test-slow-overview, params: {sleep_s: 10, tiles: 4, tile_size: 64}}
          priority: offpeak
        - name: stat
          level: series
          match: {Modality: CT, PatientPosition: FFS}
          handler: {name: test-slow-overview, params: {sleep_s: 0.5, tiles: 4, tile_size: 64}}
          priority: urgent
        """))


@pytest.mark.slow
def test_an_urgent_job_overtakes_queued_offpeak_ones(tmp_path):
    ct = dict(rows=48, cols=48, slices=8, pixel_spacing=8.0, slice_thickness=10.0)
    bulk = [generate_ct(tmp_path / f"bulk{i}", seed=70 + i, **ct) for i in range(3)]
    stat = generate_ct(tmp_path / "stat", seed=80, patient_position="FFS", **ct)
    with redis_server(tmp_path / "redis") as redis:
        node = ClusterNode(tmp_path, redis.url, 0.0)
        _rules(node)
        worker = None
        try:
            node.start()
            worker = Worker(node, "solo", node.worker_token())
            index = node.index()
            wait_for(lambda: len(index.workers()) == 1, 60, "the worker up")
            for s in bulk:
                assert storescu(node.dicom_port, s.dicom_dir).returncode == 0

            def busy_with_two_waiting():
                claimed = [a for j in index.jobs() for a in index.attempts_of_job(j["id"]) if a["state"] == "claimed"]
                return len(index.jobs()) == 3 and claimed and node.api("GET", "/api/cluster").json()["queues"] == {
                    "cpu": 2}

            wait_for(busy_with_two_waiting, 90, "one offpeak job running, two waiting in the broker", interval=0.2)
            assert storescu(node.dicom_port, stat.dicom_dir).returncode == 0
            jobs = wait_for(lambda: _jobs_done(node, 4), 180, "every job done", interval=0.5)
            order = sorted(((index.attempts_of_job(j["id"])[0]["claimed_at"], j["rule"]) for j in jobs))
            assert [rule for _, rule in order] == ["bulk", "stat", "bulk", "bulk"]
        finally:
            if worker is not None:
                worker.stop()
            node.stop()
            node._kill_orthanc()


def test_priorities_map_to_each_brokers_order():
    # Redis drains its lowest priority step first, RabbitMQ its highest priority first.
    assert [broker_priority("redis://h:6379/0", p) for p in ("urgent", "normal", "offpeak")] == [0, 3, 6]
    assert [broker_priority("amqp://h//", p) for p in ("urgent", "normal", "offpeak")] == [9, 5, 0]
    assert set(REDIS_PRIORITY) == set(AMQP_PRIORITY) == {"urgent", "normal", "offpeak"}
