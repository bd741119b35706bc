"""Secondary Capture: pixels round-trip exactly, the right SOP class, flags and descriptions."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from node.encoders.sc import encode_sc
from node.results import ImageSeries
from tests.encoder_sources import context, ct_series, save_valid


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return ct_series(tmp_path_factory.mktemp("src"), rows=32, cols=32, slices=3)


@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
@pytest.mark.parametrize("multiframe", [False, True], ids=["single", "multi"])
def test_frames_round_trip(source, tmp_path, rgb, multiframe):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (4, 24, 40, 3) if rgb else (4, 24, 40), dtype=np.uint8)
    labels = ("MIP 0°", "MIP 90°", "MIP 180°", "MIP 270°")
    images = ImageSeries(source.series_uid, "Lung MIP", frames, burned_in_annotation=not rgb,
                         multiframe=multiframe, pixel_spacing_mm=(0.7, 0.7), frame_labels=labels)
    out = encode_sc(images, {source.series_uid: source}, context(), series_number=9005)
    assert len(out) == (1 if multiframe else 4)
    read = [pydicom.dcmread(save_valid(ds, tmp_path, f"sc-{n}.dcm")) for n, ds in enumerate(out)]
    if multiframe:
        expected_class = (MultiFrameTrueColorSecondaryCaptureImageStorage if rgb
                          else MultiFrameGrayscaleByteSecondaryCaptureImageStorage)
        assert read[0].SOPClassUID == expected_class
        assert int(read[0].NumberOfFrames) == 4
        assert np.array_equal(read[0].pixel_array, frames)
    else:
        assert all(r.SOPClassUID == SecondaryCaptureImageStorage for r in read)
        assert [r.InstanceNumber for r in read] == [1, 2, 3, 4]
        assert [r.ImageComments for r in read] == list(labels)
        for r, f in zip(read, frames):
            assert np.array_equal(r.pixel_array, f)
    for r in read:
        assert r.PhotometricInterpretation == ("RGB" if rgb else "MONOCHROME2")
        assert r.BurnedInAnnotation == ("NO" if rgb else "YES")
        assert r.SeriesDescription == "AI: Lung MIP (SC)"
        assert r.SeriesNumber == 9005 and r.Modality == "OT"
        assert r.StudyInstanceUID == source.first.StudyInstanceUID and r.PatientID == source.first.PatientID
        assert [float(v) for v in r.PixelSpacing] == [0.7, 0.7]
        assert r.ContributingEquipmentSequence[0].Manufacturer == "Hilum"
    assert len({r.SOPInstanceUID for r in read}) == len(read) and len({r.SeriesInstanceUID for r in read}) == 1


def test_multiframe_without_labels_uses_page_numbers(source, tmp_path):
    frames = np.zeros((3, 8, 8), dtype=np.uint8)
    ds = encode_sc(ImageSeries(source.series_uid, "Key images", frames, multiframe=True),
                   {source.series_uid: source}, context(), series_number=9006)[0]
    r = pydicom.dcmread(save_valid(ds, tmp_path))
    assert r.FrameIncrementPointer == pydicom.tag.Tag("PageNumberVector")
    assert list(r.PageNumberVector) == [1, 2, 3]


@pytest.mark.parametrize("multiframe", [False, True], ids=["single", "multi"])
def test_long_pixel_spacing_is_written_as_a_valid_decimal_string(source, tmp_path, multiframe):
    frames = np.zeros((2, 16, 16), dtype=np.uint8)
    images = ImageSeries(source.series_uid, "VR", frames, multiframe=multiframe,
                         pixel_spacing_mm=(0.872392991288903, 1 / 3))
    (first, *_) = encode_sc(images, {source.series_uid: source}, context(), series_number=9006)
    read = pydicom.dcmread(save_valid(first, tmp_path, "sc.dcm"))  # dciodvfy: DS of at most 16 characters
    assert [float(v) for v in read.PixelSpacing] == pytest.approx([0.872392991288903, 1 / 3], abs=1e-12)
