"""Image registration (SimpleITK): rigid, affine and deformable (demons), CT-CT and MR-CT.

The small API other stages use::

    outcome = register(fixed, moving, method="rigid" | "affine" | "deformable",
                       metric="auto", fixed_mask=None, moving_mask=None)
    outcome.moving_to_fixed(points_mm)   # e.g. a prior's nodule → the current study
    outcome.fixed_to_moving(points_mm)
    outcome.resample(moving)             # the moving volume on the fixed grid

``fixed`` and ``moving`` are ``node.volume.Volume``; points are DICOM patient coordinates (LPS,
mm) of each volume's own Frame of Reference. ``check_pair`` refuses pairs that cannot be
registered (different patients, a 2-D image, a localizer) with a ``RegistrationRefusal`` naming why;
``ct_mask(volume, "body" | "lungs")`` gives the masks that keep the CT table out of the metric;
``surface_distance(a, b, geom)`` the residual distance between two masks where no landmarks exist;
``working_volume(volume)`` the ~2 mm grid registration runs on (masks computed there are cheap).
"""
from node.registration.checks import RegistrationRefusal, check_pair, metric_for
from node.registration.engine import METHODS, METRICS, register
from node.registration.masks import MASKS, ct_mask
from node.registration.outcome import JacobianStats, RegistrationOutcome
from node.registration.residual import SurfaceDistance, surface_distance
from node.registration.working import WORKING_MM, working_mask, working_volume

__all__ = ["register", "RegistrationOutcome", "RegistrationRefusal", "JacobianStats", "check_pair", "metric_for",
           "METHODS", "METRICS", "MASKS", "ct_mask", "SurfaceDistance",
           "surface_distance", "WORKING_MM", "working_volume", "working_mask"]
