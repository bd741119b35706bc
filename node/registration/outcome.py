"""What a registration found: the transform, how well it fitted, and how to use it.

ITK's convention is kept inside: ``transform`` maps a point of the *fixed* image's patient space to
the *moving* image's (that is what resampling the moving image onto the fixed grid needs). DICOM's
Spatial Registration goes the other way (from the moving series' Frame of Reference into the
fixed one's), hence ``matrix_moving_to_fixed``; and a follow-up maps a prior's finding into the
current study with ``moving_to_fixed``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import SimpleITK as sitk

from node.volume import Geometry, Volume

__all__ = ["RegistrationOutcome", "JacobianStats", "affine_to_matrix", "reference_image"]


@dataclass(frozen=True)
class JacobianStats:
    """Determinant of the mapping's Jacobian over the fixed grid: < 0 is folding, < 0.5 a strong squeeze."""

    minimum: float
    maximum: float
    fraction_below_half: float
    fraction_folded: float  # determinant <= 0

    @property
    def folded(self) -> bool:
        return self.minimum <= 0.0


def affine_to_matrix(tx: sitk.Transform) -> np.ndarray:
    """The 4x4 homogeneous matrix of a linear SimpleITK transform (Euler3D, Affine, Translation...)."""
    if tx.GetName() == "CompositeTransform":
        tx = sitk.CompositeTransform(tx)
        if tx.GetNumberOfTransforms() != 1:
            raise ValueError("affine_to_matrix: a composite of several transforms is not one matrix")
        tx = tx.GetNthTransform(0)
    tx = tx.Downcast()
    a = np.asarray(tx.GetMatrix(), float).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), float)
    t = np.asarray(tx.GetTranslation(), float)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = t + c - a @ c
    return m


_SLAB = 32  # output slices per resampling call (RegistrationOutcome.resample)


def reference_image(geom: Geometry) -> sitk.Image:
    """An empty image on ``geom``: what resampling takes as its output grid."""
    img = sitk.Image([int(v) for v in geom.shape[::-1]], sitk.sitkUInt8)
    img.SetOrigin(geom.origin)
    img.SetSpacing(geom.spacing)
    img.SetDirection(geom.direction)
    return img


