"""The encoders on the project's chest CT phantom: its ground-truth anatomy as a handler result."""
from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from node.encoders import encode_all
from node.phantom import generate_ct
from node.results import Code, LabelMap, Measurement, MeasurementGroup, MeasurementReport, Segment
from node.volume import load_series
from tests.encoder_sources import context, dice, external_truth, rasterise_even_odd, save_valid

ANAT = Code("91723000", "SCT", "Anatomical Structure")
STRUCTURES = (  # label, phantom truth names, segment
    (1, None, Segment(1, "Body", ANAT, Code("38266002", "SCT", "Entire body"), tg263="External",
                      rt_roi_type="EXTERNAL", color=(0, 200, 0))),
    (2, ("lung_left",), Segment(2, "Left lung", ANAT, Code("44029006", "SCT", "Left lung"), tg263="Lung_L")),
    (3, ("lung_right",), Segment(3, "Right lung", ANAT, Code("3341006", "SCT", "Right lung"), tg263="Lung_R")),
    (4, ("airway",), Segment(4, "Airway", ANAT, Code("89187006", "SCT", "Airway structure"), tg263="Airway")),
    (5, ("cortical_bone", "cancellous_bone"), Segment(5, "Bone", ANAT, Code("272673000", "SCT", "Bone"),
                                                      tg263="Bone")),
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    study = generate_ct(tmp_path_factory.mktemp("phantom") / "ct", rows=96, cols=96, slices=24,
                        pixel_spacing=3.5, slice_thickness=10.0)
    series = load_series(sorted(study.dicom_dir.glob("*")))
    truth_img = sitk.ReadImage(str(study.labels))
    g = series.volume.geometry
    assert np.allclose(truth_img.GetOrigin(), g.origin) and np.allclose(truth_img.GetDirection(), g.direction)
    truth = sitk.GetArrayFromImage(truth_img)
    table = {t["name"]: t for t in json.loads(study.label_table_path.read_text())["labels"]}
    labels = np.zeros(truth.shape, dtype=np.uint8)
    labels[np.isin(truth, [t["value"] for t in table.values() if t["part_of_patient"]])] = 1
    for label, names, _ in STRUCTURES[1:]:
        labels[np.isin(truth, [table[n]["value"] for n in names])] = label
    lm = LabelMap(series.series_uid, g, labels, tuple(s for _, _, s in STRUCTURES), description="CT anatomy")
    return series, lm


def test_phantom_anatomy_encodes_and_round_trips(phantom, tmp_path):
    series, lm = phantom
    voxel_ml = float(np.prod(lm.geometry.spacing)) / 1000
    volume = {s.label: float((lm.labels == s.label).sum()) * voxel_ml for s in lm.segments}
    report = MeasurementReport(series.series_uid, "ct-anatomy", (
        MeasurementGroup("Lung_L", "lung_left", (Measurement("volume", volume[2], "ml"),), segment_label=2),
        MeasurementGroup("Lung_R", "lung_right", (Measurement("volume", volume[3], "ml"),), segment_label=3),
    ))
    seg, rt, sr = encode_all([report, lm], {series.series_uid: series}, context())
    seg_path, rt_path, sr_path = (save_valid(d, tmp_path) for d in (seg, rt, sr))

    decoded = hd.seg.segread(seg_path).get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in series.datasets],
        segment_numbers=[1, 2, 3, 4, 5], combine_segments=True)
    assert np.array_equal(decoded, lm.labels)  # segment numbers equal the labels here

    rtds = pydicom.dcmread(rt_path)
    g = lm.geometry
    index = {d.SOPInstanceUID: k for k, d in enumerate(series.datasets)}
    for roi in rtds.ROIContourSequence:
        segment = lm.segments[roi.ReferencedROINumber - 1]
        per_slice: dict[int, list] = {}
        for c in roi.ContourSequence:
            kji = g.patient_to_index(np.array([float(v) for v in c.ContourData]).reshape(-1, 3))
            per_slice.setdefault(index[c.ContourImageSequence[0].ReferencedSOPInstanceUID], []).append(kji[:, 1:])
        back = np.zeros(g.shape, dtype=bool)
        for k, polys in per_slice.items():
            back[k] = rasterise_even_odd(polys, g.shape[1:])
        truth = (external_truth(lm.labels, segment) if segment.rt_roi_type == "EXTERNAL"
                 else lm.labels == segment.label)
        assert dice(back, truth) >= 0.98, segment.name

    groups = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    assert [g.get_measurements()[0].value for g in groups] == pytest.approx([volume[2], volume[3]], rel=1e-12)
