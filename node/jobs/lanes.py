"""Make a job's encoder tasks one after the other, in the order that gets every object into the
archive soonest, and hand over each object as it is made.

The order is by lane (``node.encoders.encode_plan``): the reports first (small, and what a reader
looks at first), then the rest (an RTSTRUCT, images, registrations), then the SEGs. The lanes do
not depend on each other, so any order gives the same objects. The RTSTRUCT goes before the SEGs
because the archive takes longest to store it: Orthanc parses a CT's structure set of 16 000
contours for 1.5-2 s, a Label Map SEG in 0.05 s; made first, it is being stored while the SEGs are
made.

One task at a time, on a thread of its own: the job's thread meanwhile writes the object just
made and hands it to delivery. Encoders side by side were slower on the two-core machines the
goals are set for: the encoders are mostly Python (highdicom, pydicom) and share the GIL, and
the archive and the delivery of the originals need the other core. Measured on ct-anatomy
(512x512x300, bench_latency, alternated runs): one at a time, the last result was in Orthanc
0.7 s sooner and the encoders took 0.4 CPU s less (docs/benchmarks.md, latency).
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.encoders import OTHER_LANE, REPORT_LANE, SEG_LANE, EncodeTask

__all__ = ["LANE_ORDER", "Made", "run_lanes"]

LANE_ORDER = (REPORT_LANE, OTHER_LANE, SEG_LANE)


@dataclass(frozen=True)
class Made:
    index: int  # the task's place in the plan: results are listed in plan order, however they are made
    kind: str
    datasets: list[Dataset]
    seconds: float  # wall time of the encoder
    cpu_seconds: float  # CPU time of the encoding thread


_DONE = object()


def run_lanes(tasks: list[EncodeTask], order: Sequence[int] = LANE_ORDER) -> Iterator[Made]:
    """Each task's objects as soon as they are made, lane by lane in ``order`` (a lane not named
    there last), in plan order within a lane. The first failure stops the tasks not yet started
    and is raised here; the encoding thread never outlives the call."""
    rank = {lane: n for n, lane in enumerate(order)}
    ordered = sorted(enumerate(tasks), key=lambda it: (rank.get(it[1].lane, len(rank)), it[0]))
    out: queue.Queue = queue.Queue(maxsize=1)  # at most one made object waits for the job's thread
    stop = threading.Event()

    def run() -> None:
        try:
            for i, task in ordered:
                if stop.is_set():
                    return
                t0, c0 = time.perf_counter(), time.thread_time()
                datasets = task.make()
                _put(Made(i, task.kind, datasets, time.perf_counter() - t0, time.thread_time() - c0))
        except BaseException as exc:  # noqa: BLE001 - handed to the job's thread, which reports it
            _put(exc)
        finally:
            _put(_DONE)

    def _put(item) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    thread = threading.Thread(target=run, name="encode", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
            item = None  # not held while the next object is awaited
    finally:
        stop.set()  # also when the consumer stops early (a write failed)
        thread.join()
