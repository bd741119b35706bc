"""A lung-nodules job on a series ct-anatomy has processed reuses ct-anatomy's lungs (kept by the
node, keyed by series, instance set and producer version) and finds exactly what it finds when it
segments them itself; a changed instance set or a damaged entry is a miss, never an error."""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest

from handlers.ct_anatomy import lung_artefact
from node.anatomy import LUNG_L, LUNG_R
from node.jobs.worker import JobSpec, run_job
from node.phantom import generate_ct
from node.results import LabelMap
from node.store.vault import VaultSpec


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return generate_ct(tmp_path_factory.mktemp("ct") / "study", seed=3, rows=160, cols=160, slices=40,
                       pixel_spacing=2.2, slice_thickness=1.0, nodules=4, nodule_diameter_mm=(6.0, 12.0))


def _run(ct, data: Path, handler: str, job_id: int, paths: list[str] | None = None):
    paths = paths or sorted(str(p) for p in ct.dicom_dir.iterdir())
    spec = JobSpec(job_id=job_id, job_key=f"{handler}-same-key", study_uid=ct.study_uid, rule="r", handler=handler,
                   params={}, series={ct.series_uid: paths}, results_dir=str(data / "results"),
                   vault=VaultSpec(str(data), None))
    meta, provenance, figures = run_job(spec, lambda f, m: None)
    vault = spec.vault.open()
    objects = {m["modality"]: pydicom.dcmread(BytesIO(vault.read(m["path"]))) for m in meta}
    return objects, provenance, figures


def _findings(objects) -> tuple:
    """What the results say: the SEG's frames and the SR's content tree (creation times aside)."""
    sr, seg = objects["SR"], objects.get("SEG")
    return (seg.PixelData if seg is not None else None, sr.ContentSequence)


def test_lung_nodules_reuses_ct_anatomy_lungs_with_the_same_results(ct, tmp_path):
    shared = tmp_path / "node"
    _, anatomy_provenance, anatomy_figures = _run(ct, shared, "ct-anatomy", 1)
    assert "store artefacts" in anatomy_figures["seconds"]
    (kept,) = (shared / "artefacts").iterdir()

    reused, provenance, figures = _run(ct, shared, "lung-nodules", 2)
    assert provenance["lungs"] == "kept from a ct-anatomy job"
    assert "artefacts" in figures["seconds"]

    alone, provenance_alone, _ = _run(ct, tmp_path / "fresh", "lung-nodules", 2)
    assert provenance_alone["lungs"] == "segmented"
    assert sorted(reused) == sorted(alone)
    assert _findings(reused) == _findings(alone)
    assert "SEG" in reused and len(reused["SR"].ContentSequence) > 0  # nodules found: a comparison with substance

    # Another instance set of the same series (one slice left out): not the same input, not reused.
    by_position = sorted(ct.dicom_dir.iterdir(),
                         key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    fewer = [str(p) for p in by_position[1:]]  # the end slice: still a regular volume
    _, provenance_fewer, _ = _run(ct, shared, "lung-nodules", 3, fewer)
    assert provenance_fewer["lungs"] == "segmented"

    # A damaged entry is a miss: the job segments the lungs itself and still succeeds.
    kept.write_bytes(kept.read_bytes()[:-50])
    _, provenance_damaged, _ = _run(ct, shared, "lung-nodules", 4)
    assert provenance_damaged["lungs"] == "segmented"


def test_ct_anatomy_keeps_only_the_lungs_under_its_version_and_parameters():
    from handlers.ct_anatomy import CTAnatomy

    assert lung_artefact().producer == CTAnatomy.name and lung_artefact().version == CTAnatomy.version
    assert lung_artefact(2.0, True) != lung_artefact(2.0, False) != lung_artefact(3.0, False)
    labels = np.array([[[0, 1, LUNG_L], [LUNG_R, 4, 5]]], dtype=np.uint8)
    lm = LabelMap.__new__(LabelMap)  # only the label map's labels are read
    object.__setattr__(lm, "labels", labels)
    (lungs,) = CTAnatomy({}).artefacts(None, [lm]).values()
    assert lungs.tolist() == [[[0, 0, LUNG_L], [LUNG_R, 0, 0]]]


def test_an_entry_holds_the_box_of_its_non_zero_values_and_gives_back_the_whole_array():
    from node.jobs.artefacts import check_packed, pack, unpack

    lungs = np.zeros((12, 40, 50), dtype=np.uint8)
    lungs[3:9, 10:30, 5:20], lungs[4:8, 12:28, 30:44] = LUNG_L, LUNG_R
    packed = pack(lungs)
    assert b'"box": [[3, 9], [10, 30], [5, 44]]' in packed.partition(b"\n")[0]
    for array in (lungs, np.zeros((4, 5, 6), np.uint8), np.ones((2, 3), np.float32), lungs[:, :, ::-1]):
        back = unpack(pack(array))
        assert back.dtype == array.dtype and np.array_equal(back, array)
        check_packed(pack(array))
    # An entry of before the box (the whole array) still reads; one whose box or size lies does not.
    import json
    import zlib
    old = json.dumps({"dtype": "|u1", "shape": [12, 40, 50]}).encode() + b"\n" + zlib.compress(lungs.tobytes())
    assert np.array_equal(unpack(old), lungs)
    head, _, body = packed.partition(b"\n")
    for bad_head in (head.replace(b"[5, 44]", b"[5, 60]"), head.replace(b"[5, 44]", b"[5, 43]")):
        with pytest.raises(ValueError):
            unpack(bad_head + b"\n" + body)
        with pytest.raises(ValueError):
            check_packed(bad_head + b"\n" + body)
