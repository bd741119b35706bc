"""Series loading: slices sorted by geometry, rescale applied exactly, the right dtype."""
from __future__ import annotations

import numpy as np
import pytest

from node.phantom import generate_ct
from node.volume import GeometryError, load_series, sort_by_geometry, value_counts


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return generate_ct(tmp_path_factory.mktemp("v") / "ct", seed=5, rows=48, cols=40, slices=12, pixel_spacing=6.0,
                       slice_thickness=8.0, nodules=0)


def test_volume_matches_rescaled_pixels_and_geometry(ct):
    import pydicom

    s = load_series(ct.series_files())
    assert s.volume.array.dtype == np.int16 and s.volume.array.shape == (12, 48, 40)
    assert s.volume.geometry.spacing == pytest.approx((6.0, 6.0, 8.0))
    z = [float(ds.ImagePositionPatient[2]) for ds in s.datasets]
    assert z == sorted(z)  # sorted along the normal, whatever the file names
    for k, ds in enumerate(s.datasets):
        full = pydicom.dcmread(next(p for p in ct.series_files()
                                    if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == ds.SOPInstanceUID))
        expected = full.pixel_array.astype(np.int32) * int(full.RescaleSlope) + int(full.RescaleIntercept)
        assert np.array_equal(s.volume.array[k], expected)
    truth, geom = ct.label_volume()
    assert geom.origin == pytest.approx(s.volume.geometry.origin)


def test_non_integral_rescale_gives_float(ct, tmp_path):
    import pydicom

    files = []
    for i, p in enumerate(ct.series_files()):
        ds = pydicom.dcmread(p)
        ds.RescaleSlope = 0.5
        f = tmp_path / f"{i}.dcm"
        ds.save_as(f)
        files.append(f)
    s = load_series(files)
    ref = load_series(ct.series_files())
    assert s.volume.array.dtype == np.float32
    raw = ref.volume.array.astype(np.float32) + 1024  # stored values (intercept -1024, slope 1)
    assert np.allclose(s.volume.array, raw * 0.5 - 1024)


def test_unsigned_stored_values_rescale_exactly_in_one_pass(ct, tmp_path):
    """Unsigned stored values (15 bits) with a large negative intercept: the int16 volume holds the
    rescaled values exactly (the sum made in the stored type's promotion, in one pass)."""
    import pydicom

    ref = load_series(ct.series_files())
    files = []
    for i, p in enumerate(ct.series_files()):
        ds = pydicom.dcmread(p)
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit, ds.RescaleIntercept = 0, 15, 14, -16384
        ds.PixelData = (hu + 16384).astype("<u2").tobytes()
        f = tmp_path / f"{i}.dcm"
        ds.save_as(f)
        files.append(f)
    s = load_series(files)
    assert s.volume.array.dtype == np.int16
    assert np.array_equal(s.volume.array, ref.volume.array)


def test_irregular_spacing_is_not_a_volume(ct):
    import pydicom

    by_z = sorted(ct.series_files(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                         .ImagePositionPatient[2]))
    s = load_series(by_z[:6] + by_z[7:])  # a middle slice missing: a gap
    assert s.volume is None and "irregular" in s.volume_error
    with pytest.raises(GeometryError):
        sort_by_geometry(s.datasets[:1])


def test_headers_keep_no_file_bytes_or_pixels(ct):
    """A job holds its series' headers until its last result is written: they must not keep each
    instance's file (pydicom's read buffer) or its Pixel Data, a second copy of the volume."""
    files = {str(p): p.read_bytes() for p in ct.series_files()}
    read = []

    def reader(locator: str) -> bytes:
        read.append(locator)
        return files[locator]

    s = load_series(list(files), read=reader)
    assert sorted(read) == sorted(files)
    assert all(ds.buffer is None and "PixelData" not in ds for ds in s.datasets)
    assert s.volume.array.shape == (12, 48, 40)


def test_released_pixels_keep_the_grid_and_refuse_to_be_read(ct):
    from node.volume import ReleasedPixels, Volume

    s = load_series(ct.series_files())
    gone = Volume(ReleasedPixels(s.volume.array), s.volume.geometry)
    assert gone.array.shape == (12, 48, 40) and gone.array.nbytes == s.volume.array.nbytes
    for read in (lambda a: a[3], lambda a: np.asarray(a), lambda a: list(a)):
        with pytest.raises(RuntimeError, match="released"):
            read(gone.array)


