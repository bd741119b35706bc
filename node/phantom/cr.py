"""A PA chest radiograph (CR Image Storage) of the chest phantom: one image, no volume.

It projects the same anatomy as the CT (arms raised, no nodules) through the water-path model of
``projection`` and maps path length to a film-like grey scale: lungs dark, bone bright.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from node.phantom.checks import fail, float_in, int_in
from node.phantom.chest import ChestAnatomy, CodeBook
from node.phantom.dicom_io import TRANSFER_SYNTAXES, InstanceWriter, SeriesInfo, StudyInfo, set_pixel_format, \
    series_template
from node.phantom.grid import Pose
from node.phantom.projection import resample, water_path
from node.phantom.study import MANIFEST, PhantomStudy, prepare_out_dir, write_json
from node.uids import derived_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_TOP_Z = 180.0  # patient z of the top row: the neck, above the lung apices
_PATH_SCALE = 200.0  # mm of water that bring the grey scale to 1 - 1/e of full


def generate_cr(out_dir: str | Path, *, seed: int = 0, rows: int = 1024, cols: int = 1024,
                pixel_spacing: float = 0.4, noise: float = 8.0, transfer_syntax: str = "explicit") -> PhantomStudy:
    """Write one PA chest radiograph to ``out_dir`` (rows run head to feet, columns toward patient left)."""
    seed = int_in("seed", seed, 0, 2**31 - 1)
    rows, cols = int_in("rows", rows, 16, 4096), int_in("cols", cols, 16, 4096)
    pixel_spacing = float_in("pixel_spacing", pixel_spacing, 0.05, 2.0)
    noise = float_in("noise", noise, 0.0, 200.0)
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise fail("transfer_syntax", f"one of {list(TRANSFER_SYNTAXES)}", transfer_syntax)
    out = prepare_out_dir(out_dir)
    half = cols * pixel_spacing / 2
    z_lo = _TOP_Z - rows * pixel_spacing
    path, xs, zs = water_path(ChestAnatomy(arms="up"), CodeBook(contrast=False), Pose(), (-half, half),
                              (z_lo, _TOP_Z))
    out_xs = -half + (np.arange(cols) + 0.5) * pixel_spacing
    out_zs = _TOP_Z - (np.arange(rows) + 0.5) * pixel_spacing
    grey = 4095.0 * (1.0 - np.exp(-resample(path, xs, zs, out_xs, out_zs) / _PATH_SCALE))
    grey += np.random.default_rng([seed, 5]).normal(0.0, noise, grey.shape).astype(np.float32)
    pixels = np.clip(np.rint(grey), 0, 4095).astype(np.uint16)

    identity = ("hilum-phantom", "cr", seed, rows, cols, pixel_spacing, noise)
    study_uid, series_uid = derived_uid(*identity, "study"), derived_uid(*identity, "series")
    study = StudyInfo(patient_name="PHANTOM^CHEST", patient_id=f"PHANTOM-{seed:06d}", study_uid=study_uid,
                      study_date="20240205", study_time="081000", accession=f"PHCR{seed % 10**8:08d}",
                      study_id="1", description="XR CHEST PA")
    ds = series_template(study, SeriesInfo(modality="CR", sop_class_uid=CR_IMAGE_STORAGE, series_uid=series_uid,
                                           series_number=1, description="CHEST PA", body_part="CHEST"))
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.InstanceNumber = 1
    ds.KVP = 120
    ds.DistanceSourceToDetector = 1800
    ds.ExposureTime = 10
    ds.XRayTubeCurrent = 250
    ds.ImagerPixelSpacing = [pixel_spacing, pixel_spacing]
    set_pixel_format(ds, rows, cols, bits_stored=12)
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    writer = InstanceWriter(ds, out / "dicom", transfer_syntax, per_instance=("SOPInstanceUID",))
    name = writer.write(pixels, derived_uid(series_uid, "instance", 0)).name
    write_json(out / MANIFEST, {
        "generator": "hilum phantom", "modality": "CR", "seed": seed,
        "options": {"rows": rows, "cols": cols, "pixel_spacing": pixel_spacing, "noise": noise,
                    "transfer_syntax": transfer_syntax},
        "patient": {"name": study.patient_name, "id": study.patient_id},
        "study_uid": study_uid, "study_date": study.study_date, "series_uid": series_uid,
        "frame_of_reference_uid": None,
        "image": {"top_row_z_mm": _TOP_Z, "first_column_x_mm": float(out_xs[0]),
                  "columns_toward": "patient left (+x)", "rows_toward": "feet (-z)"},
        "series": {series_uid: [name]},
        "files": {"dicom": "dicom"},
    })
    return PhantomStudy.open(out)
