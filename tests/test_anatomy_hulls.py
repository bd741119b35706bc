"""The body outline's per-slice convex hulls: the same pixels as testing every pixel of the slice
against every facet of the hull of all its pixels (the direct definition), on blobs, lines, points."""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from node.anatomy.body import convex_hulls


def _direct(mask: np.ndarray) -> np.ndarray:
    out = np.zeros_like(mask)
    for k in range(mask.shape[0]):
        j, i = np.nonzero(mask[k])
        if j.size == 0:
            continue
        try:
            hull = ConvexHull(np.stack([j, i], axis=1).astype(float))
        except QhullError:  # collinear pixels are their own hull
            out[k] = mask[k]
            continue
        jj, ii = np.mgrid[:mask.shape[1], :mask.shape[2]]
        grid = np.stack([jj.ravel(), ii.ravel(), np.ones(jj.size)], axis=1)
        out[k] = (grid @ hull.equations.T <= 1e-6).all(axis=1).reshape(jj.shape)
    return out


def test_hulls_are_the_pixels_inside_every_facet():
    rng = np.random.default_rng(7)
    for n in range(12):
        mask = ndimage.gaussian_filter(rng.random((4, 70, 90)), 2 + n % 4) > 0.5 + 0.01 * (n % 5)
        assert np.array_equal(convex_hulls(mask), _direct(mask)), n
    odd = np.zeros((6, 30, 40), bool)
    odd[0, 5, 5:20] = True  # a row
    odd[1, 3:28, 7] = True  # a column
    odd[2, 4, 4] = True  # a point
    odd[3, [1, 2, 3], [1, 2, 3]] = True  # a diagonal
    odd[4, 10:12, :] = True  # a band to the edges
    odd[5, 0, 0] = odd[5, 29, 39] = odd[5, 0, 39] = True  # a triangle of corners
    assert np.array_equal(convex_hulls(odd), _direct(odd))
    assert convex_hulls(odd)[5].sum() > 3  # the triangle is filled
