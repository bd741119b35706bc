"""Interactive 3D view benchmark: frame latency over the WebSocket and time to the first frame.

A real node (`hilum up`) receives the phantom CT by C-STORE; a WebSocket client (bearer token)
then plays the browser: it sends view requests and times each until its frame has arrived,
the way a user's hand waits for the screen. Measured:
- time to first frame of a series not yet cached: WebSocket open -> series read from the spool,
  aligned, scene built -> first full-quality 3D frame (the cache is emptied before each run);
- reduced-quality frame (dragging) and full-quality frame (on release), request -> frame;
- the three MPR panes after a crosshair move;
- two users dragging at once (each one's reduced-quality latency).

Targets (issue 8), 512x512x300 CT, 512x512 viewport, 2-core CPU: reduced quality <= 150 ms,
full quality <= 1 s, first frame of an uncached series <= 5 s. On a GPU host the same script
gives the GPU figures (target >= 30 interactive frames per second).

    .venv/bin/python bench/bench_view3d.py [--slices 300] [--size 512] [--frames 20] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from websockets.sync.client import connect  # noqa: E402

from benchlib import files_of, phantom_ct  # noqa: E402
from node.render.live_session import unpack_frame  # noqa: E402
from tests.nodeproc import NodeProcess, storescu, wait_for  # noqa: E402


class Viewer:
    """One browser's worth of WebSocket: sends a view, waits for its frames, acknowledges them."""

    def __init__(self, node: NodeProcess, study_uid: str, series_uid: str) -> None:
        url = node.web.replace("http", "ws", 1) + f"/view3d/{study_uid}/{series_uid}/ws"
        self.ws = connect(url, additional_headers={"Authorization": f"Bearer {node.token}"}, open_timeout=60,
                          max_size=2**24).__enter__()  # closed by close(); a with-block would not fit the class
        self.seq = 0
        self.ready = self._message("ready", timeout=600)

    def _message(self, kind: str, timeout: float = 120) -> dict:
        while True:
            m = self.ws.recv(timeout)
            if isinstance(m, str):
                msg = json.loads(m)
                if msg["type"] == "error":
                    raise RuntimeError(msg["message"])
                if msg["type"] == kind:
                    return msg

    def request(self, panes: set[str], **view) -> tuple[float, dict[str, dict]]:
        """Send a view; (seconds until every pane in ``panes`` showed it, their frame headers)."""
        self.seq += 1
        t = time.perf_counter()
        self.ws.send(json.dumps({"type": "view", "seq": self.seq, **view}))
        got: dict[str, dict] = {}
        while set(got) != panes:
            m = self.ws.recv(120)
            if isinstance(m, str):
                msg = json.loads(m)
                if msg["type"] == "error":
                    raise RuntimeError(msg["message"])
                continue
            header, jpeg = unpack_frame(m)
            self.ws.send('{"type":"ack"}')
            if header["seq"] == self.seq:
                got[header["pane"]] = {**header, "bytes": len(jpeg)}
        return time.perf_counter() - t, got

    def close(self) -> None:
        self.ws.close()


