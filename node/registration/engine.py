"""The registration itself: SimpleITK's ImageRegistrationMethod, one stage per transform kind.

Rigid (Euler3D, 6 DOF) starts from identity when both series share a Frame of Reference (the
scanner already put them in one space) and otherwise from the centres of mass of the foreground
(Otsu), which works across modalities where raw intensity moments do not (CT air is -1000).
Affine (12 DOF) continues from the rigid result; deformable (cubic B-spline free-form deformation,
control points refined coarse to fine) continues from rigid or affine.

Every stage is multi-resolution. Levels are chosen in millimetres, not shrink factors, so a
0.7 mm CT and a 3 mm phantom get comparable work; the metric is sampled (a fixed number of points
per level), which is what keeps a 512x512x300 pair in seconds. The B-spline is kept from folding by
its coarse control-point spacing; its Jacobian determinant is measured afterwards and folding is
reported as a warning (the handler refuses to deliver a folded field).
"""
from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk

from node.registration.checks import RegistrationRefusal
from node.registration.outcome import JacobianStats, RegistrationOutcome, affine_to_matrix, reference_image
from node.volume import Geometry, Volume

__all__ = ["register", "METHODS", "METRICS"]

METHODS = ("rigid", "affine", "deformable")
METRICS = ("mean_squares", "correlation", "mattes")
MIN_OVERLAP = 0.25  # below this, the result is refused: most of the fixed anatomy has no partner
_LINEAR_LEVELS_MM = (8.0, 4.0, 2.0)  # working voxel size per level
_BSPLINE_LEVELS_MM = (8.0, 4.0, 2.0)
_LINEAR_SAMPLES = 60_000  # metric points per level
_BSPLINE_SAMPLES = 120_000


def _image(volume: Volume) -> sitk.Image:
    return volume.geometry.to_sitk(np.ascontiguousarray(volume.array, dtype=np.float32))


def _mask(mask: np.ndarray | None, geom: Geometry, what: str) -> sitk.Image | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != geom.shape:
        raise ValueError(f"{what} has shape {mask.shape}, its image {geom.shape}")
    if not mask.any():
        raise RegistrationRefusal(f"{what} is empty: nothing to register")
    return geom.to_sitk(np.ascontiguousarray(mask, dtype=np.uint8))


def _foreground(img: sitk.Image) -> sitk.Image:
    """Otsu foreground (the body in CT, the head in MR): what centres of mass and overlap look at."""
    return sitk.OtsuThreshold(img, 0, 1)


def _centre(fg: sitk.Image) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(fg)
    if 1 not in stats.GetLabels():
        raise RegistrationRefusal("an image has no foreground (blank or constant): nothing to register")
    return np.asarray(stats.GetCentroid(1), float)


