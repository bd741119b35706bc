"""What makes a pair registrable, decided before any pixel work, and the metric each pair gets."""
from __future__ import annotations

from node.volume import SeriesData

__all__ = ["RegistrationRefusal", "check_pair", "metric_for", "is_localizer"]


class RegistrationRefusal(Exception):
    """The pair cannot be registered (or the result would be wrong); the message says why."""


def is_localizer(series: SeriesData) -> bool:
    image_type = [str(v).upper() for v in (series.first.get("ImageType") or [])]
    return "LOCALIZER" in image_type


def _patient(series: SeriesData) -> tuple[str, str]:
    ds = series.first
    return str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or "")


def check_pair(fixed: SeriesData, moving: SeriesData) -> None:
    """Refuse pairs no registration should be attempted on; RegistrationRefusal names the series."""
    for role, s in (("fixed", fixed), ("moving", moving)):
        if is_localizer(s):
            raise RegistrationRefusal(f"{role} series {s.series_uid} is a localizer (ImageType LOCALIZER): "
                                      "a projection has no 3-D geometry to register")
        if s.volume is None:
            raise RegistrationRefusal(f"{role} series {s.series_uid} is not a 3-D volume "
                                      f"({s.volume_error or 'no pixel data'}): a 2-D image cannot be registered")
        if min(s.volume.array.shape) < 4:
            raise RegistrationRefusal(f"{role} series {s.series_uid} has {s.volume.array.shape[0]} slice(s) of "
                                      f"{s.volume.array.shape[1]}x{s.volume.array.shape[2]}: too thin for 3-D registration")
    if fixed.series_uid == moving.series_uid:
        raise RegistrationRefusal(f"fixed and moving are the same series {fixed.series_uid}")
    pf, pm = _patient(fixed), _patient(moving)
    if not pf[0] or not pm[0]:
        raise RegistrationRefusal("a series has no PatientID: cannot tell that both show the same patient")
    if pf != pm:
        raise RegistrationRefusal(f"different patients: fixed series {fixed.series_uid} is PatientID {pf[0]!r}"
                                  f"{' (' + pf[1] + ')' if pf[1] else ''}, moving series {moving.series_uid} is "
                                  f"{pm[0]!r}{' (' + pm[1] + ')' if pm[1] else ''}")


def metric_for(fixed_modality: str, moving_modality: str) -> str:
    """CT-CT: mean squares (HU are calibrated); same other modality: correlation; across: Mattes MI."""
    if fixed_modality == moving_modality == "CT":
        return "mean_squares"
    if fixed_modality == moving_modality:
        return "correlation"
    return "mattes"
