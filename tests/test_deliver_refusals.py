"""A DICOM peer that refuses an item's presentation context: that item fails for good with the
reason, the rest of the batch goes through. The peer is DCMTK 3.6.7's storescp, which predates
Label Map Segmentation Storage (DICOM 2024) and rejects it, as most planning systems do."""
from __future__ import annotations

import dataclasses

import pydicom
import pytest

from node.config import DimseDestination, load_settings
from node.deliver.destinations import DimseStoreDestination, Item
from node.deliver.loop import DeliveryLoop
from node.encoders import encode_all
from node.results import LabelMap
from node.store.index import Index
from node.store.vault import VaultSpec
from tests.encoder_sources import anatomy_labels, context, ct_series, segment_table
from tests.nodeproc import storescp

LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """Part 10 files of one small CT's results: {"labelmap": Label Map SEG, "binary": binary SEG,
    "rtstruct": RTSTRUCT}, made by the node's encoders."""
    out = tmp_path_factory.mktemp("results")
    series = ct_series(out / "ct", rows=32, cols=32, slices=10, seed="refusals")
    g = series.volume.geometry
    lm = LabelMap(series.series_uid, g, anatomy_labels(g.shape), segment_table(), description="CT anatomy",
                  seg_format="labelmap")
    sources = {series.series_uid: series}
    label_map_seg, rtstruct = encode_all([lm], sources, context(job_key="labelmap"))
    (binary_seg,) = encode_all([dataclasses.replace(lm, seg_format="binary", encodings=("SEG",))], sources,
                               context(job_key="binary"))
    assert label_map_seg.SOPClassUID == LABEL_MAP_SEG and binary_seg.SOPClassUID != LABEL_MAP_SEG
    files = {}
    for name, ds in (("labelmap", label_map_seg), ("binary", binary_seg), ("rtstruct", rtstruct)):
        files[name] = out / f"{name}.dcm"
        ds.save_as(files[name], enforce_file_format=True)
    return files


def _item(path) -> Item:
    return Item(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), str(path), "result")


def _refusal(port: int) -> str:
    return (f"TPS@127.0.0.1:{port} does not accept Label Map Segmentation Storage "
            "(presentation context rejected: abstract syntax not supported)")


def test_the_refused_item_fails_with_the_reason_and_the_rest_is_stored(objects, tmp_path):
    rtstruct, label_map = _item(objects["rtstruct"]), _item(objects["labelmap"])
    with storescp(tmp_path / "tps") as port:
        dest = DimseStoreDestination(DimseDestination(ae_title="TPS", host="127.0.0.1", port=port), "HILUM")
        sent = dest.send([label_map, rtstruct])  # the refused item first: nothing after it is lost
        assert sent == {rtstruct.sop_uid}
        assert sent.refused == {label_map.sop_uid: _refusal(port)}
        # A batch of refused items only: the peer accepts no context, pynetdicom aborts the
        # association; that is the same refusal, not a connection failure to retry.
        alone = dest.send([label_map])
        assert alone == set() and alone.refused == {label_map.sop_uid: _refusal(port)}
    stored = [pydicom.dcmread(p) for p in (tmp_path / "tps").iterdir()]
    assert [str(ds.SOPInstanceUID) for ds in stored] == [rtstruct.sop_uid]


def test_the_delivery_loop_fails_a_refusal_at_once_and_delivers_the_rest(objects, tmp_path):
    """Through a real index: the Label Map SEG's delivery is failed after one try with the reason
    (what the job view and the console's failed deliveries show), not retried; the RTSTRUCT and
    the binary SEG of the same batch are delivered."""
    index = Index(tmp_path / "index.db")
    job = index.add_job(job_key="k", study_uid="1.2.3", series_uid=None, level="study", rule="r",
                        handler="ct-anatomy", params={}, destinations=["tps"], priority="normal", timeout_s=None,
                        generation=0, note="test")
    items = {name: _item(path) for name, path in objects.items()}
    results = [{"sop_instance_uid": it.sop_uid, "sop_class_uid": "x", "series_instance_uid": name,
                "modality": "SEG" if name != "rtstruct" else "RTSTRUCT", "path": it.locator}
               for name, it in items.items()]
    index.add_results(job, results, [(r["sop_instance_uid"], "tps") for r in results])
    with storescp(tmp_path / "tps") as port:
        settings = load_settings(data_dir=tmp_path / "data", delivery_max_attempts=6,
                                 destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": port}})
        dest = DimseStoreDestination(settings.destinations["tps"], "HILUM")
        loop = DeliveryLoop(settings, index, {"tps": dest}, VaultSpec(str(tmp_path / "data"), None).open())
        assert loop.run_once() == 2
        assert loop.run_once() == 0 and index.next_delivery_at() is None  # nothing left to retry
    rows = {r["sop_uid"]: r for r in index.deliveries_of_job(job)}
    assert rows[items["rtstruct"].sop_uid]["status"] == rows[items["binary"].sop_uid]["status"] == "delivered"
    refused = rows[items["labelmap"].sop_uid]
    assert (refused["status"], refused["attempts"], refused["last_error"]) == ("failed", 1, _refusal(port))
    received = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "tps").iterdir()}
    assert received == {items["rtstruct"].sop_uid, items["binary"].sop_uid}


# -- a destination's modalities: what a planning system is sent at all --

def test_modalities_are_validated_naming_the_field(tmp_path):
    from node.config import ConfigError

    tps = {"ae_title": "TPS", "host": "127.0.0.1", "port": 11113}
    for bad, why in ((["rtstruct"], "not DICOM Modality values"), ([], "empty list sends nothing")):
        with pytest.raises(ConfigError, match=f"destinations.tps.modalities: .*{why}"):
            load_settings(data_dir=tmp_path, destinations={"tps": {**tps, "modalities": bad}})
    settings = load_settings(data_dir=tmp_path, destinations={"tps": {**tps, "modalities": ["CT", "RTSTRUCT"]},
                                                              "pacs": {**tps, "ae_title": "PACS"}})
    results = [{"sop_instance_uid": m, "modality": m} for m in ("SEG", "RTSTRUCT", "SR")]
    assert settings.result_deliveries(results, ["orthanc", "tps", "pacs"]) == [
        ("SEG", "orthanc"), ("SEG", "pacs"), ("RTSTRUCT", "orthanc"), ("RTSTRUCT", "tps"), ("RTSTRUCT", "pacs"),
        ("SR", "orthanc"), ("SR", "pacs")]


def test_the_shipped_planning_system_gets_images_and_contours_only():
    """hilum.yaml's tps (the example rules send ct-anatomy's results there): RTSTRUCT and CT, not
    the SEGs and SR, which planning systems mostly refuse (the archive gets everything)."""
    from tests.nodeproc import REPO

    settings = load_settings(REPO / "hilum.yaml")
    assert settings.destinations["tps"].modalities == ["CT", "RTSTRUCT"]
    assert [m for m in ("CT", "RTSTRUCT", "SEG", "SR", "OT") if settings.takes("tps", m)] == ["CT", "RTSTRUCT"]
    assert all(settings.takes("orthanc", m) for m in ("SEG", "SR"))
