"""Deflated DICOM that reaches the node outside C-STORE (a STOW-RS label upload, a worker's result) is
inflated within bounds, never whole by pydicom: a few KiB of deflate can hold gigabytes.

Before: ``seg_parts`` and the worker API's result upload read each part with ``pydicom.dcmread``,
which inflates a deflated data set in one call (the receive path had been bounded, these two not).
"""
from __future__ import annotations

import asyncio
import tracemalloc
from io import BytesIO
from types import SimpleNamespace

import pydicom
import pytest
from fastapi import HTTPException
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from node.projects.intake import seg_parts
from node.receive import ingest
from node.receive.ingest import InflatedTooLarge, read_header_dataset
from node.web import projects_api, worker_api
from tests.test_receive_hostile import _deflate_bomb

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _deflated_seg() -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SEG_STORAGE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SEG"
    item = Dataset()
    item.SegmentNumber, item.SegmentLabel = 1, "Lung"
    ds.SegmentSequence = [item]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = SEG_STORAGE, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_label_upload_reads_a_deflated_seg_and_refuses_a_deflate_bomb_within_the_limit():
    good = _deflated_seg()
    [ds] = seg_parts([good, b"not dicom"], limit=4 << 20)
    assert ds.Modality == "SEG" and ds.SegmentSequence[0].SegmentLabel == "Lung"
    bomb = _deflate_bomb(64 << 20)
    assert len(bomb) < 128 << 10
    tracemalloc.start()
    try:
        with pytest.raises(InflatedTooLarge, match="inflated size over 4 MB"):
            seg_parts([good, bomb], limit=4 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak >> 20} MiB allocated for a 4 MiB limit"


def test_a_stow_request_with_a_deflate_bomb_is_answered_413_naming_the_limit(tmp_path):
    settings = SimpleNamespace(stow_max_mb=4, data_dir=tmp_path)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(node=SimpleNamespace(settings=settings))),
                              headers={"content-type": 'multipart/related; type="application/dicom"; boundary=B'})
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + _deflate_bomb(16 << 20) + b"\r\n--B--\r\n"
    with pytest.raises(HTTPException) as err:
        asyncio.run(projects_api.stow_labels(request, body, SimpleNamespace(name="rad", role="annotator")))
    assert err.value.status_code == 413 and "stow_max_mb" in err.value.detail


def test_a_workers_deflate_bomb_result_is_answered_413_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "MAX_INFLATED", 4 << 20)
    node = SimpleNamespace(settings=SimpleNamespace(data_dir=tmp_path))  # never reached: refused first
    with pytest.raises(HTTPException) as err:
        worker_api._store_result(node, 1, {"attempt": 1}, "1.2.3", _deflate_bomb(16 << 20))
    assert err.value.status_code == 413 and "inflated size over 4 MB" in err.value.detail
    assert not any(tmp_path.iterdir())


def test_the_header_reader_gives_the_same_dataset_for_a_deflated_instance_as_pydicom():
    raw = _deflated_seg()
    mine, theirs = read_header_dataset(raw), pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
    assert mine.SOPInstanceUID == theirs.SOPInstanceUID and mine.SegmentSequence == theirs.SegmentSequence
