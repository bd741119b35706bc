"""Series geometry and volume loading.

Slices are sorted by their position along the slice normal (never by file name or
InstanceNumber), the way a viewer or a TPS does. ``Geometry`` maps voxel indices to patient
coordinates (DICOM LPS, millimetres); it is what handlers, encoders and renderers share.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset

__all__ = ["Geometry", "Volume", "SeriesData", "GeometryError", "ReleasedPixels", "sort_by_geometry", "load_series",
           "value_counts"]


class GeometryError(ValueError):
    """The series is not a regular 3-D volume (missing plane attributes, gaps, mixed orientation)."""


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a (slices, rows, columns) array.

    ``origin``: patient position (mm) of voxel (0, 0, 0), i.e. ImagePositionPatient of the first slice.
    ``spacing``: (column spacing, row spacing, slice spacing) in mm, i.e. (x, y, z) of the index axes.
    ``direction``: 3x3, columns are the patient-space unit vectors of the index axes i (along a row),
    j (down a column) and k (slice to slice) — the SimpleITK convention.
    """

    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major 3x3

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"Geometry.shape must be three positive ints, got {self.shape}")
        if min(self.spacing) <= 0:
            raise ValueError(f"Geometry.spacing must be positive, got {self.spacing}")
        if len(self.direction) != 9:
            raise ValueError("Geometry.direction must have 9 values")

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def row_direction(self) -> np.ndarray:
        return self.matrix[:, 0]

    @property
    def column_direction(self) -> np.ndarray:
        return self.matrix[:, 1]

    @property
    def normal(self) -> np.ndarray:
        return self.matrix[:, 2]

    def index_to_patient(self, kji: np.ndarray | Sequence[float]) -> np.ndarray:
        """(..., 3) array of (k, j, i) = (slice, row, column) indices → (..., 3) LPS mm."""
        kji = np.asarray(kji, dtype=float)
        ijk = kji[..., ::-1] * np.asarray(self.spacing)
        return np.asarray(self.origin) + ijk @ self.matrix.T

    def patient_to_index(self, xyz: np.ndarray | Sequence[float]) -> np.ndarray:
        """(..., 3) LPS mm → (..., 3) fractional (k, j, i) indices."""
        xyz = np.asarray(xyz, dtype=float) - np.asarray(self.origin)
        ijk = (xyz @ self.matrix) / np.asarray(self.spacing)
        return ijk[..., ::-1]

    def slice_position(self, k: int) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.index_to_patient((k, 0, 0)))

    @property
    def image_orientation(self) -> list[float]:
        return [float(v) for v in (*self.row_direction, *self.column_direction)]

    def to_sitk(self, array: np.ndarray):
        """A SimpleITK image of ``array`` (slices, rows, columns) on this grid."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(array)
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        img.SetDirection(self.direction)
        return img


@dataclass(eq=False)
class Volume:
    """Pixel data of a series on its ``geometry``: (slices, rows, columns), rescale applied (HU for CT)."""

    array: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        if self.array.shape != self.geometry.shape:
            raise ValueError(f"Volume array {self.array.shape} does not match geometry {self.geometry.shape}")


class ReleasedPixels:
    """Stands in for a volume's pixel array once a job no longer needs it (node/jobs/worker.py):
    its shape, dtype and size stay readable, reading a voxel raises and says why, so a stage that
    did need them fails loudly instead of computing on something else."""

    def __init__(self, array: np.ndarray) -> None:
        self.shape, self.dtype, self.nbytes, self.ndim = array.shape, array.dtype, array.nbytes, array.ndim

    def _gone(self, *args, **kwargs):
        raise RuntimeError("the source volume's pixels were released once the handler and the reports "
                           "were done with them: an encoder that reads them must run in the reports' lane")

    __getitem__ = __array__ = __iter__ = _gone


@dataclass(eq=False)
class SeriesData:
    """One series as a handler sees it: headers sorted by geometry, and the volume where it is one."""

    series_uid: str
    modality: str
    datasets: list[Dataset]  # headers only (no PixelData), sorted like the volume's slices
    volume: Volume | None = None  # None for single images or non-volumetric series
    images: list[np.ndarray] = field(default_factory=list)  # 2-D frames when not a volume
    volume_error: str | None = None  # why the series is not a volume, when it is not

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "")


def _plane(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=float)
    except (AttributeError, TypeError, ValueError) as exc:
        raise GeometryError(f"instance {ds.get('SOPInstanceUID', '?')} lacks a usable Image Plane module: {exc}")
    if iop.shape != (6,) or ipp.shape != (3,):
        raise GeometryError("ImageOrientationPatient/ImagePositionPatient have the wrong number of values")
    return iop, ipp


def _pixel_spacing(ds: Dataset) -> np.ndarray:
    """(row spacing, column spacing) mm of one slice."""
    try:
        ps = np.asarray([float(v) for v in ds.PixelSpacing], dtype=float)
    except (AttributeError, TypeError, ValueError) as exc:
        raise GeometryError(f"instance {ds.get('SOPInstanceUID', '?')} lacks a usable PixelSpacing: {exc}")
    if ps.shape != (2,) or not np.all(ps > 0):
        raise GeometryError(f"instance {ds.get('SOPInstanceUID', '?')} has PixelSpacing {list(ps)}: "
                            "not two positive values")
    return ps


def sort_by_geometry(datasets: Sequence[Dataset], tolerance: float = 0.05) -> tuple[list[Dataset], Geometry]:
    """Sort single-frame slices along their normal and derive the grid.

    Raises GeometryError when the slices do not form a regular volume: mixed orientation or
    size, duplicate positions, or spacing varying by more than ``tolerance`` (relative).
    """
    if len(datasets) < 2:
        raise GeometryError("fewer than two slices: not a volume")
    iop0, _ = _plane(datasets[0])
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise GeometryError("ImageOrientationPatient is not two orthonormal vectors")
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    ps0 = _pixel_spacing(datasets[0])
    keyed = []
    for ds in datasets:
        iop, ipp = _plane(ds)
        if not np.allclose(iop, iop0, atol=1e-4):
            raise GeometryError("slices have different orientations")
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise GeometryError("slices have different matrix sizes")
        # The grid takes the first slice's spacing: a slice of another field of view (same matrix)
        # stacked on it would be scaled silently (volumes wrong by tens of %). Checked here, before
        # the shear test, which such a slice (its corner elsewhere) would fail for the wrong reason.
        ps = _pixel_spacing(ds)
        if not np.allclose(ps, ps0, rtol=1e-4, atol=0.0):
            raise GeometryError(f"slices have different PixelSpacing: {ps0[0]:g}\\{ps0[1]:g} mm and "
                                f"{ps[0]:g}\\{ps[1]:g} mm (instance {ds.get('SOPInstanceUID', '?')}): not one volume")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise GeometryError("multi-frame instances are not supported as slices")
        keyed.append((float(ipp @ normal), ipp, ds))
    keyed.sort(key=lambda t: t[0])
    pos = np.array([k[0] for k in keyed])
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        raise GeometryError("two or more slices share a position")
    dz = float(np.median(gaps))
    if np.max(np.abs(gaps - dz)) > tolerance * dz:
        raise GeometryError(
            f"irregular slice spacing: {gaps.min():.3f}..{gaps.max():.3f} mm (tolerance {tolerance:.0%})"
        )
    # Slices must lie along the normal (no gantry tilt / shear).
    first_ipp = keyed[0][1]
    for p, ipp, _ in keyed:
        off = (ipp - first_ipp) - normal * (p - keyed[0][0])
        if np.linalg.norm(off) > max(0.01, tolerance * dz):
            raise GeometryError("slice positions are sheared (gantry tilt): not a regular volume")
    ps = [float(v) for v in ps0]  # (row spacing, column spacing), the same in every slice (checked above)
    direction = np.column_stack([row, col, normal])
    geom = Geometry(
        shape=(len(keyed), rows, cols),
        origin=tuple(float(v) for v in first_ipp),
        spacing=(ps[1], ps[0], dz),
        direction=tuple(float(v) for v in direction.ravel()),
    )
    return [k[2] for k in keyed], geom


def _rescaled(ds: Dataset) -> np.ndarray:
    arr = ds.pixel_array
    slope, intercept = _rescale_params(ds)
    if slope == 1 and intercept == 0:
        return arr
    if slope.is_integer() and intercept.is_integer():
        return arr.astype(np.int32) * int(slope) + int(intercept)
    return (arr * slope + intercept).astype(np.float32)


def _rescale_params(ds: Dataset) -> tuple[float, float]:
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def _fits_int16(ds: Dataset) -> bool:
    """True when every storable value, rescaled, is an integer in int16 (CT: 12-bit data, HU)."""
    slope, intercept = _rescale_params(ds)
    if not (slope.is_integer() and intercept.is_integer()):
        return False
    bits = int(ds.get("BitsStored", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    ends = (lo, hi, lo * slope + intercept, hi * slope + intercept)
    return -32768 <= min(ends) and max(ends) <= 32767


_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """The stored values of an uncompressed little-endian single-frame greyscale image, read
    straight from its Pixel Data, as ``ds.pixel_array`` gives them (the bits above Bits Stored
    cleared, or the sign extended from it), or None for anything else (pydicom decodes it).
    pydicom's decoding pipeline validates and copies each frame once more: a third of the time
    of loading a 300-slice CT."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        single = int(ds.get("SamplesPerPixel", 1) or 1) == 1 and int(ds.get("NumberOfFrames", 1) or 1) == 1
    except (AttributeError, TypeError, ValueError):
        return None
    if syntax not in _NATIVE_LITTLE_ENDIAN or not single or allocated not in (8, 16) or not 0 < stored <= allocated:
        return None
    data = ds.PixelData
    size = allocated // 8
    if not isinstance(data, bytes) or len(data) < rows * cols * size:
        return None
    values = np.frombuffer(data, dtype=f"<{'i' if signed else 'u'}{size}", count=rows * cols).reshape(rows, cols)
    unused = allocated - stored
    if unused and signed:
        return (values << unused) >> unused  # arithmetic shift: the sign of bit ``stored`` - 1
    if unused:
        return values & values.dtype.type((1 << stored) - 1)
    return values


