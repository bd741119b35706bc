"""Training and validation cases: source volumes + ground truth on the same grid.

Three sources: generated phantoms (``node.phantom.ct.generate_ct``, truth from its label volume and
label table), a folder of DICOM series with DICOM SEG objects (read with highdicom), which is what
an annotation workflow exports, and the same pulled from a DICOMweb archive
(``node.models.dicomweb_source``); both SEG sources build their cases with ``seg_case``. Data
labels are mapped onto the model's label values by name (``TrainLabel.source``), so a data set
with more structures than the model trains on is fine.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pydicom

from node.models.card import CardError
from node.models.train_config import DataSpec, FamilySource, HeldOutSpec, PhantomSource, TrainLabel
from node.models.inference import resample
from node.volume import Geometry, SeriesData, Volume, load_series

__all__ = ["Case", "UnusableSeg", "load_cases", "phantom_cases", "dicom_seg_cases", "seg_case", "seg_label_values",
           "referenced_series_uid", "read_seg", "label_lookup", "family_cases", "family_seeds", "held_out_cases", "feet_first", "family_case"]


@dataclass(eq=False)
class Case:
    name: str
    volumes: list[Volume]  # one per input channel, the first defines the grid
    truth: np.ndarray  # uint8 model label values on volumes[0].geometry
    header: pydicom.Dataset | None = None  # the first source header, for the validated domain


def label_lookup(labels: Sequence[TrainLabel]) -> dict[str, int]:
    """Lower-cased data label name → model label value."""
    out: dict[str, int] = {}
    for lab in labels:
        for name in lab.source:
            key = name.strip().lower()
            if key in out and out[key] != lab.value:
                raise CardError(f"labels: data label {name!r} is mapped to two model labels")
            out[key] = lab.value
    return out


def _map_names(table: dict[int, str], labels: Sequence[TrainLabel], where: str,
               unpainted: Sequence[str] = ()) -> dict[int, int]:
    """data value → model value, failing when a model label (other than ``unpainted`` ones) finds no data label."""
    lookup = label_lookup(labels)
    mapping = {int(v): lookup[n.strip().lower()] for v, n in table.items() if n.strip().lower() in lookup}
    missing = [lab.name for lab in labels if lab.value not in mapping.values() and lab.name not in unpainted]
    if missing:
        raise CardError(f"labels: {where} has no data label for {missing} (its labels: {sorted(table.values())})")
    return mapping


def _remap(array: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    lut = np.zeros(max(int(array.max()), max(mapping)) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[array]


# ---------------------------------------------------------------- phantoms

def _phantom_dir(cache: Path, options: dict, seed: int) -> Path:
    key = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return cache / f"phantom-{seed}-{key}"


def phantom_cases(spec: PhantomSource, labels: Sequence[TrainLabel], cache: Path) -> list[Case]:
    """``spec.count`` phantoms (seeds spec.seed + i), generated once into ``cache`` and read back as DICOM."""
    from node.phantom.ct import generate_ct
    from node.phantom.study import PhantomStudy

    cases = []
    for i in range(spec.count):
        seed, options = spec.seed + i, spec.options(i)
        out = _phantom_dir(cache, options, seed)
        try:
            study = PhantomStudy.open(out)
        except FileNotFoundError:  # not generated yet, or an interrupted generation left a partial folder
            shutil.rmtree(out, ignore_errors=True)
            try:
                study = generate_ct(out, seed=seed, **options)
            except (TypeError, ValueError) as exc:  # the generator names the bad option
                raise CardError(f"data.phantom: {exc}") from None
        cases.append(read_phantom(study, labels, name=f"phantom-{seed}"))
    return cases


# ---------------------------------------------------------------- the randomised phantom family

def _matches(anatomy, kinds: dict[str, list]) -> bool:
    return any(getattr(anatomy, k) in values for k, values in kinds.items())


def family_seeds(seed: int, count: int, rows: list[int], slices: list[int], *, exclude: dict[str, list] | None = None,
                 only: dict[str, list] | None = None) -> list[tuple[int, int, int]]:
    """(seed, rows, slices) of ``count`` family cases from ``seed`` upward: those whose drawn anatomy
    matches ``only`` (when given) and not ``exclude``. Drawing the anatomy is cheap; nothing is painted."""
    from node.phantom.family import draw_anatomy

    out, s = [], seed
    while len(out) < count:
        rng = np.random.default_rng([s, 23])
        r, n = rows[int(rng.integers(len(rows)))], slices[int(rng.integers(len(slices)))]
        anatomy = draw_anatomy(s, r, n)
        if (only is None or _matches(anatomy, only)) and not (exclude and _matches(anatomy, exclude)):
            out.append((s, r, n))
        s += 1
        if s - seed > 200 * count + 1000:
            raise CardError(f"data.family: no {count} seeds from {seed} match {only or {}} without {exclude or {}}")
    return out


def family_case(cache: Path, seed: int, rows: int, slices: int, labels: Sequence[TrainLabel],
                unpainted: Sequence[str] = ()) -> Case:
    from node.phantom.family import generate_family_case
    from node.phantom.study import PhantomStudy

    out = cache / f"family-{seed}-{rows}x{slices}"
    try:
        study = PhantomStudy.open(out)
    except FileNotFoundError:  # not generated yet, or an interrupted generation left a partial folder
        shutil.rmtree(out, ignore_errors=True)
        try:
            study = generate_family_case(out, seed, rows=rows, slices=slices)
        except ValueError as exc:  # the generator names the bad option (e.g. too few rows for a wide body)
            raise CardError(f"data.family: case {seed} ({rows} rows, {slices} slices): {exc}") from None
    return read_phantom(study, labels, name=f"family-{seed}", unpainted=unpainted)


def feet_first(case: Case) -> Case:
    """The same anatomy written feet first: slices from the feet, columns toward the patient's right
    (what a scanner writes for an FFS patient), so the index order differs and patient space does not."""
    vol = case.volumes[0]
    g = vol.geometry
    m = g.matrix.copy()
    m[:, 0] *= -1
    m[:, 2] *= -1
    origin = g.index_to_patient([g.shape[0] - 1, 0, g.shape[2] - 1])
    geom = Geometry(shape=g.shape, origin=tuple(float(v) for v in origin), spacing=g.spacing,
                    direction=tuple(float(v) for v in m.ravel()))
    flip = (slice(None, None, -1), slice(None), slice(None, None, -1))
    header = None
    if case.header is not None:
        header = copy.deepcopy(case.header)  # Dataset.copy shares its elements with the original
        header.PatientPosition = "FFS"
    return Case(case.name + "-ffs", [Volume(np.ascontiguousarray(vol.array[flip]), geom)],
                np.ascontiguousarray(case.truth[flip]), header)


def family_cases(spec: FamilySource, labels: Sequence[TrainLabel], cache: Path) -> list[Case]:
    """``spec.count`` family cases (held-out kinds skipped), each in its drawn acquisition direction."""
    cases = []
    for seed, rows, slices in family_seeds(spec.seed, spec.count, spec.rows, spec.slices, exclude=spec.exclude):
        case = family_case(cache, seed, rows, slices, labels, spec.unpainted)
        direction = spec.directions[int(np.random.default_rng([seed, 29]).integers(len(spec.directions)))]
        cases.append(feet_first(case) if direction == "FFS" else case)
    return cases


def held_out_cases(spec: HeldOutSpec, data: DataSpec, labels: Sequence[TrainLabel], cache: Path) -> list[Case]:
    """The cases of one held-out kind (never in training)."""
    if spec.family is not None:
        rows, slices = spec.rows or data.family.rows, spec.slices or data.family.slices
        unpainted = data.family.unpainted if data.family else []
        return [family_case(cache, seed, r, n, labels, unpainted)
                for seed, r, n in family_seeds(spec.seed, spec.count, rows, slices, only=spec.family or None)]
    phantoms = PhantomSource(count=max(2, spec.count), seed=spec.seed, **spec.phantom)
    return phantom_cases(phantoms, labels, cache)[:spec.count]


def read_phantom(study, labels: Sequence[TrainLabel], name: str, unpainted: Sequence[str] = ()) -> Case:
    """One phantom study (``PhantomStudy``): its CT series and its truth mapped onto the model's labels."""
    import SimpleITK as sitk  # here, not at the top: training on a GPU machine imports this module without it

    files = [p for p in Path(study.dicom_dir).iterdir() if p.is_file()]
    series = load_series([p for p in files if _series_uid(p) == study.series_uid])
    if series.volume is None:
        raise CardError(f"data.phantom: {study.dicom_dir} is not a volume: {series.volume_error}")
    names = _label_table(json.loads(Path(study.label_table_path).read_text()))
    truth_img = sitk.ReadImage(str(study.labels))
    # The truth file carries its own geometry: resample it (nearest) onto the sorted series grid
    # rather than trusting that its slice order matches.
    tg = Geometry(shape=tuple(reversed(truth_img.GetSize())), origin=truth_img.GetOrigin(),
                  spacing=truth_img.GetSpacing(), direction=truth_img.GetDirection())
    truth = resample(sitk.GetArrayFromImage(truth_img), tg, series.volume.geometry, linear=False)
    return Case(name, [series.volume], _remap(truth, _map_names(names, labels, f"phantom {name}", unpainted)),
                series.datasets[0] if series.datasets else None)


