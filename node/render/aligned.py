"""Put a volume on a patient-aligned grid, so every render reads orientation from the Geometry.

The result is a ``Volume`` whose Geometry has the identity direction: ``array[z, y, x]`` with
index axes running along +x (left), +y (posterior), +z (head) of the LPS patient system. For
the usual acquisitions (axial, coronal, sagittal, head- or feet-first) the direction matrix is a
signed permutation and this is an exact transpose/flip (no interpolation). Oblique series are
resampled (linear) onto the bounding box of the original grid.
"""
from __future__ import annotations

import numpy as np

from node.volume import Geometry, Volume

__all__ = ["align_to_patient_axes", "is_patient_aligned", "IDENTITY"]

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Off-axis direction components below this count as zero (0.06 degrees: well under a voxel
# across a whole field of view), so DICOM rounding noise does not force a resampling.
_AXIS_TOLERANCE = 1e-3


def is_patient_aligned(geometry: Geometry) -> bool:
    return bool(np.allclose(geometry.matrix, np.eye(3), atol=_AXIS_TOLERANCE))


def _signed_permutation(m: np.ndarray) -> tuple[list[int], list[int]] | None:
    """Patient axis and sign of each index axis (i, j, k), or None when the grid is oblique."""
    axes, signs = [], []
    for c in range(3):
        col = m[:, c]
        a = int(np.argmax(np.abs(col)))
        off = np.delete(np.abs(col), a)
        if np.any(off > _AXIS_TOLERANCE):
            return None
        axes.append(a)
        signs.append(1 if col[a] > 0 else -1)
    if sorted(axes) != [0, 1, 2]:
        return None
    return axes, signs


def align_to_patient_axes(volume: Volume) -> Volume:
    """The volume on an LPS-aligned grid (identity direction), see the module docstring."""
    g = volume.geometry
    if is_patient_aligned(g):
        return Volume(volume.array, Geometry(g.shape, g.origin, g.spacing, IDENTITY))
    perm = _signed_permutation(g.matrix)
    if perm is None:
        return _resample_oblique(volume)
    axes, signs = perm
    # Index axis c (0 = i = array axis 2, 1 = j = axis 1, 2 = k = axis 0) lies along patient axis
    # axes[c]; the output array axis for patient axis a is 2 - a (array is [z, y, x]).
    src_axis_for_out = [0, 0, 0]
    for c, a in enumerate(axes):
        src_axis_for_out[2 - a] = 2 - c
    arr = np.transpose(volume.array, src_axis_for_out)
    flips = tuple(out for out in range(3) if signs[2 - src_axis_for_out[out]] < 0)
    if flips:
        arr = np.flip(arr, axis=flips)
    # Output voxel (0,0,0) is the source voxel at the low end of every flipped axis' far side.
    corner_kji = [0.0, 0.0, 0.0]
    for out in flips:
        src = src_axis_for_out[out]
        corner_kji[src] = g.shape[src] - 1
    origin = tuple(float(v) for v in g.index_to_patient(corner_kji))
    spacing_xyz = [0.0, 0.0, 0.0]
    for c, a in enumerate(axes):
        spacing_xyz[a] = g.spacing[c]
    return Volume(arr, Geometry(tuple(int(n) for n in arr.shape), origin, tuple(spacing_xyz), IDENTITY))


def _resample_oblique(volume: Volume) -> Volume:
    import SimpleITK as sitk

    g = volume.geometry
    m = g.matrix
    nk, nj, ni = g.shape
    corners = np.array([[k, j, i] for k in (0, nk - 1) for j in (0, nj - 1) for i in (0, ni - 1)], float)
    pts = g.index_to_patient(corners)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    # Each patient axis takes the spacing of the index axis closest to it.
    spacing = tuple(float(g.spacing[int(np.argmax(np.abs(m[a, :])))]) for a in range(3))
    size = [int(np.floor((hi[a] - lo[a]) / spacing[a] + 1e-6)) + 1 for a in range(3)]
    src = g.to_sitk(volume.array)
    out = sitk.Resample(
        src, size, sitk.Transform(), sitk.sitkLinear, tuple(float(v) for v in lo), spacing, IDENTITY,
        float(volume.array.min()), src.GetPixelID(),
    )
    arr = sitk.GetArrayFromImage(out)
    return Volume(arr, Geometry(tuple(int(n) for n in arr.shape), tuple(float(v) for v in lo), spacing, IDENTITY))
