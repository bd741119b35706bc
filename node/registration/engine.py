"""The registration itself: SimpleITK's ImageRegistrationMethod, one stage per transform kind.

Rigid (Euler3D, 6 DOF) starts from identity when both series share a Frame of Reference (the
scanner already put them in one space) and otherwise from the centres of mass of the foreground
(Otsu), which works across modalities where raw intensity moments do not (CT air is -1000).
Affine (12 DOF) continues from the rigid result. Deformable (CT-CT) continues from rigid or
affine with SimpleITK's diffeomorphic demons, coarse to fine: a B-spline free-form deformation
through ITK's v4 registration framework was measured at seconds per iteration on a small phantom,
demons at a fraction of a second.

Both images are first block-averaged to about 2 mm (``node.registration.working``): no stage looks
finer than that, and building pyramids, gradients and masks from the full 512x512x300 images was
most of the time. Every linear stage is multi-resolution on that grid. Levels are chosen in
millimetres, not shrink factors, so a 0.7 mm CT and a 3 mm phantom get comparable work; the metric
is sampled (a fixed number of points per level). The demons field and each update
are smoothed (regularised) at every iteration; the Jacobian determinant is measured afterwards and
folding is reported as a warning (the handler refuses to deliver a folded field).
"""
from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk

from node.registration.checks import RegistrationRefusal
from node.registration.outcome import JacobianStats, RegistrationOutcome, affine_to_matrix, reference_image
from node.registration.working import working_geometry, working_mask, working_volume
from node.volume import Geometry, Volume

__all__ = ["register", "METHODS", "METRICS"]

METHODS = ("rigid", "affine", "deformable")
METRICS = ("mean_squares", "correlation", "mattes")
MIN_OVERLAP = 0.25  # below this, the result is refused: most of the fixed anatomy has no partner
# How well the images match after registration (CT-CT, mean squares only): the RMS difference of
# the fixed image and the moving one carried onto it, in HU, over the fixed mask where the moving
# image exists (``_match_rms``). The overlap and mask checks cannot see a wrong match: two slabs of
# different anatomy (upper chest, abdomen) start from aligned centres of mass, which makes the
# overlap, and a left-right mirrored image has body masks as symmetric as the true one's.
# Calibrated on the phantom pairs (2.8-4 mm pixels, 3-7.5 mm slices; tests/test_registration_plausibility.py):
# true registrations 8-84 HU with body masks (rigid, affine, unmasked, deformable 17; the upper end
# is breathing of 10-15 mm left to a rigid result), 88-114 HU rigid with lung masks and that
# breathing; wrong ones 196-266 HU mirrored, 243-398 HU for disjoint slabs (body or lung masks).
# Above MATCH_REFUSE_RMS_HU (1.4 times the worst true, 0.8 times the best wrong) the result is
# refused as another anatomy; between the two it is delivered with a QualityFlag
# (``RegistrationOutcome.cautions``): a large breathing or contrast difference left to a rigid result.
MATCH_FLAG_RMS_HU = 120.0
MATCH_REFUSE_RMS_HU = 160.0
# Different Frames of Reference: the moving image's z-extent carried into the fixed space should
# cover at least this share of the shorter of the two, or most of one series has no partner.
MIN_Z_SHARE = 0.5
_LINEAR_LEVELS_MM = (8.0, 4.0, 2.0)  # working voxel size per level
# Working voxel size per level (never finer than the image). The finest level is the 2 mm working
# grid itself: on the 512x512x300 breathing pair (session 8) 2.5 -> 2.0 mm took the overall TRE from
# 0.449 to 0.418 mm (elastix 0.24; the points outside the lungs 0.38 -> 0.32 mm), lung bases 0.52
# both, Jacobian min 0.45 -> 0.54, for 34 -> 50 s of demons CPU. (6, 3, 2) mm gave 0.393 mm at 77 s.
_DEMONS_LEVELS_MM = (8.0, 4.0, 2.0)
_DEMONS_ITERATIONS = (30, 30, 30)  # per level
# Each update is smoothed too (fluid regularisation, voxels of the level's grid), besides the
# field (elastic, ``smoothing_mm``). Chosen on the two 128x128x60 breathing pairs (the bench's
# quick one and the test's): update 2 voxels with the field at 2 mm and 30 iterations per level
# took the lung-base TRE from 0.97 / 0.95 mm (field at 4 mm alone, 40 iterations) to 0.71 /
# 0.73 mm, Jacobian min 0.59 / 0.68, with a little less CPU (33 s against 36 s).
_DEMONS_UPDATE_SIGMA = 2.0
# Each update exponentiated to first order (the update itself) instead of by scaling and squaring:
# the steps are capped at half a voxel, where the two agree. Full-size breathing pair (2.5 mm field):
# demons CPU 64 -> 34 s, lung-base TRE 0.517 mm both, Jacobian min 0.42 -> 0.43.
_DEMONS_FIRST_ORDER_EXP = True
# Metric points per level. Mutual information estimates a joint histogram and needs more: with
# 20 000 the full-size MR-CT TRE rose from 0.10 to 0.32 mm, while the CT-CT rigid one stayed
# 0.06-0.07 mm at half the CPU (2.1 against 4.0 s on the 512x512x300 pair's 2 mm working grid).
_LINEAR_SAMPLES = {"mean_squares": 20_000, "correlation": 20_000, "mattes": 60_000}