def _series_uid(path: Path) -> str:
    ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    return str(ds.SeriesInstanceUID)


def _label_table(table) -> dict[int, str]:
    """Accept {name: value}, {value: name} or [{value|label, name}] label tables."""
    if isinstance(table, dict) and "labels" in table:
        table = table["labels"]
    if isinstance(table, list):
        return {int(e.get("value", e.get("label"))): str(e["name"]) for e in table}
    if isinstance(table, dict):
        first = next(iter(table.values()))
        if isinstance(first, (int, float)):
            return {int(v): str(k) for k, v in table.items()}
        if isinstance(first, dict):
            return {int(v.get("value", v.get("label"))): str(k) for k, v in table.items()}
        return {int(k): str(v) for k, v in table.items()}
    raise CardError(f"unrecognised label table {type(table).__name__}")


# ---------------------------------------------------------------- DICOM series + SEG

def _segment_names(seg) -> dict[int, list[str]]:
    out = {}
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        out[number] = [str(desc.segment_label), str(desc.segmented_property_type.meaning),
                       str(desc.segmented_property_type.value)]
    return out


class UnusableSeg(CardError):
    """A SEG without a segment for every model label (e.g. another model's output in an archive)."""


def referenced_series_uid(seg, what: str, field: str) -> str:
    """The source series a SEG was drawn on (its first ReferencedSeriesSequence item)."""
    refs = seg.get("ReferencedSeriesSequence")
    if not refs or "SeriesInstanceUID" not in refs[0]:
        raise CardError(f"{field}: {what} has no ReferencedSeriesSequence: its source series is unknown")
    return str(refs[0].SeriesInstanceUID)


