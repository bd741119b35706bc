"""`lung-nodules`: detect, measure and follow up lung nodules on a chest CT, without a trained model.

Within the lungs of ``ct-anatomy`` (``segment_anatomy``, not a segmentation of its own; closed so
nodules on the pleura stay in) it finds candidates by a multi-scale Hessian blob measure and
measures each (``node.nodules``): a 3-D segmentation, volume, long/short axis and mean diameter in
the axial plane of maximal area, 3-D maximum diameter, mean/max HU, type (solid, part-solid with
its solid-part diameter, ground glass), side and zone, and computed size classes (published
thresholds, not a diagnosis).

With a prior study (``HandlerInput.priors``) it detects the prior's nodules the same way, registers
prior to current (``node.registration``: rigid, then deformable (demons) on the lungs), maps the prior nodules
into the current scan and matches them (``node.nodules.followup``): persistent ones report the
prior volume, change and volume doubling time; new and resolved ones are named. A nodule keeps its
Tracking UID across studies: UIDs derive from the series where the nodule was first seen and its
identifier, so the prior's own report (made by this handler) used the same ones.

Results: one SEG (a segment per nodule), a TID 1500 SR (``sr_templates/lung-nodules.yaml``, with a
key-slice outline per nodule that OHIF lists) and a key-image Secondary Capture per nodule (prior
and current side by side at follow-up). Quality flags: no lungs found; more nodules than
``max_nodules`` (reported: the largest ones; such a count means diffuse disease or a wrong input);
slices thicker than THICK_SLICE_MM (``thick_slices``); nodule-like candidates none of which could be
measured (``candidates_unmeasured``: "no nodule" is then not said silently); at follow-up, a prior
acquired differently (``followup_acquisition_mismatch``) or an interval under a week or negative
(``followup_interval``): both scans' measurements are reported, but no change call or doubling time.

``detector: <model>`` replaces the blob measure by a site's detection model (card ``task: detection``,
resolved through the model registry like a ``model:`` rule): its detections in the lungs are the
candidates, measured, followed up and encoded the same way, and every result names the model and
version (``node.nodules.model_candidates``); input outside the detector's validated domain is flagged,
the prior's too (then no change call: its nodules came from the detector outside what it was validated on).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from handlers.ct_anatomy import CTAnatomy, lung_artefact
from node.anatomy import segment_anatomy
from node.handler_api import Handler, HandlerInput, PriorStudy, register
from node.nodules.categories import volume_class
from node.models.domain import domain_flags, measure_input
from node.nodules.detect import CandidateSource, Detection, Nodule, detect_in_region, spacing_kji
from node.nodules.followup import Acquisition, Change, change, comparison_problems, interval_problem, match
from node.nodules.keyimage import key_image
from node.nodules.model_candidates import Detector, load_detector
from node.nodules.priorsr import prior_identities
from node.nodules.region import lung_region
from node.results import (SCT, Code, ImageSeries, LabelMap, Measurement, MeasurementGroup, MeasurementReport,
                          QualityFlag, Segment, TextFinding)
from node.uids import derived_uid
from node.volume import SeriesData

MORPHOLOGICALLY_ALTERED = Code("49755003", SCT, "Morphologically Altered Structure")
NODULE = Code("27925004", SCT, "Nodule")
MAX_SEGMENTS = 255


# The demons' finest level for follow-up: matching lands a nodule within a gate of 8 mm plus its
# size, so the library's last 0.03 mm of TRE (2.5 -> 2 mm level) is not worth its ~16 CPU s at full
# size; with it the follow-up exceeded the 60 s (session 9: 69.8 s).
_FOLLOWUP_FINEST_MM = 2.5
# The demons only over the current lungs' box grown by this margin (node.registration's
# deform_within_mm): nodules lie in the lungs. On the 512x512x300 bench pair the box is 60 % of the
# field of view: the registration's own peak 542 -> ~200 MB, its CPU 56 -> 37 s, the nodule centres'
# error against the phantom's truth 1.50 -> 1.71 mm mean (each nodule within 1.1 mm of before; the
# match gate is 8 mm plus the nodule's size). At 20 mm one nodule moved by 2 mm.
_FOLLOWUP_DEFORM_MARGIN_MM = 40.0
# Slices beyond this (spacing or thickness) are too thick for nodule detection and volumetry:
# Fleischner 2017 (MacMahon et al., Radiology 284:228) asks for contiguous thin sections, <= 1.5 mm
# (ideally 1 mm), for nodule size and volume; the ACR Lung-RADS v2022 / lung screening CT protocol
# for <= 2.5 mm. Observed on the phantom (5 solid 5-9 mm nodules): all 5 found at 1, 2.5 and 3 mm,
# none at 5 mm (4 candidates seen, none measurable).
THICK_SLICE_MM = 2.5


class LungNodulesParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_diameter_mm: float = Field(4.0, ge=2.0, le=30.0, description="smallest mean diameter reported")
    max_nodules: int = Field(30, ge=1, le=MAX_SEGMENTS - 1,
                             description="nodules reported at most (the largest); more raise a quality flag")
    follow_up: bool = Field(True, description="compare with the most recent prior chest CT when the job has one")
    registration: str = Field("deformable", pattern="^(rigid|deformable)$",
                              description="prior to current: rigid, or rigid then deformable (demons) on the lungs")
    detector: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,47}$",
                                 description="a detection model (card task: detection) whose detections are "
                                             "the candidates instead of the built-in blob measure")


def tracking_uid(first_series_uid: str, tracking_id: str) -> str:
    """A nodule's Tracking UID: fixed by the series it was first seen in and its identifier."""
    return derived_uid("hilum-lung-nodule", first_series_uid, tracking_id)


