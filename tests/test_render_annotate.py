"""Burned-in annotation: the built-in font, edge labels where they belong, a true-length scale bar."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, signal

from node.render.annotate import annotate, overlay, scale_bar_length_mm, text_scale
from node.render.font import GLYPH_H, GLYPH_W, _GLYPHS, glyph, text_mask


def find(image: np.ndarray, mask: np.ndarray) -> list[tuple[int, int]]:
    """Top-left positions where ``mask`` is drawn in white (255) with a black outline around it."""
    box = np.pad(mask, 1)
    outline = ndimage.binary_dilation(box, np.ones((3, 3), bool)) & ~box
    white, black = (image == 255).astype(float), (image == 0).astype(float)

    def corr(a, pattern):
        return np.rint(signal.correlate(a, pattern.astype(float), mode="valid", method="fft"))

    ok = (corr(white, box) == box.sum()) & (corr(white, ~box) == 0) & (corr(black, outline) == outline.sum())
    return [(int(r) + 1, int(c) + 1) for r, c in zip(*np.nonzero(ok))]


def test_font_covers_what_annotations_need():
    for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789mc .-+:/()x°":
        g = glyph(ch)
        assert g.shape == (GLYPH_H, GLYPH_W) and g.dtype == bool
    assert all(len(rows) == 7 and all(len(r) == 5 for r in rows) for rows in _GLYPHS.values())
    assert np.array_equal(glyph("a"), glyph("A"))
    with pytest.raises(ValueError, match="not in the built-in"):
        glyph("é")
    m = text_mask("LR", 3)
    assert m.shape == (21, (5 + 1 + 5) * 3)
    assert np.array_equal(m[::3, :15:3], glyph("L"))


def test_labels_sit_on_their_edges_in_grey_and_rgb():
    labels = {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    for shape in ((200, 240), (200, 240, 3)):
        img = annotate(np.full(shape, 90, np.uint8), labels)
        grey = img if img.ndim == 2 else img[..., 0]
        assert img.shape == shape and img.dtype == np.uint8
        for edge, letter in labels.items():
            hits = find(grey, glyph(letter))
            assert len(hits) == 1, (edge, letter, hits)
            r, c = hits[0]
            if edge == "left":
                assert c < 10 and abs(r + 3 - 100) < 5
            elif edge == "right":
                assert c > 240 - 15 and abs(r + 3 - 100) < 5
            elif edge == "top":
                assert r < 10 and abs(c + 2 - 120) < 5
            else:
                assert r > 200 - 15 and abs(c + 2 - 120) < 5


def test_scale_bar_has_its_stated_length():
    img = annotate(np.zeros((512, 512), np.uint8), pixel_spacing_mm=0.8)
    mm = scale_bar_length_mm(512, 0.8)
    assert mm == 100  # 100 mm = 125 px, the longest round length within a quarter of 512
    # the bar: the longest run of white in the bottom rows
    runs = []
    for row in img[-30:]:
        white = np.concatenate([[0], (row == 255).astype(int), [0]])
        edges = np.flatnonzero(np.diff(white))
        runs += list(edges[1::2] - edges[::2])
    assert max(runs) == round(100 / 0.8)
    s = text_scale(512, 512)
    assert find(img, text_mask("100 mm", s)), "the bar is labelled with its length"


def test_caption_only_where_it_fits_and_bad_input():
    img = annotate(np.zeros((512, 512), np.uint8), {"top": "H"}, caption="MIP")
    assert find(img, text_mask("MIP", 2))
    narrow = annotate(np.zeros((64, 64), np.uint8), {"top": "H"}, caption="A LONG CAPTION")
    assert find(narrow, text_mask("H", 1)) and not find(narrow, text_mask("LONG", 1))
    with pytest.raises(ValueError, match="uint8"):
        annotate(np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="edge"):
        annotate(np.zeros((64, 64), np.uint8), {"middle": "X"})


def test_overlay_burns_a_whole_stack_alike():
    ov = overlay(64, 80, {"left": "R", "right": "L"}, pixel_spacing_mm=1.0)
    stack = np.stack([np.full((64, 80), v, np.uint8) for v in (10, 100, 200)])
    burned = ov.burn(stack)
    assert burned.shape == stack.shape and np.array_equal(stack[0], np.full((64, 80), 10))  # input untouched
    for i in range(3):
        assert np.array_equal(burned[i], annotate(stack[i], {"left": "R", "right": "L"}, 1.0))
    rgb = ov.burn(np.zeros((2, 64, 80, 3), np.uint8))
    assert np.array_equal(rgb[1, ..., 2] == 255, ov.white)
    with pytest.raises(ValueError, match="overlay for"):
        ov.burn(np.zeros((64, 81), np.uint8))
