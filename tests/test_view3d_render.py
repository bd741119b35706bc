"""The interactive viewer's server side: MPR panes and their patient mapping, the shared volume
cache (one load, memory cap, LRU eviction), and the session's latest-wins render loop."""
from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from node.render.aligned import align_to_patient_axes
from node.render.live_planes import plane_frame
from node.render.live_session import LiveSession, parse_request, unpack_frame
from node.render.phantom import centred_geometry, sample_phantom
from node.render.volume_cache import SCENE_BYTES_PER_VOXEL, CachedSeries, ViewerBusy, VolumeCache, half_resolution
from node.render.windows import Window
from tests.test_render_projections import ACQUISITIONS

BALL = np.array([21.0, -14.0, 9.0])  # patient left, anterior, cranial of the centre
BALL_R = 6.0
CENTRE = np.array([3.0, -2.0, 1.0])


def ball(xyz: np.ndarray) -> np.ndarray:
    return np.where(np.sum((xyz - BALL) ** 2, axis=-1) <= BALL_R**2, 1000.0, 0.0)


def ball_volume(acq: str, shape=(30, 48, 56), spacing=(1.5, 1.25, 2.0)):
    row, col, normal = ACQUISITIONS[acq]
    return sample_phantom(centred_geometry(shape, spacing, row, col, normal, CENTRE), ball)


def pane_point(meta: dict, x: float, y: float) -> np.ndarray:
    """What the page does with a click: pane pixel -> LPS."""
    return np.asarray(meta["origin_mm"]) + x * np.asarray(meta["right_mm"]) + y * np.asarray(meta["down_mm"])


@pytest.mark.parametrize("acq", ["axial head-first", "axial feet-first", "sagittal", "coronal"])
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_plane_pane_shows_the_ball_at_the_crosshair(acq, plane):
    aligned = align_to_patient_axes(ball_volume(acq))
    size = (150, 200)  # not square and not the volume's aspect: letterboxing must be right
    pf = plane_frame(aligned, plane, BALL, Window(500, 1000), size)
    assert pf.image.shape == size
    lab, n = ndimage.label(pf.image > 128)
    assert n == 1, f"expected one bright disc, found {n}"
    cy, cx = ndimage.center_of_mass(lab == 1)
    x, y = pf.crosshair_px
    # Pixel (x, y) covers [x, x+1): its centre is x + 0.5.
    assert abs(cx + 0.5 - x) < 1.0 and abs(cy + 0.5 - y) < 1.0, (cx, cy, pf.crosshair_px)
    # The disc's diameter in pane pixels matches the ball's 12 mm.
    mm_per_px = np.linalg.norm(pf.right_mm)
    assert abs(np.linalg.norm(pf.down_mm) / mm_per_px - 1) < 0.01  # square pixels, to the rounding of a side
    diameter_px = 2 * np.sqrt((lab == 1).sum() / np.pi)
    assert abs(diameter_px * mm_per_px - 2 * BALL_R) < 2.5
    # A click on the crosshair maps back to the ball centre (within the slice's depth).
    p = pane_point(pf.meta(), x, y)
    n_hat = np.asarray(pf.slice_step_mm) / np.linalg.norm(pf.slice_step_mm)
    in_plane = (p - BALL) - ((p - BALL) @ n_hat) * n_hat
    assert np.linalg.norm(in_plane) < 1e-6
    assert abs((p - BALL) @ n_hat) <= np.linalg.norm(pf.slice_step_mm) / 2 + 1e-6


def test_paging_by_the_slice_step_moves_one_slice_at_a_time():
    aligned = align_to_patient_axes(ball_volume("axial feet-first"))  # 30 slices: the centre is a half slice
    for plane in ("axial", "coronal", "sagittal"):
        first = plane_frame(aligned, plane, CENTRE, Window(0, 100), (32, 32))
        step = np.asarray(first.slice_step_mm)
        seen = [plane_frame(aligned, plane, CENTRE + i * step, Window(0, 100), (32, 32)).slice_index
                for i in range(-3, 4)]
        assert seen == list(range(first.slice_index - 3, first.slice_index + 4)), (plane, seen)