def _shrink_factors(geom: Geometry, levels_mm) -> tuple[list[int], list[float]]:
    """Uniform shrink factor per level reaching about ``levels_mm``, and matching smoothing (voxels)."""
    finest = min(geom.spacing)
    shortest = min(geom.shape)
    factors = []
    for mm in levels_mm:
        f = max(1, int(round(mm / finest)))
        f = min(f, max(1, shortest // 8))  # keep at least ~8 voxels along the thinnest axis
        factors.append(f)
    sigmas = [max(0.0, (f - 1) / 2.0) for f in factors]
    return factors, sigmas


def _sampling(geom: Geometry, factors: list[int], samples: int) -> list[float]:
    voxels = int(np.prod(geom.shape))
    return [float(min(1.0, samples / max(1, voxels / f**3))) for f in factors]


def _method(metric: str, fixed_mask, moving_mask, geom: Geometry, levels_mm, samples: int,
            seed: int) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    if metric == "mean_squares":
        reg.SetMetricAsMeanSquares()
    elif metric == "correlation":
        reg.SetMetricAsCorrelation()
    elif metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    else:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    factors, sigmas = _shrink_factors(geom, levels_mm)
    reg.SetShrinkFactorsPerLevel(factors)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(_sampling(geom, factors, samples), seed)
    reg.SetInterpolator(sitk.sitkLinear)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    return reg


def _run(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.Transform, int]:
    count = [0]
    reg.AddCommand(sitk.sitkIterationEvent, lambda: count.__setitem__(0, count[0] + 1))
    try:
        tx = reg.Execute(fixed, moving)
    except RuntimeError as exc:  # e.g. "All samples map outside moving image buffer"
        raise RegistrationRefusal(f"registration failed: the images do not overlap enough "
                                  f"({str(exc).strip().splitlines()[-1][:200]})") from None
    return tx, count[0]


def _linear_stage(kind: str, fixed, moving, initial: sitk.Transform, metric: str, masks, geom: Geometry,
                  seed: int) -> tuple[sitk.Transform, float, int]:
    reg = _method(metric, *masks, geom, _LINEAR_LEVELS_MM, _LINEAR_SAMPLES, seed)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    if kind == "affine":
        start = sitk.AffineTransform(3)
        m = affine_to_matrix(initial)
        start.SetCenter(initial.GetCenter() if hasattr(initial, "GetCenter") else (0, 0, 0))
        c = np.asarray(start.GetCenter())
        start.SetMatrix(tuple(m[:3, :3].ravel()))
        start.SetTranslation(tuple(m[:3, 3] - c + m[:3, :3] @ c))
    else:
        start = initial
    reg.SetInitialTransform(start, inPlace=False)
    tx, n = _run(reg, fixed, moving)
    return tx, float(reg.GetMetricValue()), n


def _bspline_stage(fixed, moving, linear: sitk.Transform, metric: str, masks, geom: Geometry,
                   grid_spacing_mm: float, seed: int) -> tuple[sitk.BSplineTransform, float, int]:
    levels = len(_BSPLINE_LEVELS_MM)
    coarse = grid_spacing_mm * 2 ** (levels - 1)
    extent = np.asarray(geom.shape[::-1]) * np.asarray(geom.spacing)
    mesh = [max(1, int(round(e / coarse))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, 3)
    reg = _method(metric, *masks, geom, _BSPLINE_LEVELS_MM, _BSPLINE_SAMPLES, seed)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=400,
                             costFunctionConvergenceFactor=1e7)
    reg.SetMovingInitialTransform(linear)
    reg.SetInitialTransformAsBSpline(bspline, inPlace=True, scaleFactors=[2**i for i in range(levels)])
    _, n = _run(reg, fixed, moving)
    return bspline, float(reg.GetMetricValue()), n


def _jacobian(bspline: sitk.BSplineTransform, linear: np.ndarray, geom: Geometry, mask) -> JacobianStats:
    """det of the whole mapping's Jacobian on a grid of at most ~64^3 points of the fixed image."""
    step = max(1, int(np.ceil(max(geom.shape) / 64)))
    size = [max(2, int(np.ceil(n / step))) for n in geom.shape[::-1]]
    spacing = [s * step for s in geom.spacing]
    field_img = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, size, geom.origin, spacing,
                                                  geom.direction)
    det = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field_img))
    det = det * float(np.linalg.det(linear[:3, :3]))
    return JacobianStats(minimum=float(det.min()), maximum=float(det.max()),
                         fraction_below_half=float(np.mean(det < 0.5)), fraction_folded=float(np.mean(det <= 0)))


def _overlap(fixed_fg: sitk.Image, tx: sitk.Transform, moving: Geometry) -> float:
    """Fraction of the fixed foreground whose points land inside the moving image."""
    fg = sitk.GetArrayViewFromImage(fixed_fg)
    kji = np.argwhere(fg > 0)
    if len(kji) == 0:
        return 0.0
    rng = np.random.default_rng(0)
    kji = kji[rng.choice(len(kji), size=min(len(kji), 4000), replace=False)]
    spacing = np.asarray(fixed_fg.GetSpacing())
    direction = np.asarray(fixed_fg.GetDirection()).reshape(3, 3)
    pts = np.asarray(fixed_fg.GetOrigin()) + (kji[:, ::-1] * spacing) @ direction.T
    mapped = np.array([tx.TransformPoint(tuple(float(v) for v in p)) for p in pts])
    idx = moving.patient_to_index(mapped)
    inside = np.all((idx > -0.5) & (idx < np.asarray(moving.shape) - 0.5), axis=1)
    return float(inside.mean())


