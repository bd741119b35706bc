"""An independent reader of the Deformable Spatial Registration object: pydicom + NumPy only, no
Hilum code, written from PS3.3 C.20.3.1 alone so that it checks Hilum's convention rather than
repeating it.

C.20.3.1.1: a point P of the Registered RCS (the object's Frame of Reference) maps into the Source
RCS as M_post (M_pre P + D), where D is the deformation at P. C.20.3.1.2: each vector is the
deformation at the centre of its grid voxel, the grid placed in the Registered RCS by Image
Position/Orientation (Patient) and Grid Resolution; between centres the standard leaves the
interpolation to the implementation: this reader interpolates trilinearly and holds the border
vectors beyond the last centre. C.20.3.1.3: Vector Grid Data holds (x, y, z) triples, left to
right, top to bottom, plane after plane.
"""
from __future__ import annotations

import numpy as np
import pydicom


def _matrix(seq) -> np.ndarray:
    if not seq:  # absent: no matrix transformation is applied (Type 1C)
        return np.eye(4)
    return np.array([float(v) for v in seq[0].FrameOfReferenceTransformationMatrix]).reshape(4, 4)


def _trilinear(vectors: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """``vectors`` (planes, rows, columns, 3) sampled at continuous indices ``ijk`` (n, 3: i column,
    j row, k plane), clamped to the grid."""
    dims = np.array(vectors.shape[2::-1])  # columns, rows, planes
    x = np.clip(ijk, 0, dims - 1)
    lo = np.minimum(np.floor(x).astype(int), np.maximum(dims - 2, 0))
    w = x - lo
    out = np.zeros((len(ijk), 3))
    for corner in np.ndindex(2, 2, 2):
        c = np.array(corner)
        idx = np.minimum(lo + c, dims - 1)
        weight = np.prod(np.where(c == 1, w, 1 - w), axis=1)
        out += weight[:, None] * vectors[idx[:, 2], idx[:, 1], idx[:, 0]]
    return out


def map_registered_to_source(path, source_frame_uid: str, points) -> np.ndarray:
    """Where the Registered RCS points (n, 3 mm) lie in the Source RCS ``source_frame_uid``."""
    ds = pydicom.dcmread(path)
    item = next(i for i in ds.DeformableRegistrationSequence if i.SourceFrameOfReferenceUID == source_frame_uid)
    pre = _matrix(item.get("PreDeformationMatrixRegistrationSequence"))
    post = _matrix(item.get("PostDeformationMatrixRegistrationSequence"))
    p = np.asarray(points, float)
    d = np.zeros_like(p)
    grids = item.get("DeformableRegistrationGridSequence")
    if grids:
        g = grids[0]
        cols, rows, planes = (int(v) for v in g.GridDimensions)
        vectors = np.frombuffer(g.VectorGridData, "<f4").reshape(planes, rows, cols, 3).astype(float)
        origin = np.array([float(v) for v in g.ImagePositionPatient])
        iop = np.array([float(v) for v in g.ImageOrientationPatient])
        axes = np.column_stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])])  # row, column, depth cosines
        resolution = np.array([float(v) for v in g.GridResolution])
        d = _trilinear(vectors, ((p - origin) @ axes) / resolution)
    q = p @ pre[:3, :3].T + pre[:3, 3] + d
    return q @ post[:3, :3].T + post[:3, 3]