def test_plane_labels_follow_the_display_convention():
    aligned = align_to_patient_axes(ball_volume("axial feet-first"))
    labels = {p: plane_frame(aligned, p, CENTRE, Window(0, 100), (64, 64)).meta()["labels"]
              for p in ("axial", "coronal", "sagittal")}
    assert labels["axial"] == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert labels["coronal"] == {"left": "R", "right": "L", "top": "H", "bottom": "F"}
    assert labels["sagittal"] == {"left": "A", "right": "P", "top": "H", "bottom": "F"}


def test_bad_view_requests_name_the_field():
    for bad, field in (({"seq": 1, "zoom": 0}, "zoom"), ({"seq": 1, "preset": "skin"}, "preset"),
                       ({"seq": 1, "mode": "xray"}, "mode"), ({"seq": 1, "elevation": 120}, "elevation"),
                       ({"seq": 1, "window": [40, 0]}, "window"), ({"seq": 1, "sizes": {"3d": [8, 9000]}}, "sizes"),
                       ({"seq": 1, "colour": "red"}, "colour"), ({}, "seq")):
        with pytest.raises(ValueError, match=field):
            parse_request({"type": "view", **bad})


def test_slab_limits_mip_to_the_slab_about_a_point():
    from node.render.vr import Camera, VolumeScene

    front, back = np.array([0.0, -20.0, 0.0]), np.array([20.0, 20.0, 0.0])
    g = centred_geometry((40, 48, 48), (2.0, 2.0, 2.0), (1, 0, 0), (0, 1, 0))
    vol = sample_phantom(g, lambda xyz: 1000.0 * ((np.sum((xyz - front) ** 2, -1) <= 36)
                                                   | (np.sum((xyz - back) ** 2, -1) <= 36)))
    scene = VolumeScene(vol, "CT", (64, 64))
    try:
        def lit(slab):
            rgb = scene.render(Camera(), mode="mip", window=Window(500, 1000), size=(64, 64), slab=slab)
            return np.argwhere(rgb.max(axis=2) > 128)

        both, only_front, only_back = lit(None), lit((tuple(front), 10.0)), lit((tuple(back), 10.0))
        assert len(lit((( 0.0, 0.0, 0.0), 10.0))) == 0  # a slab between the balls holds neither
        assert len(only_front) + len(only_back) == len(both)
        for pixels, ball in ((only_front, front), (only_back, back)):
            r, c = scene.project(ball, Camera(), (64, 64))
            assert np.abs(pixels.mean(axis=0) - (r, c)).max() < 1.0
        with pytest.raises(ValueError, match="slab"):
            scene.render(Camera(), mode="mip", size=(64, 64), slab=((0.0, 0.0, 0.0), 0.0))
    finally:
        scene.close()


@pytest.mark.parametrize("acq", ["axial head-first", "axial feet-first", "sagittal"])
def test_half_resolution_keeps_the_patient_geometry(acq):
    vol = ball_volume(acq, shape=(64, 72, 80), spacing=(1.0, 1.25, 1.5))
    half = half_resolution(vol)
    assert half.array.shape == (32, 36, 40) and half.array.dtype == vol.array.dtype
    assert half.geometry.direction == vol.geometry.direction
    assert np.allclose(half.geometry.spacing, (2.0, 2.5, 3.0))

    def centroid(v):
        kji = np.argwhere(v.array > 500)
        return v.geometry.index_to_patient(kji).mean(axis=0)

    assert np.linalg.norm(centroid(half) - BALL) < 0.75 and np.linalg.norm(centroid(vol) - BALL) < 0.5
    # A block of 8 voxels becomes their rounded mean.
    assert half.array[5, 6, 7] == int(np.floor(vol.array[10:12, 12:14, 14:16].mean() + 0.5))
    thin = half_resolution(ball_volume(acq, shape=(20, 72, 80)))  # 20 slices: too few to halve
    assert thin.array.shape == (20, 36, 40)