def _fill(arr: np.ndarray, ordered: list[Dataset]) -> None:
    """Rescale each slice straight into ``arr`` (no per-slice temporaries wider than the stored data).

    Each slice's Pixel Data goes as soon as it is in ``arr``: with it goes pydicom's cached decoded
    copy, which otherwise kept a second volume's worth of memory until the whole series was in."""
    for k, ds in enumerate(ordered):
        slope, intercept = _rescale_params(ds)
        native = _native_pixels(ds)
        stored = ds.pixel_array if native is None else native
        if slope == 1 and intercept != 0 and arr.dtype == np.int16:
            # A CT's usual rescale in one pass: the int16 volume holds every rescaled value
            # (``_fits_int16``), so the sum computed in the stored type's promotion is the same.
            np.add(stored, arr.dtype.type(intercept), out=arr[k], casting="unsafe")
            del ds.PixelData
            continue
        arr[k] = stored
        del ds.PixelData
        if slope != 1:
            arr[k] *= arr.dtype.type(slope)
        if intercept != 0:
            arr[k] += arr.dtype.type(intercept)


def _read_instance(path: str | Path, read: Callable[[str], bytes] | None) -> Dataset:
    """One Part 10 instance. pydicom keeps the buffer it read from on the data set (``buffer``):
    dropped here, or every header the job holds would keep its whole file, Pixel Data included,
    alive until the job ends (a second copy of the volume beside the decoded one)."""
    ds = pydicom.dcmread(BytesIO(read(str(path))) if read else str(path))
    ds.buffer = None
    return ds


