"""A brain-like T1-weighted MR phantom (axial, 256×256×60 by default) with truth labels.

Nested ellipsoids make scalp, skull, CSF, grey and white matter, with lateral ventricles, a
midline fissure and the eyes in front (so orientation can be checked). Signal is T1-like (fat and
white matter bright, CSF and bone dark) with Rician noise, as magnitude images have.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from node.phantom.canvas import Canvas, Region
from node.phantom.checks import fail, float_in, int_in
from node.phantom.dicom_io import TRANSFER_SYNTAXES, InstanceWriter, SeriesInfo, StudyInfo, set_pixel_format, \
    series_template
from node.phantom.grid import Pose, axial_geometry, render_codes
from node.phantom.study import MANIFEST, PhantomStudy, geometry_json, prepare_out_dir, write_json, write_labels
from node.uids import derived_uid
from node.volume import Geometry

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
BACKGROUND, SCALP, SKULL, CSF, GREY_MATTER, WHITE_MATTER, VENTRICLES, EYES = range(8)
MR_LABELS = (
    (BACKGROUND, "background", 0.0, "air"),
    (SCALP, "scalp", 900.0, "skin and subcutaneous fat"),
    (SKULL, "skull", 100.0, "cortical bone of the skull"),
    (CSF, "csf", 250.0, "extra-axial CSF and the midline fissure"),
    (GREY_MATTER, "grey_matter", 450.0, "cortical grey matter"),
    (WHITE_MATTER, "white_matter", 800.0, "white matter"),
    (VENTRICLES, "ventricles", 250.0, "lateral ventricles (CSF)"),
    (EYES, "eyes", 300.0, "globes, anterior (-y) and low"),
)
_SHELLS = (  # label, semi-axes (x, y, z) mm of nested ellipsoids centred at the origin
    (SCALP, (72.0, 92.0, 95.0)),
    (SKULL, (66.0, 86.0, 89.0)),
    (CSF, (60.0, 80.0, 83.0)),
    (GREY_MATTER, (57.0, 77.0, 80.0)),
    (WHITE_MATTER, (52.0, 72.0, 74.0)),
)


def _head_painter(canvas: Canvas):
    def paint(z: float, into: np.ndarray, clear: bool = True) -> None:
        canvas.start(z, into, clear)
        for label, semi in _SHELLS:
            canvas.paint(label, canvas.ellipsoid((0.0, 0.0, 0.0), semi))
        if z > 5.0:  # interhemispheric fissure
            reg = canvas.ellipsoid((0.0, 0.0, 0.0), _SHELLS[3][1])
            if reg is not None:
                reg.mask &= (np.abs(canvas.xs[reg.cols]) < 1.5)[None, :]
                canvas.paint(CSF, Region(reg.rows, reg.cols, reg.mask))
        for s in (-1.0, 1.0):
            canvas.paint(VENTRICLES, canvas.ellipsoid((s * 9.0, -5.0, 12.0), (6.0, 24.0, 11.0)))
            canvas.paint(EYES, canvas.sphere((s * 30.0, -75.0, -20.0), 11.0))

    return paint


def mr_label_table() -> dict:
    return {
        "coordinate_system": "DICOM LPS: +x = patient left, +y = posterior, +z = head",
        "labels": [{"value": v, "name": n, "signal": s, "description": d} for v, n, s, d in MR_LABELS],
        "groups": {"brain": [GREY_MATTER, WHITE_MATTER, VENTRICLES], "csf": [CSF, VENTRICLES]},
    }


def mr_series_template(study: StudyInfo, series_uid: str, frame_uid: str, geom: Geometry) -> Dataset:
    """The T1 spin-echo axial series' constant attributes on ``geom`` (12-bit unsigned pixels)."""
    ds = series_template(study, SeriesInfo(
        modality="MR", sop_class_uid=MR_IMAGE_STORAGE, series_uid=series_uid, series_number=3,
        description="T1 SE AXIAL", body_part="HEAD", frame_of_reference_uid=frame_uid, patient_position="HFS",
    ))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "se2d1"
    ds.SliceThickness = geom.spacing[2]
    ds.SpacingBetweenSlices = geom.spacing[2]
    ds.RepetitionTime = 500
    ds.EchoTime = 15
    ds.EchoTrainLength = 1
    ds.NumberOfAverages = 1
    ds.ImagingFrequency = 63.87
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = 1.5
    ds.FlipAngle = 90
    ds.PixelSpacing = [geom.spacing[1], geom.spacing[0]]
    ds.ImageOrientationPatient = geom.image_orientation
    set_pixel_format(ds, geom.shape[1], geom.shape[2], bits_stored=12)
    ds.WindowCenter = 500
    ds.WindowWidth = 1000
    return ds