@dataclass(frozen=True, eq=False)
class RegistrationOutcome:
    method: str  # rigid | affine | deformable
    metric: str  # mean_squares | correlation | mattes
    metric_value: float  # final value on the finest level (lower is better for all three)
    fixed_geometry: Geometry
    moving_geometry: Geometry
    linear: np.ndarray  # 4x4, fixed → moving (for deformable: the rigid/affine part it started from)
    # Deformable only: displacement u (slices, rows, cols, 3) mm on ``deformation_grid`` (fixed space),
    # applied before ``linear``: fixed point x → linear(x + u(x)).
    deformation: np.ndarray | None = None
    deformation_grid: Geometry | None = None
    jacobian: JacobianStats | None = None
    overlap: float = 1.0  # fraction of the fixed foreground that maps inside the moving image
    # CT-CT: RMS difference (HU) of fixed and registered moving within the fixed mask (None otherwise)
    match_rms_hu: float | None = None
    # Plausibility checks the result failed without being refused: (check id, reason) pairs, which
    # the registration handler delivers as QualityFlags (``warnings`` are refused outright).
    cautions: tuple[tuple[str, str], ...] = field(default=())
    iterations: tuple[int, ...] = ()  # per stage
    elapsed_s: float = 0.0
    warnings: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.method not in ("rigid", "affine", "deformable"):
            raise ValueError(f"RegistrationOutcome.method {self.method!r} is not rigid, affine or deformable")
        if (self.deformation is None) != (self.method != "deformable"):
            raise ValueError("RegistrationOutcome.deformation is required for deformable and only for it")
        if self.deformation is not None and (self.deformation_grid is None
                                             or self.deformation.shape != (*self.deformation_grid.shape, 3)):
            raise ValueError("RegistrationOutcome.deformation must be (slices, rows, cols, 3) on deformation_grid")
        m = np.asarray(self.linear, float)
        if m.shape != (4, 4) or not np.allclose(m[3], [0, 0, 0, 1]) or abs(np.linalg.det(m[:3, :3])) < 1e-6:
            raise ValueError("RegistrationOutcome.linear must be an invertible 4x4 homogeneous matrix")

    # --- the transform ----------------------------------------------------------------------------

    @cached_property
    def _field_transform(self) -> sitk.DisplacementFieldTransform | None:
        if self.deformation is None:
            return None
        img = sitk.GetImageFromArray(self.deformation.astype(np.float64), isVector=True)
        img.SetOrigin(self.deformation_grid.origin)
        img.SetSpacing(self.deformation_grid.spacing)
        img.SetDirection(self.deformation_grid.direction)
        return sitk.DisplacementFieldTransform(img)

    @property
    def transform(self) -> sitk.Transform:
        """SimpleITK transform fixed → moving (``linear`` after the deformation)."""
        lin = sitk.AffineTransform(3)
        lin.SetMatrix(tuple(float(v) for v in self.linear[:3, :3].ravel()))
        lin.SetTranslation(tuple(float(v) for v in self.linear[:3, 3]))
        if self.deformation is None:
            return lin
        return sitk.CompositeTransform([lin, sitk.DisplacementFieldTransform(self._field_transform)])

    @property
    def matrix_moving_to_fixed(self) -> np.ndarray:
        """4x4 from the moving Frame of Reference into the fixed one (DICOM's registration matrix)."""
        return np.linalg.inv(self.linear)

    def _deform(self, points: np.ndarray) -> np.ndarray:
        tx = self._field_transform
        if tx is None:
            return points
        return np.array([tx.TransformPoint(tuple(float(v) for v in p)) for p in points])

    def fixed_to_moving(self, points) -> np.ndarray:
        """(..., 3) fixed-space mm → where the same anatomy lies in the moving image."""
        p = np.asarray(points, float)
        flat = self._deform(p.reshape(-1, 3))
        return (flat @ self.linear[:3, :3].T + self.linear[:3, 3]).reshape(p.shape)

    def moving_to_fixed(self, points, tolerance_mm: float = 0.01, max_iterations: int = 50) -> np.ndarray:
        """(..., 3) moving-space mm → fixed space; the deformation is inverted by fixed-point iteration
        (it converges where the field does not fold: its Jacobian is checked at registration)."""
        p = np.asarray(points, float)
        inv = self.matrix_moving_to_fixed
        y = p.reshape(-1, 3) @ inv[:3, :3].T + inv[:3, 3]
        if self.deformation is None:
            return y.reshape(p.shape)
        x = y.copy()
        for _ in range(max_iterations):
            err = self._deform(x) - y
            x -= err
            if np.max(np.linalg.norm(err, axis=1)) < tolerance_mm:
                break
        else:
            raise ValueError(f"moving_to_fixed: the deformation could not be inverted to {tolerance_mm} mm "
                             f"(residual {np.max(np.linalg.norm(err, axis=1)):.3f} mm)")
        return x.reshape(p.shape)

    # --- using it on images -----------------------------------------------------------------------

    def resample(self, moving: Volume, *, labels: bool = False, default: float | None = None,
                 onto: Geometry | None = None) -> Volume:
        """``moving`` on the fixed grid (or ``onto``): linear interpolation, nearest for ``labels``.

        Voxels mapping outside the moving image get ``default`` (the moving image's minimum: air for
        CT, background for MR). Integer data stays integer (rounded), so HU stay HU.
        """
        geom = onto or self.fixed_geometry
        src = moving.geometry.to_sitk(np.ascontiguousarray(moving.array))
        fill = float(moving.array.min()) if default is None else float(default)
        interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
        rounded = not labels and np.issubdtype(moving.array.dtype, np.integer)
        out = np.empty(geom.shape, dtype=moving.array.dtype if labels or rounded else np.float32)
        # A slab of output slices at a time: each voxel is interpolated at its own point, so the
        # values are those of one call over the whole grid, while the float copies made on the way
        # (SimpleITK's image, the rounding) stay a slab's size. Whole, a CT registration's
        # full-size resampling peaked at 1.3 GB above its two 150 MB input volumes.
        size = [int(geom.shape[2]), int(geom.shape[1])]
        for k0 in range(0, geom.shape[0], _SLAB):
            k1 = min(k0 + _SLAB, geom.shape[0])
            slab = sitk.Resample(src, [*size, k1 - k0], self.transform, interp,
                                 tuple(float(v) for v in geom.index_to_patient((k0, 0, 0))), geom.spacing,
                                 geom.direction, fill, src.GetPixelID() if labels else sitk.sitkFloat32)
            values = sitk.GetArrayViewFromImage(slab)
            if rounded:
                info = np.iinfo(moving.array.dtype)
                values = np.clip(np.rint(values), info.min, info.max)
            out[k0:k1] = values
        return Volume(out, geom)

    def displacement_field(self, geom: Geometry | None = None) -> np.ndarray:
        """(slices, rows, cols, 3) mm of the deformation alone at the voxel centres of ``geom``
        (default: the grid it was computed on); zeros for rigid and affine."""
        geom = geom or self.deformation_grid or self.fixed_geometry
        if self.deformation is None:
            return np.zeros((*geom.shape, 3), np.float32)
        field_img = sitk.TransformToDisplacementField(
            self._field_transform, sitk.sitkVectorFloat64, [int(v) for v in geom.shape[::-1]], geom.origin,
            geom.spacing, geom.direction)
        return sitk.GetArrayFromImage(field_img).astype(np.float32)
