"""`ct-anatomy`: body outline (External), lungs, airway and skeleton of a CT, with volumes and HU.

Classical image processing (``node.anatomy``), so it runs on any chest or abdomen CT without a
model. It returns one label map (SEG, and RTSTRUCT with TG-263 names for a planning system) and
a TID 1500 measurement report (template ``sr_templates/ct-anatomy.yaml``). It refuses what it
cannot answer for, before doing any work: localizers, single images, non-axial, too short or
irregular volumes, and pixel data that is not in Hounsfield units. What it does answer is checked
as anatomy before it is returned (``node.anatomy.plausibility``: continuity along the body, area
jumps, lung ratio and share of the chest, lung-density tissue left in no structure, bone, airway);
each failed check is a ``QualityFlag``, and the rule refuses the job or delivers with the warning.

Lung_L/Lung_R are the aerated lung with what it encloses and any dense (consolidated) lung within
its outline, as TG-263 defines the lung organ at risk: free pleural effusion and bowel gas under
a hemidiaphragm stay out of them (both are in the External). Limitations: fluid lying flat under
a lung base on thick slices (subpulmonic effusion) can be taken for consolidated lung, and where
an effusion meets consolidation of its density the boundary between them is not found.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from node.anatomy import AIRWAY, BONE, EXTERNAL, LUNG_L, LUNG_R, Anatomy, segment_anatomy
from node.anatomy.plausibility import check_anatomy
from node.handler_api import ArtefactKey, Handler, HandlerInput, HandlerRefusal, register
from node.results import SCT, Code, LabelMap, Measurement, MeasurementGroup, MeasurementReport, Segment
from node.volume import SeriesData, lookup

ANATOMICAL_STRUCTURE = Code("123037004", SCT, "Anatomical Structure")
TISSUE = Code("85756007", SCT, "Tissue")

# label -> (segment, SR finding key); the label map's values are node.anatomy's labels.
SEGMENTS: dict[int, tuple[Segment, str]] = {
    EXTERNAL: (Segment(EXTERNAL, "External", ANATOMICAL_STRUCTURE, Code("38266002", SCT, "Entire body"),
                       tg263="External", color=(0, 200, 0), rt_roi_type="EXTERNAL"), "external"),
    LUNG_L: (Segment(LUNG_L, "Lung_L", ANATOMICAL_STRUCTURE, Code("44029006", SCT, "Left lung"),
                     tg263="Lung_L", color=(80, 160, 255)), "lung_left"),
    LUNG_R: (Segment(LUNG_R, "Lung_R", ANATOMICAL_STRUCTURE, Code("3341006", SCT, "Right lung"),
                     tg263="Lung_R", color=(255, 160, 80)), "lung_right"),
    # Trachea plus main bronchi: TG-263 names them separately (Trachea, Bronchus_Main) and has no
    # name for both, so the structure keeps its own name rather than a TG-263 one that is wrong.
    AIRWAY: (Segment(AIRWAY, "Airway", ANATOMICAL_STRUCTURE, Code("110726009", SCT, "Trachea and bronchus"),
                     tg263=None, color=(255, 240, 120)), "airway"),
    BONE: (Segment(BONE, "Bone", TISSUE, Code("272673000", SCT, "Bone"), tg263="Bone", color=(241, 214, 145)),
           "bone"),
}

MIN_SLICES = 5
MAX_OBLIQUITY_DEG = 30.0  # slice normal within this angle of the patient's long axis
BELOW_WATER_HU = -50.0  # fat, lung and air: every CT of a body in HU has some
SOFT_TISSUE_RANGE_HU = (-200.0, 200.0)


class CTAnatomyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    airway: bool = Field(True, description="segment the trachea and main bronchi")
    bone: bool = Field(True, description="segment the skeleton")
    working_resolution_mm: float = Field(2.0, ge=1.0, le=4.0,
                                         description="voxel size (mm) of the grid the topology is decided on")
    # A Label Map SEG is a quarter of the binary one's size for ct-anatomy and quicker to make and
    # store (docs/benchmarks.md seg-formats); "binary" is for viewers and PACS that predate
    # Label Map Segmentation Storage (DICOM 2024; OHIF 3.11+ shows it, DCMTK 3.6.7 does not know it).
    seg_format: Literal["labelmap", "binary"] = Field(
        "labelmap", description="SEG format: 'labelmap' (organs as one Label Map SEG, JPEG-LS, plus a binary SEG of "
                                "the External) or 'binary' (one binary SEG of every structure)")


def lung_artefact(working_resolution_mm: float = 2.0, airway: bool = True) -> ArtefactKey:
    """The key of ct-anatomy's lungs (LUNG_L/LUNG_R labels, 0 elsewhere) of a series, for other
    handlers (lung-nodules) to reuse: the lungs depend on the working grid and on whether the
    airway was carved out of them (not on the bone, segmented for the chest wall either way)."""
    return ArtefactKey("ct-anatomy", CTAnatomy.version, "lung-labels",
                       f"working_resolution_mm={working_resolution_mm:g};airway={airway}")


def _refuse_header(series: SeriesData) -> None:
    for ds in series.datasets:
        image_type = "\\".join(str(v).upper() for v in (ds.get("ImageType") or []))
        if "LOCALIZER" in image_type.split("\\"):
            raise HandlerRefusal(f"series {series.series_uid} is a localizer (ImageType {image_type}), "
                                 "not an axial CT volume")
    first = series.first
    if first.get("RescaleIntercept") is None or first.get("RescaleSlope") is None:
        raise HandlerRefusal(f"series {series.series_uid} has no RescaleIntercept/RescaleSlope: "
                             "its pixel values are not known to be Hounsfield units")
    rescale_type = str(first.get("RescaleType", "HU") or "HU").upper()
    if rescale_type != "HU":
        raise HandlerRefusal(f"series {series.series_uid} has RescaleType {rescale_type!r}, not HU")
    geometry = series.volume.geometry
    if geometry.shape[0] < MIN_SLICES:
        raise HandlerRefusal(f"series {series.series_uid} has {geometry.shape[0]} slices; "
                             f"ct-anatomy needs a volume of at least {MIN_SLICES}")
    tilt = math.degrees(math.acos(min(1.0, abs(float(geometry.normal[2])))))
    if tilt > MAX_OBLIQUITY_DEG:
        raise HandlerRefusal(f"series {series.series_uid} is not axial: its slices are {tilt:.0f} degrees "
                             f"from axial (at most {MAX_OBLIQUITY_DEG:.0f})")


def _refuse_pixels(series: SeriesData) -> None:
    """Values must look like HU: every CT of a body holds soft tissue near 0 and fat, lung or air
    below it; stored values without their rescale (air at 0, tissue near 1000) hold nothing below."""
    sample = series.volume.array[::4, ::4, ::4]
    below = np.mean(sample < BELOW_WATER_HU)
    soft = np.mean((sample >= SOFT_TISSUE_RANGE_HU[0]) & (sample <= SOFT_TISSUE_RANGE_HU[1]))
    if below < 0.01 or soft < 0.01:
        lo, hi = SOFT_TISSUE_RANGE_HU
        raise HandlerRefusal(
            f"series {series.series_uid}: pixel values do not look like Hounsfield units ({below:.1%} of voxels "
            f"below {BELOW_WATER_HU:.0f} HU, {soft:.1%} at soft tissue {lo:.0f}..{hi:.0f} HU; both should be > 1%)")


def _group(label: int, anatomy: Anatomy) -> MeasurementGroup:
    segment, finding = SEGMENTS[label]
    s = anatomy.stats[label]
    return MeasurementGroup(segment.name, finding, (
        Measurement("volume", round(s.volume_ml, 3), "ml"),
        Measurement("hu_mean", round(s.hu_mean, 2), "[hnsf'U]"),
        Measurement("hu_sd", round(s.hu_sd, 2), "[hnsf'U]"),
    ), segment_label=label)


@register
class CTAnatomy(Handler):
    name = "ct-anatomy"
    version = "1.0.0"
    description = "Body outline (External), left/right lung, trachea and main bronchi, bone; volumes and HU"
    modalities = frozenset({"CT"})
    needs_volume = True
    Params = CTAnatomyParams
    sr_template = "ct-anatomy"
    reports_findings = frozenset({finding for _, finding in SEGMENTS.values()} | {"lungs"})
    reports_measurements = frozenset({"volume", "hu_mean", "hu_sd", "left_right_ratio"})

    def check(self, inp: HandlerInput) -> None:
        super().check(inp)
        _refuse_header(inp.primary)
        _refuse_pixels(inp.primary)  # a strided sample: cheap next to the work it spares

    def artefacts(self, inp: HandlerInput, outputs: list) -> dict:
        p: CTAnatomyParams = self.params
        label_map = next((o for o in outputs if isinstance(o, LabelMap)), None)
        if label_map is None:
            return {}
        # every byte value (256 at least): a byte label map is then looked up two values at a time
        keep = np.zeros(max(int(label_map.labels.max(initial=0)) + 1, LUNG_L + 1, LUNG_R + 1, 256), dtype=np.uint8)
        keep[LUNG_L], keep[LUNG_R] = LUNG_L, LUNG_R  # the lungs' labels, every other label 0
        return {lung_artefact(p.working_resolution_mm, p.airway): lookup(keep, label_map.labels)}

    def run(self, inp: HandlerInput, progress) -> list:
        p: CTAnatomyParams = self.params
        series = inp.primary
        progress(0.05, "segmenting")
        anatomy = segment_anatomy(series.volume, working_mm=p.working_resolution_mm, airway=p.airway, bone=p.bone)
        if anatomy.stats[EXTERNAL].voxels == 0:
            raise HandlerRefusal(f"series {series.series_uid}: no body found (is this a CT of a patient?)")
        progress(0.9, "measuring")
        # One exclusive label map: the External label holds the body voxels no organ took, and the
        # External segment includes the organs' labels, so it is the whole body (SEG) as its code
        # says; the RTSTRUCT encoder fills what an EXTERNAL encloses. The report's External
        # volume and HU are those of the whole body too.
        present = [lab for lab in SEGMENTS if anatomy.stats[lab].voxels > 0]
        segments = [SEGMENTS[lab][0] for lab in present]
        if EXTERNAL in present:
            organs = tuple(lab for lab in present if lab != EXTERNAL)
            segments[present.index(EXTERNAL)] = dataclasses.replace(SEGMENTS[EXTERNAL][0], includes=organs)
        label_map = LabelMap(series.series_uid, series.volume.geometry, anatomy.labels, tuple(segments),
                             description="CT anatomy", seg_format=p.seg_format)
        groups = [_group(lab, anatomy) for lab in present]
        left, right = anatomy.stats[LUNG_L].volume_ml, anatomy.stats[LUNG_R].volume_ml
        if left > 0 and right > 0:
            groups.insert(present.index(LUNG_R) + 1, MeasurementGroup("Lungs", "lungs", (
                Measurement("volume", round(left + right, 3), "ml"),
                Measurement("left_right_ratio", round(left / right, 4), "1"),
            )))
        report = MeasurementReport(series.series_uid, "ct-anatomy", tuple(groups), title="CT anatomy measurements")
        progress(0.95, "checking plausibility")
        flags = check_anatomy(anatomy.labels, series.volume.array, series.volume.geometry,
                              {lab: seg.name for lab, (seg, _) in SEGMENTS.items()}, EXTERNAL, (LUNG_L, LUNG_R),
                              AIRWAY if p.airway else None, BONE if p.bone else None)
        progress(1.0, f"{len(present)} structures" + (f", {len(flags)} failed check(s)" if flags else ""))
        return [label_map, report, *flags]
