"""Offscreen VTK volume rendering: objects appear where the patient geometry puts them."""
from __future__ import annotations

import numpy as np
import pytest

from node.render.aligned import align_to_patient_axes
from node.render.phantom import centred_geometry, sample_phantom
from node.render.vr import PRESETS, Camera, VolumeScene
from node.render.windows import Window
from node.volume import Volume
from tests.test_render_projections import ACQUISITIONS, CENTRE, patient_bounds

SIZE = (160, 192)  # rows, cols: not square, so a rows/cols mix-up shows
LEFT_BALL = np.array([28.0, -12.0, 14.0])  # patient left, anterior, cranial of centre
RIGHT_BALL = np.array([-22.0, 10.0, -6.0])


def two_balls(xyz: np.ndarray) -> np.ndarray:
    hu = np.zeros(xyz.shape[:-1])
    for c, r in ((LEFT_BALL, 8.0), (RIGHT_BALL, 6.0)):
        hu[np.sum((xyz - c) ** 2, axis=-1) <= r**2] = 1000.0
    return hu


def ball_volume(acq: str) -> Volume:
    row, col, normal = ACQUISITIONS[acq]
    g = centred_geometry((40, 56, 64), (1.5, 1.5, 2.0), row, col, normal, CENTRE)
    return sample_phantom(g, two_balls)


@pytest.fixture(scope="module")
def scenes():
    made = {}

    def get(acq):
        if acq not in made:
            made[acq] = VolumeScene(ball_volume(acq), "CT", SIZE)
        return made[acq]

    yield get
    for s in made.values():
        s.close()


def blobs(rgb: np.ndarray, threshold: int = 40) -> list[tuple[float, float, int]]:
    """(row, col, area) of the lit regions, largest first."""
    from scipy import ndimage

    lab, n = ndimage.label(rgb.max(axis=2) > threshold)
    out = []
    for i in range(1, n + 1):
        rr, cc = np.nonzero(lab == i)
        out.append((float(rr.mean()), float(cc.mean()), len(rr)))
    return sorted(out, key=lambda b: -b[2])


def expected_pixel(point, centre, right, up, ps) -> tuple[float, float]:
    rel = np.asarray(point) - centre
    return SIZE[0] / 2 - 0.5 - rel @ up / ps, SIZE[1] / 2 - 0.5 + rel @ right / ps


@pytest.mark.parametrize("acq", ["axial head-first", "axial feet-first", "slices reversed", "sagittal", "oblique"])
def test_balls_at_expected_pixels_in_0_and_90_degree_frames(scenes, acq):
    scene = scenes(acq)
    lo, hi = patient_bounds(align_to_patient_axes(ball_volume(acq)).geometry)
    centre = (lo + hi) / 2
    views = {
        0: (np.array([1.0, 0, 0]), np.array([0, 0, 1.0])),  # from the front: patient left on image right
        90: (np.array([0, 1.0, 0]), np.array([0, 0, 1.0])),  # from the left: posterior on image right
    }
    for az, (right, up) in views.items():
        cam = Camera(azimuth_deg=az)
        frame = scene.render(cam, preset="bone", size=SIZE)
        assert frame.shape == (*SIZE, 3) and frame.dtype == np.uint8
        ps = scene.pixel_spacing_mm(cam, SIZE)
        found = blobs(frame)
        assert len(found) == 2, found
        for (r, c, _), ball in zip(found, (LEFT_BALL, RIGHT_BALL)):
            er, ec = expected_pixel(ball, centre, right, up, ps)
            assert abs(r - er) < 1.0 and abs(c - ec) < 1.0, (az, (r, c), (er, ec))
            assert scene.project(ball, cam, SIZE) == pytest.approx((er, ec), abs=1e-6)
        # The reported pixel spacing is the true scale: ball separation in pixels x spacing = mm.
        (r0, c0, _), (r1, c1, _) = found
        sep_px = np.hypot(r1 - r0, c1 - c0) * ps
        sep_mm = np.linalg.norm(((LEFT_BALL - RIGHT_BALL) @ right, (LEFT_BALL - RIGHT_BALL) @ up))
        assert sep_px == pytest.approx(sep_mm, abs=1.5 * ps)


def test_camera_basis_convention():
    view, right, up = Camera().basis()
    np.testing.assert_allclose((view, right, up), ((0, 1, 0), (1, 0, 0), (0, 0, 1)), atol=1e-12)
    view, right, up = Camera(azimuth_deg=90).basis()
    np.testing.assert_allclose((view, right, up), ((-1, 0, 0), (0, 1, 0), (0, 0, 1)), atol=1e-12)
    view, right, up = Camera(elevation_deg=90).basis()  # from the head, looking to the feet
    np.testing.assert_allclose(view, (0, 0, -1), atol=1e-12)
    with pytest.raises(ValueError, match="zoom"):
        Camera(zoom=0)
    with pytest.raises(ValueError, match="elevation"):
        Camera(elevation_deg=120)