def read_seg(ds: pydicom.Dataset, what: str, field: str, source: Callable[[], SeriesData]):
    """A highdicom Segmentation from ``ds``; ``source`` loads the SEG's source series when needed.

    OHIF's SEG export (dcmjs, OHIF 3.12) writes an empty Pixel Measures item, which highdicom refuses.
    Frames are mapped to the source by their Source Image references (``seg_case``), never by this
    geometry, so filling the missing pixel spacing and slice thickness from the source series the SEG
    was drawn on loses nothing: the label its annotator saved is used rather than refused.
    """
    import highdicom as hd

    try:
        return hd.seg.Segmentation.from_dataset(ds, copy=False)
    except (AttributeError, KeyError, ValueError, TypeError) as exc:
        first = exc
    if _complete_pixel_measures(ds, source):
        try:
            return hd.seg.Segmentation.from_dataset(ds, copy=False)
        except (AttributeError, KeyError, ValueError, TypeError) as exc:
            first = exc
    raise CardError(f"{field}: {what} is not a readable DICOM SEG: {first}") from None


def _complete_pixel_measures(ds: pydicom.Dataset, source: Callable[[], SeriesData]) -> bool:
    """Fill missing PixelSpacing/SliceThickness of the SEG's Pixel Measures items from its source series;
    False when nothing was missing (the SEG is unreadable for another reason) or the source lacks them."""
    items = [group.PixelMeasuresSequence[0] for seq in ("SharedFunctionalGroupsSequence",
                                                         "PerFrameFunctionalGroupsSequence")
             for group in ds.get(seq) or [] if group.get("PixelMeasuresSequence")]
    lacking = [item for item in items if "PixelSpacing" not in item or "SliceThickness" not in item]
    if not lacking:
        return False
    series = source()
    first = series.datasets[0] if series.datasets else None
    if first is None or "PixelSpacing" not in first or int(first.get("Rows", 0)) != int(ds.Rows) \
            or int(first.get("Columns", 0)) != int(ds.Columns):
        return False
    thickness = first.get("SliceThickness") or (series.volume.geometry.spacing[2] if series.volume else None)
    if not thickness:
        return False
    for item in lacking:
        item.PixelSpacing = item.get("PixelSpacing") or list(first.PixelSpacing)
        item.SliceThickness = item.get("SliceThickness") or thickness
    return True


def seg_label_values(seg, labels: Sequence[TrainLabel], what: str) -> dict[int, int]:
    """SEG segment number → model label value; ``UnusableSeg`` when a model label has no segment."""
    lookup = label_lookup(labels)
    values = {}
    for number, names in _segment_names(seg).items():
        value = next((lookup[n.lower()] for n in names if n.lower() in lookup), None)
        if value is not None:
            values[number] = value
    missing = [lab.name for lab in labels if lab.value not in values.values()]
    if missing:
        raise UnusableSeg(f"labels: {what} has no segment for {missing}")
    return values