def _acquired(series: SeriesData) -> dt.datetime | None:
    """The study's date and time, in the order the node dates a prior (node.jobs.priors_input: StudyDate
    first, then AcquisitionDate, SeriesDate): an interval from two different tags (one study's
    acquisition, the other's study date) is off by the time between them."""
    ds = series.first
    for date_tag, time_tag in (("StudyDate", "StudyTime"), ("AcquisitionDate", "AcquisitionTime"),
                               ("SeriesDate", "SeriesTime")):
        d = str(ds.get(date_tag, "") or "")
        if len(d) == 8:
            t = (str(ds.get(time_tag, "") or "").split(".")[0] + "000000")[:6]
            try:
                return dt.datetime.strptime(d + t, "%Y%m%d%H%M%S")
            except ValueError:
                continue
    return None


def _acquisition(series: SeriesData) -> Acquisition:
    """Slice spacing (the volume's), SliceThickness and ConvolutionKernel of a series, as volumetry
    depends on them."""
    ds = series.first
    try:
        thickness = float(ds.get("SliceThickness") or 0) or None
    except (TypeError, ValueError):
        thickness = None
    kernel = ds.get("ConvolutionKernel")
    if kernel is not None and not isinstance(kernel, str):  # multi-valued (VM 1-n)
        kernel = "\\".join(str(k) for k in kernel)
    kernel = str(kernel or "").strip().upper() or None
    return Acquisition(float(series.volume.geometry.spacing[2]), thickness, kernel)


def _thick_slices(series: SeriesData) -> QualityFlag | None:
    a = _acquisition(series)
    thickest = max(a.spacing_mm, a.thickness_mm or 0.0)
    if thickest <= THICK_SLICE_MM:
        return None
    return QualityFlag("thick_slices", f"slices {a.spacing_mm:g} mm apart"
                       + (f", {a.thickness_mm:g} mm thick" if a.thickness_mm else "")
                       + f": nodule detection and volumetry need <= {THICK_SLICE_MM:g} mm (Fleischner 2017, "
                       "Lung-RADS); small nodules may be missed and volumes are unreliable")


def _prior_ct(priors: list[PriorStudy]) -> tuple[PriorStudy, SeriesData] | None:
    """The most recent prior with a CT volume (its largest such series)."""
    for prior in priors:
        volumes = [s for s in prior.series if s.modality == "CT" and s.volume is not None]
        if volumes:
            return prior, max(volumes, key=lambda s: s.volume.array.size)
    return None


def _measurements(n: Nodule) -> list[Measurement]:
    out = [
        Measurement("volume", round(n.volume_mm3, 1), "mm3"),
        Measurement("mean_diameter", round(n.mean_diameter_mm, 1), "mm"),
        Measurement("long_axis", round(n.long_axis_mm, 1), "mm"),
        Measurement("short_axis", round(n.short_axis_mm, 1), "mm"),
        Measurement("max_diameter_3d", round(n.max_diameter_3d_mm, 1), "mm"),
        Measurement("hu_mean", round(n.hu_mean, 1), "[hnsf'U]"),
        Measurement("hu_max", round(n.hu_max, 1), "[hnsf'U]"),
    ]
    if n.type == "part_solid":
        out.append(Measurement("solid_diameter", round(n.solid_diameter_mm, 1), "mm"))
    return out