def test_large_series_answer_from_the_preview_until_the_full_scene_is_warm():
    aligned = align_to_patient_axes(ball_volume("axial head-first", shape=(64, 72, 80)))
    series = CachedSeries("s", "CT", aligned, preview_min_voxels=1)
    try:
        assert series.preview is not None
        assert series.nbytes == int(aligned.array.size * 9 / 8 * (2 + SCENE_BYTES_PER_VOXEL))
        series.warm.result(60)
        assert series.full_ready
        frame, scene = series.render("full", preset="bone", size=(64, 64))
        assert scene is series.scene and frame.result(60).shape == (64, 64, 3)
        frame, scene = series.render("interactive", preset="bone", size=(64, 64))
        assert scene is (series.preview if series.scene.software else series.scene)
        # The preview shows the ball where the full scene does.
        from node.render.vr import Camera

        r, c = scene.project(BALL, Camera(), (64, 64))
        lit = np.argwhere(frame.result(60).max(axis=2) > 40)
        assert np.abs(lit.mean(axis=0) - (r, c)).max() < 1.5
    finally:
        series.close()
    small = CachedSeries("t", "CT", aligned)  # under the default size: no preview, always full
    try:
        assert small.preview is None and small.full_ready
        assert small.render("interactive", preset="bone", size=(32, 32))[1] is small.scene
    finally:
        small.close()


# -- the shared cache ------------------------------------------------------------------------------

class CountingLoader:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[str] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, uid: str):
        with self._lock:
            self.calls.append(uid)
        time.sleep(self.delay)
        if uid == "broken":
            raise ValueError("series broken is not a volume: fewer than two slices")
        return "CT", ball_volume("axial head-first")


def entry_bytes() -> int:
    return ball_volume("axial head-first").array.size * (2 + SCENE_BYTES_PER_VOXEL)  # small: no preview


def test_cache_loads_once_for_concurrent_viewers_and_shares_the_series():
    loader = CountingLoader(delay=0.3)
    cache = VolumeCache(loader, cap_bytes=10 * entry_bytes())
    try:
        a, b = cache.acquire("s1"), cache.acquire("s1")  # the second joins the load in progress
        assert a.result(60) is b.result(60)
        assert loader.calls == ["s1"]
        stats = cache.stats()
        assert stats["series"] == [{"series_uid": "s1", "state": "ready", "in_use": 2,
                                    "megabytes": round(entry_bytes() / 2**20, 1)}]
        cache.release("s1")
        cache.release("s1")
        assert cache.stats()["series"][0]["in_use"] == 0
        assert cache.acquire("s1").result(60) is a.result()  # still cached for the next viewer
        assert loader.calls == ["s1"]
    finally:
        cache.close()


def test_cache_evicts_least_recently_used_and_refuses_when_all_in_use():
    loader = CountingLoader()
    cache = VolumeCache(loader, cap_bytes=2 * entry_bytes() + 1)
    try:
        for uid in ("s1", "s2"):
            cache.acquire(uid).result(60)
            cache.release(uid)
        first = cache.acquire("s1").result(60)  # s1 is now the most recently used
        cache.release("s1")
        cache.acquire("s3").result(60)  # needs room: s2, least recently used, goes
        assert {s["series_uid"] for s in cache.stats()["series"]} == {"s1", "s3"}
        assert first.scene._image is not None  # s1 kept, s2's scene freed
        assert cache.stats()["used_megabytes"] <= cache.stats()["cap_megabytes"]
        cache.acquire("s1").result(60)  # s1 and s3 both in use now
        with pytest.raises(ViewerBusy, match="memory full"):
            cache.acquire("s4").result(60)
        cache.release("s4")
        assert {s["series_uid"] for s in cache.stats()["series"]} == {"s1", "s3"}
        cache.release("s3")
        assert cache.drop_unused() == 1  # s3; s1 is still in use
        assert [s["series_uid"] for s in cache.stats()["series"]] == ["s1"]
    finally:
        cache.close()


def test_cache_reports_a_failed_load_and_tries_again_next_time():
    loader = CountingLoader()
    cache = VolumeCache(loader, cap_bytes=10 * entry_bytes())
    try:
        with pytest.raises(ValueError, match="not a volume"):
            cache.acquire("broken").result(60)
        cache.release("broken")
        assert cache.stats()["series"] == []
        with pytest.raises(ValueError):
            cache.acquire("broken").result(60)
        assert loader.calls == ["broken", "broken"]
        cache.release("broken")
    finally:
        cache.close()


