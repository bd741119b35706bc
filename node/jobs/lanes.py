"""Run a job's encoder tasks lane by lane, the lanes side by side, and hand over each object as it
is made.

The lanes (``node.encoders.encode_plan``) do not depend on each other: a big SEG and the
RTSTRUCT of the same label map encode at the same time, and whichever is ready first is written
and delivered first. Threads, not processes: the heavy parts (NumPy, SciPy, zlib, bit packing)
release the GIL, and the objects stay in this process for the worker to write.

One lane may go first (``first``): the others start once it has made its objects. The worker puts
the reports there: they are small and what a reader looks at first, and on a two-core machine,
sharing the cores and the GIL with a big SEG and RTSTRUCT, the SR took three times its own CPU
time to be made (measured: 0.7 CPU s over 2.0 s of wall time); alone it is made in its CPU time
and is on its way to the archive while the others encode.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.encoders import EncodeTask


@dataclass(frozen=True)
class Made:
    index: int  # the task's place in the plan: results are listed in plan order, however they finish
    kind: str
    datasets: list[Dataset]
    seconds: float  # wall time of the encoder, in its lane
    cpu_seconds: float  # CPU time of its lane's thread


_LANE_DONE = object()


def run_lanes(tasks: list[EncodeTask], first: int | None = None) -> Iterator[Made]:
    """Each task's objects as soon as they are made; lane ``first`` (when it has tasks) before the
    others start. The first failure stops the other lanes at their next task and is raised here
    once every lane has stopped (no thread outlives the job)."""
    lanes: dict[int, list[tuple[int, EncodeTask]]] = {}
    for i, task in enumerate(tasks):
        lanes.setdefault(task.lane, []).append((i, task))
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    first_done = threading.Event()
    if first not in lanes:
        first_done.set()

    def run(lane: list[tuple[int, EncodeTask]], n: int) -> None:
        try:
            if n != first:
                first_done.wait()
            for i, task in lane:
                if stop.is_set():
                    return
                t0, c0 = time.perf_counter(), time.thread_time()
                datasets = task.make()
                out.put(Made(i, task.kind, datasets, time.perf_counter() - t0, time.thread_time() - c0))
        except BaseException as exc:  # noqa: BLE001 - handed to the job's thread, which reports it
            stop.set()
            out.put(exc)
        finally:
            if n == first:
                first_done.set()  # also when it failed: the others then see ``stop`` and end
            out.put(_LANE_DONE)

    threads = [threading.Thread(target=run, args=(lane, n), name=f"encode-lane-{n}", daemon=True)
               for n, lane in lanes.items()]
    for t in threads:
        t.start()
    failure: BaseException | None = None
    running = len(threads)
    try:
        while running:
            item = out.get()
            if item is _LANE_DONE:
                running -= 1
            elif isinstance(item, BaseException):
                failure = failure or item
            elif failure is None:
                yield item
                item = None  # not held while the next lane's object is awaited
    finally:
        stop.set()  # also when the consumer stops early (a write failed)
        first_done.set()
        for t in threads:
            t.join()
    if failure is not None:
        raise failure