def drag(viewer: Viewer, base: dict, frames: int, interacting: bool, start: float = 0.0) -> list[tuple[float, dict]]:
    out = []
    for i in range(frames):
        dt, got = viewer.request({"3d"}, **base, interacting=interacting, azimuth=start + 5 * i, elevation=10)
        out.append((dt, got["3d"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512, help="3D viewport side in pixels")
    ap.add_argument("--frames", type=int, default=20, help="frames per latency measurement")
    ap.add_argument("--repeat", type=int, default=3, help="runs of time-to-first-frame")
    args = ap.parse_args()

    t = time.perf_counter()
    dicom = phantom_ct(args.slices, "explicit")
    files = files_of(dicom)
    print(f"phantom CT: {len(files)} slices in {time.perf_counter() - t:.1f} s", flush=True)
    import pydicom

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    size = [args.size, args.size]
    base = {"sizes": {"3d": size}, "preset": "bone"}
    rows: list[tuple[str, list[float], float | None, str]] = []

    with tempfile.TemporaryDirectory(prefix="bench-view3d-") as tmp:
        rules = Path(tmp) / "rules"
        rules.mkdir()
        node = NodeProcess(Path(tmp) / "node", rules).start(archive_up=False)
        try:
            if storescu(node.dicom_port, files).returncode != 0:
                raise SystemExit("storescu failed")
            wait_for(lambda: any(s["instances"] == len(files) for s in node.study(study_uid).get("series", [])),
                     300, "the series in the index")
            load_before = os.getloadavg()[0]

            def series_state() -> str:
                return node.api("GET", "/api/view3d").json()["cache"]["series"][0]["state"]

            cold, loaded = [], []
            for _ in range(args.repeat):
                assert node.api("DELETE", "/api/view3d/cache").status_code == 200
                t0 = time.perf_counter()
                v = Viewer(node, study_uid, series_uid)
                loaded.append(time.perf_counter() - t0)
                _, got = v.request({"3d"}, **base)
                cold.append(time.perf_counter() - t0)
                renderer = v.ready["renderer"]
                # Let the full-resolution scene finish warming up before the next run or measurement.
                wait_for(lambda: series_state() == "ready", 300, "the full scene")
                v.close()
                wait_for(lambda: node.api("GET", "/api/view3d").json()["sessions"] == 0, 30, "the session to end")
            rows.append(("first frame, series not cached", cold, 5.0,
                         f"of which {statistics.median(loaded):.1f} s reading the series; "
                         f"{got['3d']['resolution']} resolution, {got['3d']['bytes'] // 1024} KB"))

            v = Viewer(node, study_uid, series_uid)
            wait_for(lambda: series_state() == "ready", 300, "the full scene")
            for mode, extra in (("vr", {}), ("mip", {"mode": "mip"})):
                view = {**base, **extra}
                drag(v, view, 2, True)  # settle: transfer functions, first-frame set-up
                for interacting, target in ((True, 0.15), (False, 1.0)):
                    samples = drag(v, view, args.frames, interacting, start=100)
                    h = samples[-1][1]
                    rows.append((f"{'reduced' if interacting else 'full'} quality frame, {mode}",
                                 [dt for dt, _ in samples], target,
                                 f"render {statistics.median(s['render_ms'] for _, s in samples):.0f} ms, "
                                 f"jpeg {statistics.median(s['encode_ms'] for _, s in samples):.0f} ms, "
                                 f"{h['bytes'] // 1024} KB"))
            planes = {"axial", "coronal", "sagittal"}
            sizes = {p: [256, 256] for p in planes}
            centre = v.ready["center_mm"]
            mpr = [v.request(planes, sizes=sizes, crosshair=[centre[0] + 2 * i, centre[1] - i, centre[2] + 3 * i])[0]
                   for i in range(args.frames)]
            rows.append(("3 MPR panes 256x256 after a crosshair move", mpr, None, ""))

            w = Viewer(node, study_uid, series_uid)
            results: dict[str, list] = {}
            threads = [threading.Thread(target=lambda name=name, viewer=viewer: results.__setitem__(
                name, drag(viewer, base, args.frames, True))) for name, viewer in (("a", v), ("b", w))]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            both = [dt for samples in results.values() for dt, _ in samples]
            rows.append(("reduced quality, two users dragging", both, None, "each user's frames"))
            v.close()
            w.close()
        finally:
            node.stop()
            node._kill_orthanc()

    print(f"\nbackend: {renderer}; 3D viewport {size[0]}x{size[1]}; {args.slices}x512x512 CT; "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("(request -> frame on the client: render + JPEG + WebSocket; frames acknowledged as a browser does)")
    print(f"{'measurement':44s} {'median':>8s} {'min':>8s} {'n':>3s} {'target':>8s}  ok   detail")
    for label, samples, target, detail in rows:
        med = statistics.median(samples)
        ok = "" if target is None else ("yes" if med <= target else "NO")
        tgt = "" if target is None else f"{target * 1000:6.0f}ms"
        print(f"{label:44s} {med * 1000:6.0f}ms {min(samples) * 1000:6.0f}ms {len(samples):3d} {tgt:>8s}  "
              f"{ok:3s}  {detail}")
        if label.startswith("reduced quality frame"):
            print(f"{'  = frames per second while dragging':44s} {1 / med:6.1f}")


if __name__ == "__main__":
    main()