def test_idle_series_are_freed_after_idle_s():
    now = [0.0]
    cache = VolumeCache(CountingLoader(), cap_bytes=10 * entry_bytes(), idle_s=60, clock=lambda: now[0])
    try:
        series = cache.acquire("s1").result(60)
        cache.release("s1")
        now[0] = 61.0
        assert cache.stats()["series"] == []
        deadline = time.monotonic() + 10  # the scene is closed on its render thread
        while series.scene._image is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert series.scene._image is None
    finally:
        cache.close()


# -- the session's render loop ---------------------------------------------------------------------

def test_session_renders_only_the_newest_view_and_one_full_frame_on_release():
    cache = VolumeCache(CountingLoader(), cap_bytes=10 * entry_bytes())
    series = cache.acquire("s1").result(60)
    sent: list[tuple[dict, np.ndarray]] = []
    errors: list[str] = []
    idle: list[int] = []

    async def scenario():
        async def send(data: bytes):
            header, jpeg = unpack_frame(data)
            sent.append((header, np.asarray(Image.open(io.BytesIO(jpeg)))))
            session.ack()

        async def send_message(msg: dict):
            if msg["type"] == "error":
                errors.append(msg["message"])
            else:
                idle.append(msg["seq"])

        session = LiveSession(series, send, send_message)
        runner = asyncio.create_task(session.run())
        sizes = {"3d": [96, 128], "axial": [64, 64], "coronal": [64, 64], "sagittal": [64, 64]}
        base = {"type": "view", "sizes": sizes, "preset": "bone"}
        session.update(parse_request({**base, "seq": 1}))
        await _until(lambda: {h["pane"] for h, _ in sent} == {"3d", "axial", "coronal", "sagittal"})
        before = len(sent)
        # A burst of drag events while nothing is acknowledged: only the newest may be rendered.
        for i in range(2, 30):
            session.update(parse_request({**base, "seq": i, "interacting": True, "azimuth": 3 * i}))
        await _until(lambda: any(h["seq"] == 29 for h, _ in sent[before:]))
        drag = [h for h, _ in sent[before:]]
        assert all(h["pane"] == "3d" and h["quality"] == "interactive" for h in drag)  # MPR inputs unchanged
        assert len(drag) <= 2 and drag[-1]["seq"] == 29
        session.update(parse_request({**base, "seq": 30, "interacting": False, "azimuth": 87}))
        await _until(lambda: sent[-1][0]["seq"] == 30)
        await _until(lambda: idle and idle[-1] == 30)
        assert [h["quality"] for h, _ in sent[before + len(drag):]] == ["full"]
        # Unknown preset for the modality: an error naming the pane and preset, and the loop goes on.
        session.update(parse_request({**base, "seq": 31, "preset": "mr", "azimuth": 87}))
        await _until(lambda: errors)
        assert "3d" in errors[0] and "mr" in errors[0]
        runner.cancel()
        return [img for h, img in sent if h["pane"] == "3d"]

    try:
        frames = asyncio.run(scenario())
        assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 2  # the view turned
    finally:
        cache.release("s1")
        cache.close()


def test_in_flight_cap_holds_frames_back_until_acknowledged():
    cache = VolumeCache(CountingLoader(), cap_bytes=10 * entry_bytes())
    series = cache.acquire("s1").result(60)
    sent: list[dict] = []

    async def scenario():
        async def send(data: bytes):
            sent.append(unpack_frame(data)[0])

        async def send_message(msg: dict):
            assert msg["type"] == "idle", msg

        session = LiveSession(series, send, send_message, max_in_flight=2)
        runner = asyncio.create_task(session.run())
        sizes = {"3d": [64, 64], "axial": [32, 32], "coronal": [32, 32], "sagittal": [32, 32]}
        session.update(parse_request({"type": "view", "seq": 1, "sizes": sizes}))
        await _until(lambda: len(sent) == 2)
        await asyncio.sleep(0.3)
        assert len(sent) == 2  # two unacknowledged frames: the rest waits
        session.ack()
        session.ack()
        await _until(lambda: len(sent) == 4)
        assert {h["pane"] for h in sent} == {"3d", "axial", "coronal", "sagittal"}
        runner.cancel()

    try:
        asyncio.run(scenario())
    finally:
        cache.release("s1")
        cache.close()


async def _until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)