def load_series(paths: Sequence[str | Path], with_pixels: bool = True,
                read: Callable[[str], bytes] | None = None) -> SeriesData:
    """Load one series from Part 10 files (or from the spool's locators, through ``read``):
    headers sorted by geometry plus the volume.

    A series that is not a regular volume still loads: ``volume`` is None, ``volume_error``
    says why, and ``images`` holds its frames, so a handler can refuse with that reason.
    """
    full = [_read_instance(p, read) for p in paths]
    if not full:
        raise ValueError("no instances")
    uid = str(full[0].SeriesInstanceUID)
    modality = str(full[0].get("Modality", ""))
    try:
        ordered, geom = sort_by_geometry(full)
        error = None
    except GeometryError as exc:
        ordered, geom, error = sorted(full, key=lambda d: int(d.get("InstanceNumber", 0) or 0)), None, str(exc)
    volume = None
    images: list[np.ndarray] = []
    if with_pixels:
        if geom is not None:
            arr = np.empty(geom.shape, dtype=np.int16 if all(_fits_int16(ds) for ds in ordered) else np.float32)
            _fill(arr, ordered)
            volume = Volume(arr, geom)
        else:
            images = [_rescaled(ds) for ds in ordered if "PixelData" in ds]
    headers = []
    for ds in ordered:
        if "PixelData" in ds:
            del ds.PixelData
        headers.append(ds)
    return SeriesData(series_uid=uid, modality=modality, datasets=headers, volume=volume, images=images,
                      volume_error=error)