def generate_mr(out_dir: str | Path, *, seed: int = 0, rows: int = 256, cols: int = 256, slices: int = 60,
                pixel_spacing: float = 0.9375, slice_thickness: float = 2.5, noise: float = 12.0,
                transfer_syntax: str = "explicit") -> PhantomStudy:
    """Write a T1-weighted brain MR series (MR Image Storage) with truth labels to ``out_dir``."""
    seed = int_in("seed", seed, 0, 2**31 - 1)
    rows, cols = int_in("rows", rows, 16, 1024), int_in("cols", cols, 16, 1024)
    slices = int_in("slices", slices, 1, 1000)
    pixel_spacing = float_in("pixel_spacing", pixel_spacing, 0.0, 10.0, lo_open=True)
    slice_thickness = float_in("slice_thickness", slice_thickness, 0.0, 20.0, lo_open=True)
    noise = float_in("noise", noise, 0.0, 200.0)
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise fail("transfer_syntax", f"one of {list(TRANSFER_SYNTAXES)}", transfer_syntax)
    out = prepare_out_dir(out_dir)
    geom = axial_geometry(rows=rows, cols=cols, slices=slices, pixel_spacing=pixel_spacing,
                          slice_spacing=slice_thickness, center_z=10.0)
    labels = render_codes(_head_painter, geom, Pose())
    signal = np.array([s for _, _, s, _ in MR_LABELS], np.float32)
    rng = np.random.default_rng([seed, 4])

    identity = ("hilum-phantom", "mr", seed, rows, cols, slices, pixel_spacing, slice_thickness, noise)
    study_uid, series_uid = derived_uid(*identity, "study"), derived_uid(*identity, "series")
    study = StudyInfo(patient_name="PHANTOM^HEAD", patient_id=f"PHANTOM-MR-{seed:06d}", study_uid=study_uid,
                      study_date="20240311", study_time="141500", accession=f"PHMR{seed % 10**8:08d}",
                      study_id="1", description="MR BRAIN")
    frame_uid = derived_uid(*identity, "frame-of-reference")
    ds = mr_series_template(study, series_uid, frame_uid, geom)
    writer = InstanceWriter(ds, out / "dicom", transfer_syntax)
    names = []
    for k in range(slices):
        clean = np.take(signal, labels[k])
        # Magnitude of a complex signal with Gaussian noise in both channels: Rician, as MR is.
        re = clean + rng.normal(0.0, noise, clean.shape).astype(np.float32)
        im = rng.normal(0.0, noise, clean.shape).astype(np.float32)
        pixels = np.clip(np.rint(np.hypot(re, im)), 0, 4095).astype(np.uint16)
        pos = geom.slice_position(k)
        names.append(writer.write(pixels, derived_uid(series_uid, "instance", k), InstanceNumber=k + 1,
                                  ImagePositionPatient=[round(v, 4) for v in pos],
                                  SliceLocation=round(pos[2], 4)).name)
    write_labels(out / "labels.nii.gz", labels, geom)
    write_json(out / "labels.json", mr_label_table())
    write_json(out / MANIFEST, {
        "generator": "hilum phantom", "modality": "MR", "seed": seed,
        "options": {"rows": rows, "cols": cols, "slices": slices, "pixel_spacing": pixel_spacing,
                    "slice_thickness": slice_thickness, "noise": noise, "transfer_syntax": transfer_syntax},
        "patient": {"name": study.patient_name, "id": study.patient_id},
        "study_uid": study_uid, "study_date": study.study_date, "series_uid": series_uid,
        "frame_of_reference_uid": frame_uid, "geometry": geometry_json(geom),
        "series": {series_uid: names},
        "files": {"dicom": "dicom", "labels": "labels.nii.gz", "label_table": "labels.json"},
    })
    return PhantomStudy.open(out)