def register(fixed: Volume, moving: Volume, method: str = "rigid", *, metric: str = "mean_squares",
             fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
             same_frame: bool = False, grid_spacing_mm: float = 30.0, seed: int = 1) -> RegistrationOutcome:
    """Register ``moving`` to ``fixed``; the outcome maps points both ways and resamples.

    ``same_frame``: both share a Frame of Reference, so the search starts from identity.
    ``fixed_mask``/``moving_mask``: boolean arrays on each grid restricting where the metric looks
    (e.g. the body or the lungs, so that the table and the arms do not drive the result).
    ``grid_spacing_mm``: B-spline control point spacing at the finest level (deformable only).
    Raises RegistrationRefusal when the images do not overlap after registration.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    t0 = time.perf_counter()
    fimg, mimg = _image(fixed), _image(moving)
    masks = (_mask(fixed_mask, fixed.geometry, "fixed_mask"), _mask(moving_mask, moving.geometry, "moving_mask"))
    fixed_fg = masks[0] if masks[0] is not None else _foreground(fimg)
    moving_fg = masks[1] if masks[1] is not None else _foreground(mimg)
    centre = _centre(fixed_fg)
    start = sitk.Euler3DTransform()
    start.SetCenter(tuple(centre))
    if not same_frame:
        start.SetTranslation(tuple(_centre(moving_fg) - centre))
    elif _overlap(fixed_fg, start, moving.geometry) < MIN_OVERLAP:
        raise RegistrationRefusal("no overlap: the two series share a Frame of Reference but cover different "
                                  "parts of the patient")
    rigid, value, n = _linear_stage("rigid", fimg, mimg, start, metric, masks, fixed.geometry, seed)
    iterations = [n]
    linear = rigid
    if method == "affine":
        linear, value, n = _linear_stage("affine", fimg, mimg, rigid, metric, masks, fixed.geometry, seed)
        iterations.append(n)
    matrix = affine_to_matrix(linear)
    bspline = jac = None
    warnings: list[str] = []
    if method == "deformable":
        bspline, value, n = _bspline_stage(fimg, mimg, linear, metric, masks, fixed.geometry, grid_spacing_mm, seed)
        iterations.append(n)
        jac = _jacobian(bspline, matrix, fixed.geometry, masks[0])
        if jac.folded:
            warnings.append(f"the deformation folds: Jacobian determinant down to {jac.minimum:.3f} "
                            f"({jac.fraction_folded:.2%} of the grid <= 0)")
    outcome = RegistrationOutcome(
        method=method, metric=metric, metric_value=value, fixed_geometry=fixed.geometry,
        moving_geometry=moving.geometry, linear=matrix, bspline=bspline, jacobian=jac,
        iterations=tuple(iterations), elapsed_s=0.0, warnings=tuple(warnings),
    )
    overlap = _overlap(fixed_fg, outcome.transform, moving.geometry)
    if overlap < MIN_OVERLAP:
        raise RegistrationRefusal(f"no overlap: after registration only {overlap:.0%} of the fixed image's "
                                  f"foreground lies inside the moving image (at least {MIN_OVERLAP:.0%} needed)")
    return RegistrationOutcome(
        method=method, metric=metric, metric_value=value, fixed_geometry=fixed.geometry,
        moving_geometry=moving.geometry, linear=matrix, bspline=bspline, jacobian=jac, overlap=overlap,
        iterations=tuple(iterations), elapsed_s=time.perf_counter() - t0, warnings=tuple(warnings),
    )
