"""outline_holes counts what binary_fill_holes (4-connected background) would add, slice by slice,
including outlines that touch the image's edge and holes that touch the outline's bounding box."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.quality.slices import _enclosed_pixels


def test_enclosed_pixels_are_what_fill_holes_adds():
    four = ndimage.generate_binary_structure(2, 1)
    rng = np.random.default_rng(11)
    planes = [ndimage.gaussian_filter(rng.random((50, 70)), 1.2 + n % 3) > 0.5 for n in range(120)]
    for n in range(30):
        p = np.zeros((40, 50), bool)
        p[3:30, 5:40] = True
        p[10:20, 10:20] = False  # a hole
        p[0, :] = n % 2 == 0  # touching the top edge
        p[:, -1] = n % 3 == 0  # and the right one
        p[12, 10 + n % 10] = True
        p[20, 12] = p[19, 11] = False  # a diagonal gap: the hole stays closed (4-connected background)
        planes.append(p)
    checked = 0
    for p in planes:
        if p.any():
            assert _enclosed_pixels(p) == int((ndimage.binary_fill_holes(p, structure=four) & ~p).sum())
            checked += 1
    assert checked > 100