def seg_case(seg, series: SeriesData, labels: Sequence[TrainLabel], name: str, what: str, field: str) -> Case:
    """The one path from a SEG (highdicom) and its loaded source series to a training case."""
    values = seg_label_values(seg, labels, what)
    if series.volume is None:
        raise CardError(f"{field}: series {series.series_uid} is not a volume: {series.volume_error}")
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    truth = np.zeros(series.volume.geometry.shape, dtype=np.uint8)
    # SEGs that omit SpatialLocationsPreserved (OHIF's export does) are read by their source references only
    # once every frame is checked to lie exactly on the source image it names.
    ignore_locations = "SpatialLocationsPreserved" not in _first_source_item(seg) and \
        _frames_lie_on_their_sources(seg, series, what, field)
    for number, value in values.items():
        try:
            mask = seg.get_pixels_by_source_instance(uids, segment_numbers=[number], combine_segments=False,
                                                     assert_missing_frames_are_empty=True,
                                                     ignore_spatial_locations=ignore_locations)[..., 0]
        except (ValueError, KeyError, IndexError, RuntimeError) as exc:
            raise CardError(f"{field}: {what} does not fit its source series {series.series_uid}: {exc}") from None
        truth[mask > 0] = value
    return Case(name, [series.volume], truth, series.datasets[0] if series.datasets else None)


def _first_source_item(seg) -> pydicom.Dataset:
    try:
        return seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    except (AttributeError, IndexError):
        return pydicom.Dataset()


def _frames_lie_on_their_sources(seg, series: SeriesData, what: str, field: str) -> bool:
    """Every frame's position and the orientation equal those of the source image it references (0.01 mm):
    what SpatialLocationsPreserved YES asserts, checked instead of trusted."""
    sources = {str(ds.SOPInstanceUID): ds for ds in series.datasets}
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else pydicom.Dataset()
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        try:
            ref = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
            orientation = (frame.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence)[0]
            iop = [float(v) for v in orientation.ImageOrientationPatient]
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise CardError(f"{field}: {what} frame {n} lacks its source reference or plane: {exc}") from None
        source = sources.get(ref)
        if source is None:
            raise CardError(f"{field}: {what} frame {n} references instance {ref}, not in series {series.series_uid}")
        if not (np.allclose(position, [float(v) for v in source.ImagePositionPatient], atol=0.01)
                and np.allclose(iop, [float(v) for v in source.ImageOrientationPatient], atol=1e-4)):
            raise CardError(f"{field}: {what} frame {n} does not lie on its source image {ref} "
                            "(resampled segmentations are not used for training)")
    return True


def dicom_seg_cases(folder: Path, labels: Sequence[TrainLabel]) -> list[Case]:
    """Every DICOM SEG under ``folder`` with its referenced series (also under ``folder``) is one case."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CardError(f"data.dicom_seg: {folder} is not a folder")
    by_series: dict[str, list[Path]] = defaultdict(list)
    segs: list[Path] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["Modality", "SeriesInstanceUID"])
        except pydicom.errors.InvalidDicomError:
            continue
        (segs if ds.get("Modality") == "SEG" else by_series[str(ds.SeriesInstanceUID)]).append(path)
    if not segs:
        raise CardError(f"data.dicom_seg: no DICOM SEG object under {folder}")
    cases = []
    for seg_path in segs:
        ds = pydicom.dcmread(str(seg_path))
        ref_uid = referenced_series_uid(ds, seg_path.name, "data.dicom_seg")
        if ref_uid not in by_series:
            raise CardError(f"data.dicom_seg: {seg_path.name} references series {ref_uid}, which is not in {folder}")
        series = _once(lambda uid=ref_uid: load_series(by_series[uid]))
        seg = read_seg(ds, seg_path.name, "data.dicom_seg", series)
        cases.append(seg_case(seg, series(), labels, f"seg-{seg_path.stem}", seg_path.name, "data.dicom_seg"))
    return cases


def _once(load: Callable[[], SeriesData]) -> Callable[[], SeriesData]:
    """``load`` called at most once (the series is wanted by ``read_seg`` and by ``seg_case``)."""
    kept: list[SeriesData] = []
    return lambda: kept[0] if kept else (kept.append(load()) or kept[0])


def load_cases(data: DataSpec, labels: Sequence[TrainLabel], work_dir: Path,
               log: Callable[[str], None] = print) -> list[Case]:
    cache = Path(data.cache_dir or work_dir / "phantoms")
    if data.phantom is not None or data.family is not None:
        return ((phantom_cases(data.phantom, labels, cache) if data.phantom else [])
                + (family_cases(data.family, labels, cache) if data.family else []))
    if data.dicomweb is not None:
        from node.models.dicomweb_source import dicomweb_cases

        return dicomweb_cases(data.dicomweb, labels, work_dir, log)
    return dicom_seg_cases(Path(data.dicom_seg), labels)