def _change_measurements(prior: Nodule, c: Change | None, interval_days: float | None) -> list[Measurement]:
    """The prior's measurements, and with ``c`` the change; the interval where it is a real one."""
    out = [
        Measurement("prior_volume", round(prior.volume_mm3, 1), "mm3"),
        Measurement("prior_mean_diameter", round(prior.mean_diameter_mm, 1), "mm"),
    ]
    if c is not None:
        out += [Measurement("volume_change", round(c.volume_change_pct, 1), "%"),
                Measurement("diameter_change", round(c.diameter_change_mm, 1), "mm")]
    if interval_days is not None and interval_days > 0:
        out.append(Measurement("interval", round(interval_days, 1), "d"))
    if c is not None and c.vdt_days is not None:
        out.append(Measurement("volume_doubling_time", round(c.vdt_days, 0), "d"))
    return out


def _to_prior(outcome) -> Callable[[np.ndarray], np.ndarray]:
    """Current (fixed) positions -> where they lie in the prior (moving): (n, 3) -> (k, n, 3), by the
    registration (rigid, or rigid then deformable) and, where it deformed, by its rigid stage alone."""
    def rigid(p: np.ndarray) -> np.ndarray:
        return p @ outcome.linear[:3, :3].T + outcome.linear[:3, 3]

    def both(p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, float).reshape(-1, 3)
        if outcome.deformation is None:
            return rigid(p)[None]
        return np.stack([outcome.fixed_to_moving(p), rigid(p)])

    return both


class _Followup:
    """The prior's nodules, their identities, and the registration's mappings of current positions into
    the prior (``to_prior``: (n, 3) mm -> (k, n, 3) mm: deformably and by the rigid stage, see
    node.nodules.followup.match).

    Matching happens in the prior's frame: the registration maps the current (fixed) scan into the
    prior (moving) directly, and the way back needs the deformation inverted by iteration, which does
    not always converge where the field is steep (3.8 mm off after 50 iterations on a breathing
    follow-up: the job failed)."""

    def __init__(self, prior: PriorStudy, series: SeriesData, detection: Detection,
                 to_prior: Callable[[np.ndarray], np.ndarray], interval_days: float | None, note: str | None,
                 acquired: dt.datetime | None) -> None:
        self.prior, self.series, self.detection = prior, series, detection
        self.note = note  # how the registration fell short, when it did
        self.acquired = acquired
        self.to_prior = to_prior
        self.interval_days = interval_days
        self.no_change: list[str] = []  # why volumes are not compared (then no change call, no VDT)
        self.ids, self.uids = _identities(prior, series, detection)
        self.names = {i.tracking_id for i in prior_identities(prior.series, series)} | set(self.ids)


def _identities(prior: PriorStudy, series: SeriesData, detection: Detection) -> tuple[list[str], list[str]]:
    """Tracking id and UID of each prior nodule: from the prior's own lung-nodules report where it
    has one (the nodule whose outline lies on it), else derived as the prior's first report did."""
    known = [i for i in prior_identities(prior.series, series) if i.center_mm is not None]
    ids, uids = [], []
    used: set[str] = set()
    number = 1 + max((int(i.tracking_id.split()[-1]) for i in known if i.tracking_id.split()[-1].isdigit()),
                     default=0)
    for n in detection.nodules:
        near = sorted((float(np.linalg.norm(i.center_mm - n.center_mm)), i.tracking_id, i) for i in known
                      if i.tracking_id not in used)
        if near and near[0][0] <= max(3.0, n.mean_diameter_mm / 2 + 2.0):
            identity = near[0][2]
            used.add(identity.tracking_id)
            ids.append(identity.tracking_id)
            uids.append(identity.tracking_uid)
            continue
        name = f"Nodule {number if known else len(ids) + 1}"
        number += 1
        ids.append(name)
        uids.append(tracking_uid(series.series_uid, name))
    return ids, uids