def _image(volume: Volume) -> sitk.Image:
    return volume.geometry.to_sitk(np.ascontiguousarray(volume.array, dtype=np.float32))


def _mask(mask: np.ndarray | None, geom: Geometry, what: str) -> sitk.Image | None:
    """``mask`` (on ``geom``, its image's own grid) on that image's working grid."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != geom.shape:
        raise ValueError(f"{what} has shape {mask.shape}, its image {geom.shape}")
    work = working_mask(mask, geom)
    if not work.any():
        raise RegistrationRefusal(f"{what} is empty: nothing to register")
    return working_geometry(geom).to_sitk(np.ascontiguousarray(work, dtype=np.uint8))


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
    if metric != "mattes":
        # Gradients at the sample points only: by default ITK filters the whole images for them at
        # every level (three double vectors per voxel), which on a 512x512x300 CT pair took most of
        # two minutes and gigabytes for 60 000 samples. Not for mutual information: without the
        # filter's smoothing the MR-CT TRE rose from 0.12 to 0.75 mm (1 mm head pair).
        reg.MetricUseFixedImageGradientFilterOff()
        reg.MetricUseMovingImageGradientFilterOff()
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
    reg = _method(metric, *masks, geom, _LINEAR_LEVELS_MM, _LINEAR_SAMPLES[metric], seed)
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


def _level_grid(geom: Geometry, mm: float) -> Geometry:
    """``geom`` coarsened to about ``mm`` per voxel (never finer than it is), same extent."""
    factors = [max(1.0, mm / sp) for sp in geom.spacing]
    shape = tuple(max(4, int(round(n / f))) for n, f in zip(geom.shape, factors[::-1]))
    spacing = tuple(sp * n / m for sp, n, m in zip(geom.spacing, geom.shape[::-1], shape[::-1]))
    # Same physical extent: the first voxel centre moves by half the difference of the spacings.
    shift = (np.asarray(spacing) - np.asarray(geom.spacing)) / 2
    origin = tuple(np.asarray(geom.origin) + geom.matrix @ shift)
    return Geometry(shape=shape, origin=origin, spacing=spacing, direction=geom.direction)


def _on(img: sitk.Image, geom: Geometry, tx: sitk.Transform, fill: float, sigma_mm: float) -> sitk.Image:
    if sigma_mm > 0:
        img = sitk.SmoothingRecursiveGaussian(img, sigma_mm)
    return sitk.Resample(img, reference_image(geom), tx, sitk.sitkLinear, fill, sitk.sitkFloat32)


def _mask_box(mask: sitk.Image, geom: Geometry, margin_mm: float) -> Geometry:
    """The part of ``geom`` (``mask``'s grid) holding the mask's bounding box grown by ``margin_mm``."""
    on = sitk.GetArrayViewFromImage(mask)
    lo, hi = [], []
    for axis in range(3):
        nz = np.nonzero(on.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        grow = int(np.ceil(margin_mm / geom.spacing[2 - axis]))  # spacing is (x, y, z), axes (k, j, i)
        lo.append(max(0, int(nz[0]) - grow))
        hi.append(min(geom.shape[axis], int(nz[-1]) + 1 + grow))
    origin = tuple(float(v) for v in geom.index_to_patient(lo))
    return Geometry(shape=tuple(h - l for l, h in zip(lo, hi)), origin=origin, spacing=geom.spacing,
                    direction=geom.direction)


def _demons_stage(fixed, moving, linear: sitk.Transform, masks, geom: Geometry,
                  smoothing_mm: float, finest_mm: float) -> tuple[np.ndarray, Geometry, float, int]:
    """Diffeomorphic demons, coarse to fine, on the moving image pre-aligned by ``linear``, over
    ``geom`` (the fixed working grid, or the part of it ``register``'s ``deform_within_mm`` keeps).

    Demons compares intensities directly, so it is for one modality (CT-CT). Outside the masks
    both images are set to air, so the table and what lies outside the body exert no force.
    The displacement field is smoothed at every iteration (``smoothing_mm``), which with the
    diffeomorphic update keeps it from folding; its Jacobian is still measured afterwards.
    """
    fill = -1024.0
    fixed = sitk.Clamp(fixed, sitk.sitkFloat32, fill, 1500.0)
    moving = sitk.Clamp(moving, sitk.sitkFloat32, fill, 1500.0)
    if masks[0] is not None:
        fixed = sitk.Mask(fixed, masks[0], outsideValue=fill)
    if masks[1] is not None:
        moving = sitk.Mask(moving, masks[1], outsideValue=fill)
    field = None
    total = 0
    for mm, iterations in zip((*_DEMONS_LEVELS_MM[:-1], finest_mm), _DEMONS_ITERATIONS):
        level = _level_grid(geom, mm)
        sigma = mm / 2 if mm > min(geom.spacing) else 0.0
        f = _on(fixed, level, sitk.Transform(3, sitk.sitkIdentity), fill, sigma)
        m = _on(moving, level, linear, fill, sigma)
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetUseFirstOrderExp(_DEMONS_FIRST_ORDER_EXP)
        demons.SetNumberOfIterations(iterations)
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(max(1.0, smoothing_mm / min(level.spacing)))
        demons.SetSmoothUpdateField(True)
        demons.SetUpdateFieldStandardDeviations(_DEMONS_UPDATE_SIGMA)
        demons.SetMaximumUpdateStepLength(0.5 * min(level.spacing))
        count = [0]
        demons.AddCommand(sitk.sitkIterationEvent, lambda: count.__setitem__(0, count[0] + 1))
        if field is None:
            field = demons.Execute(f, m)
        else:
            start = sitk.Resample(field, reference_image(level), sitk.Transform(3, sitk.sitkIdentity),
                                  sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
            field = demons.Execute(f, m, start)
        total += count[0]
        value = float(demons.GetMetric())
    # The field is in the working grid's physical space: the fixed image's.
    return sitk.GetArrayFromImage(field).astype(np.float32), level, value, total


def _jacobian(field: np.ndarray, grid: Geometry, linear: np.ndarray) -> JacobianStats:
    """det of the whole mapping's Jacobian (the field's times the linear part's) on the field's grid."""
    img = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    img.SetOrigin(grid.origin)
    img.SetSpacing(grid.spacing)
    img.SetDirection(grid.direction)
    det = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(img))
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


def _match_rms(fimg: sitk.Image, mimg: sitk.Image, tx: sitk.Transform, region: sitk.Image) -> float | None:
    """RMS difference (HU) of ``fimg`` and ``mimg`` carried onto it by ``tx``, over ``region`` (on
    ``fimg``'s grid) where the moving image exists; None with too few voxels to say.

    Values clamped to -1024..1500 HU: metal and the padding below air would dominate the squares.
    The fixed region alone (not also the moving mask carried over): where both masks must hold,
    mismatched tissue drops out of the comparison (lung against lung only, say), hiding the error.
    """
    warped = sitk.Resample(mimg, fimg, tx, sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
    w = sitk.GetArrayViewFromImage(warped)
    sel = (sitk.GetArrayViewFromImage(region) > 0) & np.isfinite(w)
    if sel.sum() < 100:
        return None
    diff = np.clip(sitk.GetArrayViewFromImage(fimg)[sel], -1024, 1500) - np.clip(w[sel], -1024, 1500)
    return float(np.sqrt(np.mean(np.square(diff, dtype=np.float64))))


def _z_share(fixed: Geometry, moving: Geometry, linear: np.ndarray) -> float:
    """Share of the shorter z-extent (patient z, fixed space) that the fixed image and the moving
    image carried into fixed space (its corners through ``linear``'s inverse) have in common."""
    def corners(g: Geometry) -> np.ndarray:
        n = np.asarray(g.shape) - 1
        return g.index_to_patient(np.array([[k, j, i] for k in (0, n[0]) for j in (0, n[1]) for i in (0, n[2])]))
    inv = np.linalg.inv(linear)
    zf = corners(fixed)[:, 2]
    zm = (corners(moving) @ inv[:3, :3].T + inv[:3, 3])[:, 2]
    shorter = min(np.ptp(zf), np.ptp(zm))
    common = min(zf.max(), zm.max()) - max(zf.min(), zm.min())
    return float(np.clip(common / shorter, 0.0, 1.0)) if shorter > 0 else 1.0


def register(fixed: Volume, moving: Volume, method: str = "rigid", *, metric: str = "mean_squares",
             fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
             same_frame: bool = False, smoothing_mm: float = 2.0, finest_mm: float = _DEMONS_LEVELS_MM[-1],
             deform_within_mm: float | None = None, seed: int = 1) -> RegistrationOutcome:
    """Register ``moving`` to ``fixed``; the outcome maps points both ways and resamples.

    ``same_frame``: both share a Frame of Reference, so the search starts from identity.
    ``fixed_mask``/``moving_mask``: boolean arrays on each grid restricting where the metric looks
    (e.g. the body or the lungs, so that the table and the arms do not drive the result).
    Volumes may be given at full size or already on their working grid (``working_volume``, with
    masks computed there: the cheaper way at 512x512x300); the outcome maps the patient coordinates
    of the volumes given and resamples onto the fixed one's grid.
    ``smoothing_mm``: Gaussian regularisation of the demons field (deformable only; CT-CT), with
    each update smoothed as well (``_DEMONS_UPDATE_SIGMA``). 2 mm with the update smoothing was
    chosen on the breathing phantoms against elastix (see _DEMONS_UPDATE_SIGMA); 4 mm without it
    left 0.25 mm more TRE in the lung bases. Folding seen earlier (Jacobian min 0.06) came from a
    table in one body mask, not from too little smoothing (node.registration.masks).
    ``finest_mm``: the demons' finest working voxel size (deformable only). 2 mm is the library's
    accuracy; a caller that only needs to land within a few mm (nodule matching) may stop at 2.5 mm
    for a third less CPU (see _DEMONS_LEVELS_MM).
    ``deform_within_mm``: the demons (deformable only, with a ``fixed_mask``) run on the fixed
    mask's bounding box grown by this margin instead of the whole fixed image, and the deformation
    covers only that box: beyond it points move by the linear stage alone (a step at the box's
    edge). For callers that map points within the mask only (nodule follow-up maps the lungs' nodules):
    the lungs' box is about half of a chest CT's field of view, and so are the demons' memory and time.
    Raises RegistrationRefusal when the images do not overlap after registration, or (CT-CT) match
    so badly that the result is another anatomy (``MATCH_REFUSE_RMS_HU``); a poor match, or series
    sharing little of their z-extent, is delivered with ``RegistrationOutcome.cautions``.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    if not _DEMONS_LEVELS_MM[-2] > finest_mm >= 1.0:
        raise ValueError(f"finest_mm {finest_mm} must be >= 1 and below the next level ({_DEMONS_LEVELS_MM[-2]} mm)")
    if deform_within_mm is not None and (method != "deformable" or fixed_mask is None or deform_within_mm < 0):
        raise ValueError("deform_within_mm needs method deformable, a fixed_mask and a margin of 0 mm or more")
    if method == "deformable" and metric != "mean_squares":
        raise RegistrationRefusal("deformable registration compares intensities (demons): it is for one modality "
                                  f"(CT-CT, metric mean_squares), not {metric}")
    t0 = time.perf_counter()
    # Everything below runs on the working grids (about 2 mm, node.registration.working); the
    # outcome maps the patient coordinates of the volumes given and resamples them at full size.
    full_fixed, full_moving = fixed.geometry, moving.geometry
    fixed, moving = working_volume(fixed), working_volume(moving)
    fimg, mimg = _image(fixed), _image(moving)
    masks = (_mask(fixed_mask, full_fixed, "fixed_mask"), _mask(moving_mask, full_moving, "moving_mask"))
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
    field = grid = jac = None
    warnings: list[str] = []
    if method == "deformable":
        where = fixed.geometry if deform_within_mm is None else _mask_box(masks[0], fixed.geometry, deform_within_mm)
        field, grid, _, n = _demons_stage(fimg, mimg, linear, masks, where, smoothing_mm, finest_mm)
        iterations.append(n)
        jac = _jacobian(field, grid, matrix)
        if jac.folded:
            warnings.append(f"the deformation folds: Jacobian determinant down to {jac.minimum:.3f} "
                            f"({jac.fraction_folded:.2%} of the grid <= 0)")
    outcome = RegistrationOutcome(
        method=method, metric=metric, metric_value=value, fixed_geometry=full_fixed,
        moving_geometry=full_moving, linear=matrix, deformation=field, deformation_grid=grid,
        jacobian=jac, iterations=tuple(iterations), elapsed_s=0.0, warnings=tuple(warnings),
    )
    overlap = _overlap(fixed_fg, outcome.transform, moving.geometry)
    if overlap < MIN_OVERLAP:
        raise RegistrationRefusal(f"no overlap: after registration only {overlap:.0%} of the fixed image's "
                                  f"foreground lies inside the moving image (at least {MIN_OVERLAP:.0%} needed)")
    # Plausibility: does the result match? (see MATCH_REFUSE_RMS_HU)
    cautions: list[tuple[str, str]] = []
    rms = None
    if metric == "mean_squares":
        region = masks[0]
        if region is None:  # Otsu's foreground holds the CT table, which stays put while the patient moves
            from node.registration.masks import ct_mask  # heavy: only here
            body = ct_mask(fixed, "body")
            region = fixed.geometry.to_sitk(body.astype(np.uint8)) if body is not None and body.any() else fixed_fg
        rms = _match_rms(fimg, mimg, outcome.transform, region)
        if rms is not None and rms > MATCH_REFUSE_RMS_HU:
            raise RegistrationRefusal(
                f"the images do not match after registration: RMS difference {rms:.0f} HU within the fixed mask "
                f"(above {MATCH_REFUSE_RMS_HU:.0f} HU; a true CT-CT match is well below {MATCH_FLAG_RMS_HU:.0f}): "
                "different anatomy (no region in common) or a mirrored image")
        if rms is not None and rms > MATCH_FLAG_RMS_HU:
            cautions.append(("registration_match", f"RMS difference {rms:.0f} HU within the fixed mask after "
                             f"registration, above {MATCH_FLAG_RMS_HU:.0f} HU: the images match poorly"))
    # Mutual information and correlation (MR-CT, MR-MR) have no such absolute scale, and no
    # normalised measure separated true from wrong poses on the MR-CT head phantoms: normalised MI
    # was 1.19-1.21 true, 1.15-1.19 for a 17 degree rotation or a registered mirrored head, so
    # those pairs get only the overlap and z-extent checks.
    if not same_frame:
        share = _z_share(full_fixed, full_moving, matrix)
        if share < MIN_Z_SHARE:
            cautions.append(("registration_z_extent", f"after registration the two series share {share:.0%} of "
                             f"the shorter one's z-extent (at least {MIN_Z_SHARE:.0%} expected): most of one "
                             "series has no partner in the other"))
    return RegistrationOutcome(
        method=method, metric=metric, metric_value=value, fixed_geometry=full_fixed,
        moving_geometry=full_moving, linear=matrix, deformation=field, deformation_grid=grid,
        jacobian=jac, overlap=overlap, match_rms_hu=rms, cautions=tuple(cautions),
        iterations=tuple(iterations), elapsed_s=time.perf_counter() - t0, warnings=tuple(warnings),
    )