def test_zoom_and_pan_move_the_image(scenes):
    scene = scenes("axial head-first")
    base = Camera()
    zoomed = Camera(zoom=2.0, pan_mm=(10.0, -5.0))
    f = scene.render(zoomed, size=SIZE)
    (r, c, _) = blobs(f)[0]
    er, ec = scene.project(LEFT_BALL, zoomed, SIZE)
    assert abs(r - er) < 1.0 and abs(c - ec) < 1.0
    assert scene.pixel_spacing_mm(zoomed, SIZE) == pytest.approx(scene.pixel_spacing_mm(base, SIZE) / 2)


def test_mip_minip_and_interactive_quality(scenes):
    scene = scenes("axial head-first")
    cam = Camera(azimuth_deg=30)
    mip = scene.render(cam, mode="mip", window=Window(500, 1000), size=SIZE)
    assert mip.max() == 255 and len(blobs(mip, 200)) == 2
    # MinIP over a bright block with a dark ball: the ball is the darkest thing on screen.
    g = centred_geometry((30, 30, 30), (2.0, 2.0, 2.0), (1, 0, 0), (0, 1, 0))
    dark = sample_phantom(g, lambda xyz: np.where(np.sum((xyz - (8.0, 0, -6.0)) ** 2, -1) <= 49, -1000.0, 100.0))
    s2 = VolumeScene(dark, "CT", SIZE)
    try:
        minip = s2.render(Camera(), mode="minip", window=Window(-450, 1200), size=SIZE)
        lit = minip.max(axis=2) > 0  # the block is grey, the background black
        rr, cc = np.nonzero(lit)
        grey = minip.max(axis=2)
        assert np.median(grey[lit]) > 150  # the block in this window
        inside = np.zeros_like(lit)
        inside[rr.min() + 2:rr.max() - 1, cc.min() + 2:cc.max() - 1] = True
        dr, dc = np.nonzero(inside & (grey < 20))
        er, ec = s2.project((8.0, 0, -6.0), Camera(), SIZE)
        assert len(dr) > 50 and abs(dr.mean() - er) < 1.0 and abs(dc.mean() - ec) < 1.0
    finally:
        s2.close()
    fast = scene.render(cam, quality="interactive", size=SIZE)
    full = scene.render(cam, quality="full", size=SIZE)
    assert fast.shape == full.shape
    for (r1, c1, _), (r2, c2, _) in zip(blobs(fast), blobs(full)):
        assert abs(r1 - r2) < 1.5 and abs(c1 - c2) < 1.5


def test_presets_render_and_mr_uses_relative_preset():
    g = centred_geometry((24, 32, 32), (2.0, 2.0, 2.0), (1, 0, 0), (0, 1, 0))
    mr = sample_phantom(g, lambda xyz: np.where(np.sum(xyz**2, -1) <= 15**2, 800.0, 50.0), dtype=np.float32)
    scene = VolumeScene(mr, "MR", (64, 64))
    try:
        assert scene.render(preset="mr", size=(64, 64)).max() > 40
        with pytest.raises(ValueError, match="Hounsfield"):
            scene.render(preset="bone", size=(64, 64))
    finally:
        scene.close()
    scene.close()  # closing twice is harmless; rendering afterwards is an error, not a crash
    with pytest.raises(RuntimeError, match="closed"):
        scene.render(preset="mr", size=(64, 64))
    assert set(PRESETS) == {"bone", "vascular", "lung", "soft_tissue", "mr"}


def test_bad_render_requests_name_the_problem(scenes):
    scene = scenes("axial head-first")
    with pytest.raises(ValueError, match="mode"):
        scene.render(mode="xray")
    with pytest.raises(ValueError, match="preset"):
        scene.render(preset="skin")
    with pytest.raises(ValueError, match="quality"):
        scene.render(quality="draft")
    with pytest.raises(ValueError, match="size"):
        scene.render(size=(8, 8000))


def test_backend_is_offscreen_gl(scenes):
    scene = scenes("axial head-first")
    assert scene.backend.split(" / ")[0] in ("EGL", "OSOpenGL")
    assert scene.gl != "unknown"


def test_without_egl_falls_back_to_osmesa_or_says_what_to_install():
    """EGL made unavailable (no vendor library): OSMesa takes over where installed, else a clear error."""
    import ctypes.util
    import os
    import subprocess
    import sys

    code = (
        "from node.render.offscreen import offscreen_window, RenderingUnavailable\n"
        "try:\n    print('WINDOW', type(offscreen_window(32, 32)).__name__)\n"
        "except RenderingUnavailable as e:\n    print('UNAVAILABLE', e)\n"
    )
    env = dict(os.environ, __EGL_VENDOR_LIBRARY_FILENAMES="/nonexistent/egl_vendor.json")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    if ctypes.util.find_library("OSMesa"):
        assert "WINDOW vtkOSOpenGLRenderWindow" in out.stdout
    else:
        assert "UNAVAILABLE" in out.stdout and "libosmesa6" in out.stdout and "libegl-mesa0" in out.stdout