# NumPy's gather (np.take) and bincount take their indices as 8-byte integers, copying any smaller
# integer type first. A job worker maps every allocation of 1 MB or more afresh and hands it back
# when freed (node/jobs/worker.py), so these run on blocks of 64 Ki values, whose 512 KB copies
# are reused from the heap: a 512x512 slice's 2 MB copy, mapped afresh for every slice of a CT,
# cost 150 000 page faults (0.4 CPU s of system time) in a Label Map SEG's lookup.
_BLOCK = 1 << 16


def _planes(values: np.ndarray, out: np.ndarray | None = None):
    """Flat views of ``values`` (and of ``out``, its shape) a first-axis slice at a time; a slice of
    a non-contiguous array is copied, never the whole array."""
    if values.ndim <= 1:
        yield values.reshape(-1), None if out is None else out.reshape(-1)
        return
    for k in range(len(values)):
        yield values[k].reshape(-1), None if out is None else out[k].reshape(-1)


def _pair_table(table: np.ndarray) -> np.ndarray:
    """A byte-wide ``table`` over two byte indices at once: entry ``i`` of the result, read as two
    bytes in memory order, holds ``table`` of each byte of ``i`` read the same way (so it is the
    same on either byte order)."""
    pairs = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    return np.ascontiguousarray(table[pairs]).view(np.uint16).reshape(-1)


def _pairs_of(plane: np.ndarray) -> np.ndarray | None:
    """A flat byte array seen as 2-byte values, when its size and address allow."""
    if plane.size % 2 or plane.ctypes.data % 2 or not plane.flags.c_contiguous:
        return None
    return plane.view(np.uint16)


def lookup(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``table[values]`` for an array of integer indices of any size (a label map through a LUT),
    in blocks (above); an index beyond the table raises IndexError.

    A byte label map through a byte table of all 256 values is looked up two values at a time
    (a 65 536-entry table of pairs): half the gathers and half the 8-byte index copies NumPy makes,
    0.15 -> 0.09 CPU s for a 512x512x300 label map."""
    values = np.asarray(values)
    out = np.empty(values.shape, dtype=table.dtype)
    pairs = (_pair_table(table) if values.dtype == np.uint8 and table.dtype.itemsize == 1 and table.size >= 256
             and values.size >= 1 << 16 else None)
    for plane, into in _planes(values, out):
        two, two_into = (_pairs_of(plane), _pairs_of(into)) if pairs is not None else (None, None)
        if two is not None and two_into is not None:
            plane, into, step_table = two, two_into, pairs
        else:
            step_table = table
        for start in range(0, plane.size, _BLOCK):
            np.take(step_table, plane[start:start + _BLOCK], out=into[start:start + _BLOCK])
    return out


def value_counts(values: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount(values.ravel(), minlength=minlength)`` of an array of non-negative integers,
    in blocks (above): bincount takes its input as 8-byte integers, so a 512x512x300 uint8 label
    map counted in one go was a 630 MB copy (a model job's peak, 6x its input volume)."""
    values = np.atleast_1d(np.asarray(values))
    counts = np.zeros(minlength, dtype=np.int64)
    for plane, _ in _planes(values):
        for start in range(0, plane.size, _BLOCK):
            part = np.bincount(plane[start:start + _BLOCK], minlength=minlength)
            if part.size > counts.size:
                counts = np.concatenate([counts, np.zeros(part.size - counts.size, dtype=np.int64)])
            counts[:part.size] += part
    return counts