def test_native_pixels_are_pydicoms(ct):
    """Uncompressed little-endian slices are read straight from their Pixel Data (the load's fast
    path): the same values and type as pydicom's pixel_array, bits above Bits Stored cleared or
    the sign extended from them; anything else is left to pydicom."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, RLELossless

    from node.volume import _native_pixels

    rng = np.random.default_rng(3)
    template = pydicom.dcmread(ct.series_files()[0])
    assert np.array_equal(_native_pixels(template), template.pixel_array)
    shape = (int(template.Rows), int(template.Columns))
    for signed in (0, 1):
        for allocated, stored in ((16, 16), (16, 12), (16, 10), (8, 8), (8, 6)):
            ds = pydicom.dcmread(ct.series_files()[0])
            raw = rng.integers(0, 1 << allocated, size=shape, dtype=np.uint16 if allocated == 16 else np.uint8)
            ds.PixelData, ds.BitsAllocated, ds.BitsStored = raw.tobytes(), allocated, stored
            ds.HighBit, ds.PixelRepresentation = stored - 1, signed
            ours, theirs = _native_pixels(ds), ds.pixel_array
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), (signed, allocated, stored)
    for syntax in (ExplicitVRBigEndian, RLELossless):
        ds = pydicom.dcmread(ct.series_files()[0])
        ds.file_meta.TransferSyntaxUID = syntax
        assert _native_pixels(ds) is None


def _block_cases(rng):
    """Arrays of every rank, within and across the 64 Ki blocks, contiguous or not."""
    big = rng.integers(0, 6, (3, 300, 301)).astype(np.uint8)  # slices of 90 300 values: two blocks each
    return (rng.integers(0, 6, (37, 9, 11)).astype(np.uint8), rng.integers(0, 70000, (20, 5)).astype(np.uint32),
            np.array([4, 0, 4], np.uint8), np.zeros((0, 4), np.uint8), big, big[:, ::3, 1::2], big.transpose(2, 0, 1),
            rng.integers(0, 6, 200_000).astype(np.uint16), np.array(3, np.uint8))


def test_value_counts_are_bincounts_taken_a_block_at_a_time():
    rng = np.random.default_rng(3)
    for values in _block_cases(rng):
        for minlength in (0, 3, 256):
            assert np.array_equal(value_counts(values, minlength), np.bincount(values.ravel(), minlength=minlength))


def test_lookup_is_fancy_indexing_a_block_at_a_time():
    from node.volume import lookup

    rng = np.random.default_rng(4)
    for values in _block_cases(rng):
        table = rng.integers(0, 250, int(values.max(initial=0)) + 1).astype(np.uint8)
        got = lookup(table, values)
        assert got.shape == values.shape and got.dtype == table.dtype and np.array_equal(got, table[values])
    with pytest.raises(IndexError):
        lookup(np.zeros(3, bool), np.array([[0, 1], [2, 3]], np.uint8))


def test_lookup_of_bytes_two_at_a_time_is_the_same_lookup():
    """A byte table of every byte value takes a byte label map two values at a time: the same
    result for planes of even and odd size, at odd addresses, strided or not, any byte table."""
    from node.volume import lookup

    rng = np.random.default_rng(5)
    odd = rng.integers(0, 256, (3, 257, 257)).astype(np.uint8)  # 66 049 values a plane: odd
    flat = rng.integers(0, 256, 200_001).astype(np.uint8)
    cases = (*_block_cases(rng), odd, odd[:, :, 1:], flat, flat[1:], rng.integers(0, 256, (4, 512, 512)).astype(np.uint8))
    tables = (rng.integers(0, 256, 256).astype(np.uint8), rng.integers(0, 2, 300).astype(bool),
              rng.integers(-128, 128, 256).astype(np.int8))
    for values in cases:
        for table in tables:
            if values.dtype == np.uint8:
                got = lookup(table, values)
                assert got.dtype == table.dtype and np.array_equal(got, table[values])

