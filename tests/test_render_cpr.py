"""Curved planar reformation: a curved vessel becomes a straight band along the centre column."""
from __future__ import annotations

import numpy as np
import pytest

from node.render.cpr import curved_planar_reformat, resample_polyline
from node.render.phantom import centred_geometry, sample_phantom
from tests.test_render_projections import ACQUISITIONS

# A vessel that curves through all three patient axes: a quarter of a helix.
_T = np.linspace(0, np.pi / 2, 60)
CENTRELINE = np.stack([40 * np.cos(_T) - 20, 40 * np.sin(_T) - 20, 30 * _T - 20], axis=1)
RADIUS = 3.0


def vessel(xyz: np.ndarray) -> np.ndarray:
    flat = xyz.reshape(-1, 3)
    d2 = np.full(len(flat), np.inf)
    for a, b in zip(CENTRELINE[:-1], CENTRELINE[1:]):
        ab = b - a
        t = np.clip((flat - a) @ ab / (ab @ ab), 0, 1)
        d2 = np.minimum(d2, np.sum((flat - (a + t[:, None] * ab)) ** 2, axis=1))
    return np.where(d2 <= RADIUS**2, 500.0, 0.0).reshape(xyz.shape[:-1])


@pytest.mark.parametrize("acq", ["axial head-first", "oblique"])
def test_cpr_straightens_a_curved_vessel(acq):
    row, col, normal = ACQUISITIONS[acq]
    g = centred_geometry((48, 64, 64), (1.2, 1.2, 1.5), row, col, normal, (0.0, 0.0, 3.0))
    vol = sample_phantom(g, vessel)
    # A coarse polyline (every 6th point) of the true centreline, as a tracker would give.
    cpr = curved_planar_reformat(vol, CENTRELINE[::6], width_mm=30.0, spacing_mm=0.5, lateral_hint=(0, 0, 1))
    img = cpr.image
    arc = np.sum(np.linalg.norm(np.diff(CENTRELINE[::6], axis=0), axis=1))
    assert img.shape[0] == int(round(arc / 0.5)) + 1 and img.shape[1] == 61
    mid = img.shape[1] // 2
    inner = slice(4, img.shape[0] - 4)
    assert np.all(img[inner, mid] > 400), "the vessel lumen runs down the centre column"
    # Lumen width across the band matches the vessel diameter (+- a voxel) on every row.
    widths = (img[inner] > 250).sum(axis=1) * 0.5
    assert np.all(np.abs(widths - 2 * RADIUS) <= 1.5)
    assert np.all(img[inner, :mid - 16] < 50) and np.all(img[inner, mid + 17:] < 50)
    # The lateral frame is perpendicular to the course and never flips: from row to row it turns
    # at most by the polyline's corner angle (about 10 degrees here).
    tang = np.gradient(cpr.centerline_mm, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    assert np.all(np.abs(np.sum(tang * cpr.lateral, axis=1)) < 1e-6)
    assert np.all(np.sum(cpr.lateral[1:] * cpr.lateral[:-1], axis=1) > 0.97)


def test_rotating_cpr_turns_the_lateral_direction():
    g = centred_geometry((20, 20, 20), (1.0, 1.0, 1.0), (1, 0, 0), (0, 1, 0))
    vol = sample_phantom(g, lambda xyz: np.zeros(xyz.shape[:-1]))
    pts = [(0, 0, -8.0), (0, 0, 8.0)]
    a = curved_planar_reformat(vol, pts, width_mm=10, lateral_hint=(1, 0, 0))
    b = curved_planar_reformat(vol, pts, width_mm=10, lateral_hint=(1, 0, 0), angle_deg=90)
    np.testing.assert_allclose(a.lateral[0], (1, 0, 0), atol=1e-9)
    np.testing.assert_allclose(np.abs(b.lateral[0]), (0, 1, 0), atol=1e-9)
    assert a.labels == {"top": "F", "bottom": "H", "left": "R", "right": "L"}


def test_resample_polyline_keeps_ends_and_steps():
    p = resample_polyline(np.array([[0, 0, 0], [10.0, 0, 0], [10.0, 5.0, 0]]), 1.0)
    assert len(p) == 16
    np.testing.assert_allclose(p[0], (0, 0, 0))
    np.testing.assert_allclose(p[-1], (10, 5, 0))
    np.testing.assert_allclose(np.linalg.norm(np.diff(p, axis=0), axis=1), 1.0)


def test_cpr_rejects_bad_centrelines():
    g = centred_geometry((8, 8, 8), (1.0, 1.0, 1.0), (1, 0, 0), (0, 1, 0))
    vol = sample_phantom(g, lambda xyz: np.zeros(xyz.shape[:-1]))
    with pytest.raises(ValueError, match="points"):
        curved_planar_reformat(vol, [(0, 0, 0)])
    with pytest.raises(ValueError, match="distinct"):
        curved_planar_reformat(vol, [(0, 0, 0), (0, 0, 0)])
    with pytest.raises(ValueError, match="parallel"):
        curved_planar_reformat(vol, [(0, 0, 0), (0, 0, 5)], lateral_hint=(0, 0, 1))
    with pytest.raises(ValueError, match="points"):
        curved_planar_reformat(vol, [(0, 0, np.nan), (0, 0, 5)])
    with pytest.raises(ValueError, match="turn back"):
        curved_planar_reformat(vol, [(0, 0, 0), (0, 0, 1.0), (0, 0, 0)], spacing_mm=1.0)