@register
class LungNodules(Handler):
    name = "lung-nodules"
    version = "1.0.0"
    description = ("Lung nodules: detection in the ct-anatomy lungs, volume, diameters, HU, type, size class; "
                   "follow-up with a prior (matching, volume change, doubling time)")
    modalities = frozenset({"CT"})
    needs_volume = True
    Params = LungNodulesParams
    sr_template = "lung-nodules"
    reports_findings = frozenset({"nodule_left", "nodule_right"})
    model_params = frozenset({"detector"})
    reports_measurements = frozenset({
        "volume", "mean_diameter", "long_axis", "short_axis", "max_diameter_3d", "hu_mean", "hu_max",
        "solid_diameter", "prior_volume", "prior_mean_diameter", "volume_change", "diameter_change", "interval",
        "volume_doubling_time"})

    wants_artefacts = (lung_artefact(),)  # the lungs of a ct-anatomy job on the series, if the node has them

    def check(self, inp: HandlerInput) -> None:
        CTAnatomy().check(inp)  # the same refusals: a localizer, too few slices, not axial, not HU

    _detector: Detector | None = None
    _source: CandidateSource | None = None

    def _candidate_source(self, inp: HandlerInput) -> CandidateSource | None:
        """None: the blob measure. Else the detector's detections; the results then name its model."""
        if self.params.detector is None:
            return None
        if self._detector is None:
            self._detector = load_detector(inp.models.get("detector"), self.params.detector)
            self.model_name, self.model_version = self._detector.card.name, self._detector.version
            self.provenance.update(self._detector.provenance())
        return self._detector.source

    def assess_input(self, inp: HandlerInput) -> list:
        """The detector's validated domain (none without a detector: the blob measure has no training data)."""
        if self._candidate_source(inp) is None:
            return []
        return self._domain_flags(inp.primary)

    def _domain_flags(self, source: SeriesData) -> list[QualityFlag]:
        card = self._detector.card
        profile = card.validated_domain.intensity if card.validated_domain else None
        facts = measure_input(source.volume, source.datasets[0] if source.datasets else None, source.modality,
                              *((profile.body_above, profile.grid_mm) if profile else ()))
        return [replace(f, reason=f"detector {card.name} {self._detector.version}: {f.reason}")
                for f in domain_flags(card, facts)]

    def _detect(self, series: SeriesData, lungs: np.ndarray | None = None) -> Detection:
        p: LungNodulesParams = self.params
        spacing = spacing_kji(series.volume)
        if lungs is None:  # nothing kept from a ct-anatomy job (the same segmentation: lung_artefact())
            # the label volume is not kept past the closed lungs (a byte per voxel of the whole CT)
            region = lung_region(segment_anatomy(series.volume, airway=True, bone=False).labels, spacing)
        else:
            region = lung_region(lungs, spacing)
        return detect_in_region(series.volume, region, min_diameter_mm=p.min_diameter_mm,
                                max_candidates=10 * p.max_nodules + 50, source=self._source)

    def _followup(self, inp: HandlerInput, current: Detection, progress, flags: list) -> _Followup | None:
        from node.registration import RegistrationRefusal, register as register_images, working_mask, working_volume

        found = _prior_ct(inp.priors)
        if found is None:
            return None
        prior, series = found
        # The prior's nodules come from the same detector: a prior outside its validated domain (a
        # 5 mm scan, another body part) gives candidates nobody validated, and every change, "new"
        # and "resolved" is read against them. The current scan was checked before the job ran.
        prior_domain = ([replace(f, check=f"prior_{f.check}", reason=f"prior study {prior.study_uid}: {f.reason}")
                         for f in self._domain_flags(series)] if self._detector is not None else [])
        progress(0.45, "detecting in the prior")
        detection = self._detect(series)
        progress(0.6, "registering prior to current")
        # The library registers on ~2 mm working grids (node.registration.working): the lungs move
        # as a whole, and a 512x512x300 pair stays small. Given on those grids, with the lungs
        # carried there from their boxes: a full-size mask of each (a byte per voxel, 160 MB for a
        # 512x512x300 pair) was held through the whole registration. Only points are mapped, so
        # the outcome's grids need not be the full ones.
        fixed, moving = working_volume(inp.primary.volume), working_volume(series.volume)
        masks = {f"{which}_mask": working_mask(d.region.inside, volume.geometry, box=d.region.box)
                 for which, d, volume in (("fixed", current, inp.primary.volume), ("moving", detection, series.volume))}
        note = None
        try:
            deformable = self.params.registration == "deformable"
            outcome = register_images(fixed, moving, method=self.params.registration, finest_mm=_FOLLOWUP_FINEST_MM,
                                      deform_within_mm=_FOLLOWUP_DEFORM_MARGIN_MM if deformable else None, **masks)
        except RegistrationRefusal as exc:
            if self.params.registration == "rigid":
                outcome = None
            else:  # the lungs still move rigidly with the patient: a rigid mapping, said so in the report
                note = f"deformable registration failed ({exc}); the prior was registered rigidly"
                try:
                    outcome = register_images(fixed, moving, method="rigid", **masks)
                except RegistrationRefusal:
                    outcome = None
            if outcome is None:
                # Nodules without a trustworthy mapping would be matched wrongly: report the current
                # study alone and say why the comparison is missing.
                flags.append(QualityFlag("followup_registration_failed",
                                         f"prior study {prior.study_uid} could not be registered: {exc}"))
                return None
        now, then = _acquired(inp.primary), prior.acquired or _acquired(series)
        interval = (now - then).total_seconds() / 86400 if now and then else None
        fu = _Followup(prior, series, detection, _to_prior(outcome), interval, note, then)
        mismatch = comparison_problems(_acquisition(inp.primary), _acquisition(series))
        if mismatch:
            fu.no_change += mismatch
            flags.append(QualityFlag("followup_acquisition_mismatch", f"prior study {prior.study_uid} was acquired "
                                     f"differently ({'; '.join(mismatch)}): nodule volumes are not comparable, so no "
                                     "change or doubling time is reported, and a nodule called new or resolved may "
                                     "only be unseen on the other scan"))
        if prior_domain:
            fu.no_change.append("the prior study is outside the detector's validated domain")
            flags += prior_domain
        bad = interval_problem(interval) if interval is not None else None
        if bad:
            fu.no_change.append(bad)
            flags.append(QualityFlag("followup_interval", f"prior study {prior.study_uid}: {bad}; no change or "
                                     "doubling time is reported"))
        return fu

    def run(self, inp: HandlerInput, progress) -> list:
        p: LungNodulesParams = self.params
        series = inp.primary
        self._source = self._candidate_source(inp)
        lungs = inp.artefacts.get(lung_artefact())
        if lungs is not None and lungs.shape != series.volume.array.shape:
            lungs = None  # not this volume's: never trusted
        self.provenance["lungs"] = "kept from a ct-anatomy job" if lungs is not None else "segmented"
        progress(0.05, "segmenting the lungs" if lungs is None else "lungs kept from ct-anatomy")
        detection = self._detect(series, lungs)
        flags: list[QualityFlag] = []
        if not detection.region.aerated_found:
            return [TextFinding("No lungs found: no nodule analysis", series.series_uid),
                    QualityFlag("no_lungs", f"ct-anatomy found no lung in series {series.series_uid}",
                                structure="lungs")]
        nodules = detection.nodules
        thick = _thick_slices(series)
        if thick is not None:
            flags.append(thick)
        if not nodules and detection.unmeasured:
            # the detector saw nodule-like blobs the measurement could not size (thick slices, a
            # nodule in a region the measurement refuses): "no nodule found" would be a false all-clear
            flags.append(QualityFlag("candidates_unmeasured", f"{detection.unmeasured} nodule-like candidate(s) "
                                     f"of {detection.candidates} could not be measured, so none is reported; "
                                     "nodules may be present"))
        if len(nodules) > p.max_nodules:
            flags.append(QualityFlag("too_many_nodules", f"{len(nodules)} nodules found, more than max_nodules "
                                     f"{p.max_nodules}; the {p.max_nodules} largest are reported"))
            nodules = nodules[:p.max_nodules]
        fu = self._followup(inp, detection, progress, flags) if p.follow_up and inp.priors else None
        progress(0.85, "matching and encoding")
        return self._results(series, nodules, fu, flags)

    def _results(self, series: SeriesData, nodules: list[Nodule], fu: _Followup | None,
                 flags: list[QualityFlag]) -> list:
        geom = series.volume.geometry
        pairs = {}
        if fu is not None:
            diam = lambda ns: np.array([n.mean_diameter_mm for n in ns])  # noqa: E731
            cur = np.array([n.center_mm for n in nodules]).reshape(-1, 3)
            before = np.array([n.center_mm for n in fu.detection.nodules]).reshape(-1, 3)
            cur_in_prior = fu.to_prior(cur) if len(cur) else cur
            pairs = {j: i for i, j in match(before, diam(fu.detection.nodules), cur_in_prior, diam(nodules))}
        taken = fu.names if fu else set()
        next_number = 1
        labels = np.zeros(geom.shape, np.uint8)
        segments, groups, images, captions = [], [], [], []
        for j, n in enumerate(nodules):
            label = j + 1
            if j in pairs:
                i = pairs[j]
                tid, uid = fu.ids[i], fu.uids[i]
            else:
                while f"Nodule {next_number}" in taken:
                    next_number += 1
                tid = f"Nodule {next_number}"
                next_number += 1
                uid = tracking_uid(series.series_uid, tid)
            labels[n.box][n.mask & (labels[n.box] == 0)] = label
            segments.append(Segment(label, tid, MORPHOLOGICALLY_ALTERED, NODULE, color=(255, 220, 0),
                                    tracking_uid=uid))
            qualitative = [("type", n.type), ("zone", n.zone), ("size_class", n.category)]
            if n.type == "solid":
                qualitative.append(("volume_class", volume_class(n.volume_mm3)))
            measurements = _measurements(n)
            caption = f"{tid} {n.mean_diameter_mm:.1f} mm"
            image = key_image(series.volume, n.center_kji, n.mean_diameter_mm, caption)
            if fu is not None:
                if j in pairs:
                    prior = fu.detection.nodules[pairs[j]]
                    qualitative.append(("status", "persistent"))
                    if fu.no_change:  # each scan's measurements, no comparison (see the flags)
                        measurements += _change_measurements(prior, None, fu.interval_days)
                    elif fu.interval_days is not None:
                        c = change(prior.volume_mm3, prior.mean_diameter_mm, n.volume_mm3, n.mean_diameter_mm,
                                   fu.interval_days)
                        qualitative.append(("change", c.call))
                        measurements += _change_measurements(prior, c, c.interval_days)
                    before = key_image(fu.series.volume, prior.center_kji, prior.mean_diameter_mm,
                                       f"prior {prior.mean_diameter_mm:.1f} mm")
                else:
                    qualitative.append(("status", "new"))
                    before = np.zeros_like(image)
                image = np.concatenate([before, image], axis=1)
            images.append(image)
            captions.append(tid)
            groups.append(MeasurementGroup(tid, f"nodule_{n.side}", tuple(measurements), segment_label=label,
                                           qualitative=tuple(qualitative)))
        if fu is not None:
            for i, prior in enumerate(fu.detection.nodules):
                if i not in pairs.values():
                    groups.append(MeasurementGroup(
                        fu.ids[i], f"nodule_{prior.side}",
                        (Measurement("prior_volume", round(prior.volume_mm3, 1), "mm3"),
                         Measurement("prior_mean_diameter", round(prior.mean_diameter_mm, 1), "mm")),
                        qualitative=(("status", "resolved"),), tracking_uid=fu.uids[i]))
        out: list = []
        if segments:
            out.append(LabelMap(series.series_uid, geom, labels, tuple(segments), description="Lung nodules",
                                encodings=("SEG",)))
            out.append(ImageSeries(series.series_uid, "Lung nodules key images", np.stack(images),
                                   frame_labels=tuple(captions)))
        if groups:
            out.append(MeasurementReport(series.series_uid, "lung-nodules", tuple(groups), title="Lung nodules"))
        else:
            out.append(TextFinding(f"No lung nodule of {self.params.min_diameter_mm:g} mm or more found",
                                   series.series_uid))
        note = ("Size classes are computed from published thresholds (Lung-RADS v2022 size bands, Fleischner 2017 "
                "volume bands) and are not a diagnosis.")
        if self._detector is not None:
            note += (f" Candidates from the detection model {self._detector.card.name} {self._detector.version} "
                     "(not the built-in blob measure); each was measured as usual.")
        if fu is not None:
            when = fu.acquired.strftime("%Y-%m-%d") if fu.acquired else "unknown date"
            note += (f" Compared with the prior study of {when}: volume changes below "
                     "25 % are reported as stable (within repeat-scan variability), without a doubling time.")
            if fu.no_change:
                note += (" No volume change, growth call or doubling time: " + "; ".join(fu.no_change)
                         + ". The prior's measurements are given for reading, not as a comparison.")
            elif fu.interval_days is None:
                note += " The studies' acquisition dates are missing: no volume change rate or doubling time."
            if fu.note:
                note += f" Note: {fu.note}."
        out.append(TextFinding(note, series.series_uid))
        return out + flags
