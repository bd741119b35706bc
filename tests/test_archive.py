"""The managed Orthanc (the same code path as `hilum up`) and the destinations that write to it."""
from __future__ import annotations

import json
import os
import signal
import stat

import pytest

from node.archive.orthanc import ManagedOrthanc
from node.config import DimseDestination, load_settings
from node.deliver.destinations import DimseStoreDestination, Item, OrthancDestination
from tests.nodeproc import free_port, storescp, wait_for
from tests.test_receive import make_ct


@pytest.fixture
def orthanc(tmp_path):
    settings = load_settings(data_dir=tmp_path / "d", orthanc_http_port=free_port())
    settings.data_dir.mkdir(parents=True)
    m = ManagedOrthanc(settings)
    m.start()
    yield m
    m.stop()


def test_managed_orthanc_is_private_and_restarted(orthanc, tmp_path):
    cred = tmp_path / "d" / "orthanc-credentials.json"
    assert stat.S_IMODE(os.stat(cred).st_mode) == 0o600
    cfg = json.loads(orthanc.config_path.read_text())
    assert cfg["RemoteAccessAllowed"] is False and cfg["AuthenticationEnabled"] is True
    assert any("plugins" in p for p in cfg["Plugins"])
    import httpx

    assert httpx.get(orthanc.endpoint.url + "/system", timeout=5).status_code == 401  # no anonymous access
    with orthanc.endpoint.client() as c:
        assert c.get("/dicom-web/studies").status_code in (200, 204)  # DICOMweb plugin loaded
    old = orthanc.pid
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: orthanc.pid != old and orthanc.alive(), 60, "Orthanc restart")
    assert orthanc.restarts == 1


def test_originals_by_rest_and_results_by_stow(orthanc, tmp_path):
    original = tmp_path / "o.dcm"
    ds = make_ct(original)
    result = tmp_path / "r.dcm"
    res = make_ct(result, study=ds.StudyInstanceUID)
    dest = OrthancDestination(orthanc.endpoint)
    ok = dest.send([Item(ds.SOPInstanceUID, str(original), "original"), Item(res.SOPInstanceUID, str(result), "result")])
    assert ok == {ds.SOPInstanceUID, res.SOPInstanceUID}
    with orthanc.endpoint.client() as c:
        found = c.post("/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": ds.StudyInstanceUID},
                                            "Expand": True}).json()
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in found} == ok
    # A re-delivery of the same UID is accepted (overwrites, no duplicate).
    assert dest.send([Item(res.SOPInstanceUID, str(result), "result")]) == {res.SOPInstanceUID}


def test_dimse_destination_delivers_to_a_real_storescp(tmp_path):
    f = tmp_path / "r.dcm"
    ds = make_ct(f)
    with storescp(tmp_path / "tps") as port:
        dest = DimseStoreDestination(DimseDestination(ae_title="TPS", host="127.0.0.1", port=port), "HILUM")
        assert dest.send([Item(ds.SOPInstanceUID, str(f), "result")]) == {ds.SOPInstanceUID}
    received = list((tmp_path / "tps").iterdir())
    assert len(received) == 1
    import pydicom

    assert pydicom.dcmread(received[0]).SOPInstanceUID == ds.SOPInstanceUID


def test_dimse_destination_down_raises(tmp_path):
    f = tmp_path / "r.dcm"
    ds = make_ct(f)
    dest = DimseStoreDestination(DimseDestination(ae_title="TPS", host="127.0.0.1", port=free_port()), "HILUM")
    with pytest.raises(Exception, match="association"):
        dest.send([Item(ds.SOPInstanceUID, str(f), "result")])
