"""Each instance of a batch has its own outcome at Orthanc (a real one, with a Lua filter that
refuses some instances, as a site's archive may): what Orthanc stored is delivered even when a
batch-mate is refused or Orthanc goes away mid-batch; what its filter dropped ("FilteredOut", an
HTTP 200) is not counted delivered; a file it cannot parse fails at once with the reason."""
from __future__ import annotations

import httpx
import pydicom
import pytest

from node.archive.orthanc import ArchiveEndpoint
from node.deliver.destinations import OrthancDestination
from node.deliver.destinations import Item
from tests.pacs_peers import pacs_orthanc, tiny_study

FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.SeriesDescription == 'FILTERED' then
    return false
  end
  return true
end
"""


def _items(study) -> list[Item]:
    return [Item(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), str(f), "original")
            for f in study.files]


@pytest.fixture
def archive(tmp_path):
    with pacs_orthanc(tmp_path / "orthanc", lua=FILTER) as pacs:
        yield pacs


def _held(pacs) -> set[str]:
    with httpx.Client(base_url=pacs.url) as c:
        return {c.get(f"/instances/{i}").json()["MainDicomTags"]["SOPInstanceUID"] for i in c.get("/instances").json()}


def test_each_instance_has_its_own_outcome_at_orthanc(archive, tmp_path):
    kept = tiny_study(tmp_path / "a", patient_id="D1", series=(("AX", 1.0, 2),))
    dropped = tiny_study(tmp_path / "b", patient_id="D1", series=(("FILTERED", 1.0, 1),))
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"DICM? no: " + b"x" * 300)
    a1, a2 = _items(kept)
    (f,) = _items(dropped)
    g = Item("1.2.826.0.1.3680043.8.498.7", str(garbage), "result")
    dest = OrthancDestination(ArchiveEndpoint(archive.url, None, None))
    got = dest.send([a1, f, g, a2])  # refused ones first and between: nothing after them is lost
    assert got == {a1.sop_uid, a2.sop_uid} and got.missing_reason is None
    assert set(got.refused) == {f.sop_uid, g.sop_uid}
    assert "filtered the instance out" in got.refused[f.sop_uid]
    assert got.refused[g.sop_uid].startswith("Orthanc refused the instance: HTTP 400")
    assert _held(archive) == {a1.sop_uid, a2.sop_uid}
    # Sent again: Orthanc already holds them ("AlreadyStored"), which is delivered too.
    assert dest.send([a1, a2]) == {a1.sop_uid, a2.sop_uid}


def test_orthanc_going_away_mid_batch_keeps_what_it_stored(archive, tmp_path):
    study = tiny_study(tmp_path / "a", patient_id="D2", series=(("AX", 1.0, 3),))
    first, second, third = _items(study)

    def stop_then_read(locator: str) -> bytes:
        archive.stop()  # the archive dies between the first instance and the second
        return open(locator, "rb").read()

    dest = OrthancDestination(ArchiveEndpoint(archive.url, None, None))
    got = dest.send([first, Item(second.sop_uid, second.locator, "original", stop_then_read), third])
    assert got == {first.sop_uid} and not got.refused  # the rest is retried by the loop, with the reason
    assert got.missing_reason.startswith("Orthanc did not answer")
    with pytest.raises(httpx.HTTPError):  # nothing of a batch got there: the loop records the error for all
        dest.send([third])
