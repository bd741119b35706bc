"""CT pixel values: codes → HU (texture, thick-slice averaging, edge blur, noise), and the table."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from node.phantom.chest import TABLE, CodeBook
from node.volume import Geometry

HU_MIN, HU_MAX = -1024, 3071  # 12 bits stored, rescale intercept -1024
TABLE_GAP_MM, TABLE_THICKNESS_MM, TABLE_RADIUS_MM, TABLE_HALF_WIDTH_MM = 4.0, 10.0, 450.0, 230.0


class Signal:
    """HU of one slice from its sub-slice codes: intended HU + lung texture, averaged, blurred, noisy.

    Each slice draws only on its own index (and the seed), so slices can be made in any order, in
    parallel, and still give the same bytes.
    """

    def __init__(self, codebook: CodeBook, rows: int, cols: int, spacing: float, noise_hu: float, blur: bool,
                 seed: tuple[int, ...]) -> None:
        _, self.hu_lut, self.tex_lut = codebook.luts()
        self.rows, self.cols = rows, cols
        self.noise = noise_hu
        self.blur = blur
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.pad = 32
        tile = ndimage.gaussian_filter(
            rng.standard_normal((rows + 2 * self.pad, cols + 2 * self.pad), dtype=np.float32),
            sigma=max(0.7, 2.5 / spacing))
        self.texture = tile / max(float(tile.std()), 1e-6)
        self.phase = rng.uniform(0, 2 * np.pi, 2)
        self.bank = rng.standard_normal(3 * rows * cols, dtype=np.float32)

    def _texture_window(self, k: int) -> np.ndarray:
        # The window drifts slowly with k: neighbouring slices share (shifted) structures, as lungs do.
        oy, ox = (self.pad + np.rint(self.pad * np.sin(np.array([0.09, 0.07]) * k + self.phase))).astype(int)
        return self.texture[oy:oy + self.rows, ox:ox + self.cols]

    @staticmethod
    def _blur(a: np.ndarray) -> np.ndarray:
        """[1 2 1]/4 along rows then columns: partial volume at every edge, nothing else."""
        t = np.empty_like(a)
        t[:, 1:-1] = a[:, :-2]
        t[:, 1:-1] += a[:, 2:]
        t[:, 1:-1] *= 0.25
        t[:, 1:-1] += 0.5 * a[:, 1:-1]
        t[:, 0], t[:, -1] = a[:, 0], a[:, -1]
        a[1:-1] = t[:-2]
        a[1:-1] += t[2:]
        a[1:-1] *= 0.25
        a[1:-1] += 0.5 * t[1:-1]
        a[0], a[-1] = t[0], t[-1]
        return a

    def hu(self, sub_codes: np.ndarray, k: int) -> np.ndarray:
        """Slice ``k`` from the codes of its sub-slice samples (n_sub, rows, cols)."""
        tex = self._texture_window(k)
        acc = np.zeros((self.rows, self.cols), np.float32)
        for codes in sub_codes:
            acc += np.take(self.hu_lut, codes)
            acc += np.take(self.tex_lut, codes) * tex
        if len(sub_codes) > 1:
            acc *= 1.0 / len(sub_codes)
        if self.blur and self.rows > 2 and self.cols > 2:
            acc = self._blur(acc)
        if self.noise > 0:
            # Two windows of a shared bank at offsets of this slice's own: fresh-looking noise, cheaply.
            n = self.rows * self.cols
            o1, o2 = np.random.default_rng([*self.seed, k]).integers(0, 2 * n, 2)
            noise = self.bank[o1:o1 + n] + self.bank[o2:o2 + n]
            acc += noise.reshape(self.rows, self.cols) * np.float32(self.noise / math.sqrt(2.0))
        return acc


def stored_values(hu: np.ndarray, padding_hu: float | None = None, outside: np.ndarray | None = None) -> np.ndarray:
    """Stored pixel values: HU - HU_MIN; with ``padding_hu``, HU - padding_hu and 0 (the padding)
    where ``outside`` the reconstruction circle."""
    if padding_hu is None:
        return (np.clip(np.rint(hu), HU_MIN, HU_MAX) - HU_MIN).astype(np.uint16)
    stored = (np.clip(np.rint(hu), HU_MIN, HU_MAX) - padding_hu).astype(np.uint16)
    stored[outside] = 0
    return stored


def padding_bits(padding_hu: float) -> int:
    """BitsStored that holds HU_MAX above a padding value."""
    return int(math.ceil(math.log2(HU_MAX - padding_hu + 1)))


def lay_table(codes: np.ndarray, geom: Geometry, patient: np.ndarray, fallback_y: float) -> float:
    """Paint the table just under the lowest patient voxel (it follows the patient, never overlaps)."""
    _, rows, cols = codes.shape
    ys = geom.origin[1] + np.arange(rows) * geom.spacing[1]
    xs = geom.origin[0] + np.arange(cols) * geom.spacing[0] * geom.row_direction[0]
    lowest = fallback_y
    for j in range(rows - 1, -1, -1):
        if patient[codes[:, j, :]].any():
            lowest = float(ys[j])
            break
    top = np.full(cols, np.inf)
    inside = np.abs(xs) <= TABLE_HALF_WIDTH_MM
    top[inside] = lowest + TABLE_GAP_MM + TABLE_RADIUS_MM - np.sqrt(TABLE_RADIUS_MM**2 - xs[inside] ** 2)
    mask = (ys[:, None] >= top[None, :]) & (ys[:, None] <= top[None, :] + TABLE_THICKNESS_MM)
    hit = np.nonzero(mask.any(axis=1))[0]
    if len(hit):
        r0, r1 = hit[0], hit[-1] + 1
        sub = codes[:, r0:r1, :]
        np.copyto(sub, np.uint8(TABLE), where=mask[None, r0:r1] & (sub == 0))
    return lowest + TABLE_GAP_MM
