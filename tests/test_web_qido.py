"""QIDO-RS through the node's DICOMweb gateway: wildcards, person names, spaces, includefield as
OHIF sends them, and the gateway's refusal of anything but a DICOMweb resource and a sane query.

One real node (managed Orthanc) for the module; two phantom studies arrive by storescu and are
forwarded to the archive by a rule. Every query is made with a viewer's token, and compared where
useful with the same query sent straight to Orthanc.
"""
from __future__ import annotations

import http.client
import json

import httpx
import pytest

from node.phantom import generate_ct
from tests.nodeproc import running_node, storescu, wait_for

pytestmark = pytest.mark.slow

RULE = """name: ct-archive
description: CT series go to the archive
match:
  Modality: CT
destinations: [orthanc]
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("webqido")
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "ct.yaml").write_text(RULE)
    # PHANTOM-000501 "CT CHEST" and PHANTOM-000502 "CT CHEST WITH CONTRAST", both PHANTOM^CHEST.
    phantoms = [generate_ct(tmp / f"ph{seed}", seed=seed, rows=32, cols=32, slices=3, slice_thickness=5.0,
                            fov_mm=400, nodules=0, contrast=seed == 502) for seed in (501, 502)]
    with running_node(tmp / "node", rules) as n:
        for ph in phantoms:
            assert storescu(n.dicom_port, ph.dicom_dir).returncode == 0
        n.uids = {ph.patient_id: ph.study_uid for ph in phantoms}
        for uid in n.uids.values():
            wait_for(lambda: len(n.api("GET", f"/dicom-web/studies/{uid}/instances").json() or []) == 3,
                     90, "the phantom in the archive")
        out = n.hilum("token", "create", "--role", "viewer", "--config", str(n.config_path))
        assert out.returncode == 0, out.stderr
        n.viewer = out.stdout.strip()
        yield n


def _studies(answer: httpx.Response) -> dict[str, dict]:
    assert answer.status_code == 200, answer.text
    return {s["0020000D"]["Value"][0]: s for s in answer.json()}


def gateway(node, query: str) -> dict[str, dict]:
    """QIDO studies through the gateway; ``query`` goes on the wire exactly as written."""
    return _studies(httpx.get(f"{node.web}/dicom-web/studies?{query}",
                              headers={"Authorization": f"Bearer {node.viewer}"}, timeout=30))


def orthanc(node, query: str) -> dict[str, dict]:
    """The same query straight to the archive, with the node's own credentials."""
    with node.orthanc() as archive:
        return _studies(archive.get(f"/dicom-web/studies?{query}"))


def found(node, query: str) -> set[str]:
    """Patient IDs of the studies the gateway finds."""
    by_uid = {uid: pid for pid, uid in node.uids.items()}
    return {by_uid[uid] for uid in gateway(node, query) if uid in by_uid}


def raw_get(node, target: str) -> tuple[int, bytes]:
    """GET with the request target sent byte for byte (httpx would normalise '..' and escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", node.config["web_port"], timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {node.viewer}")
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


BOTH = {"PHANTOM-000501", "PHANTOM-000502"}
PLAIN = {"PHANTOM-000501"}


def test_wildcards_reach_the_archive_as_sent(node):
    assert found(node, "PatientID=*501") == PLAIN
    assert found(node, "PatientID=PHANTOM-00050?") == BOTH
    assert found(node, "PatientID=PHANTOM-0005?1") == PLAIN
    assert found(node, "PatientID=*999") == set()
    # Escaped wildcards mean the same (DICOMweb plugin 1.7 does not decode them; the gateway does).
    assert found(node, "PatientID=%2A501") == PLAIN
    assert found(node, "PatientID=PHANTOM-0005%3F1") == PLAIN
    # The gateway adds nothing and loses nothing: the archive's own answer for a literal wildcard.
    for query in ("PatientID=*501", "PatientID=PHANTOM-00050?", "StudyDescription=*CONTRAST"):
        assert gateway(node, query).keys() == orthanc(node, query).keys(), query


def test_person_names_and_values_with_spaces(node):
    assert found(node, "PatientName=PHANTOM^CHEST") == BOTH
    assert found(node, "PatientName=PHANTOM%5ECHEST") == BOTH  # how OHIF (encodeURIComponent) sends '^'
    assert found(node, "PatientName=*%5ECH*") == BOTH
    assert found(node, "PatientName=PHANTOM%5EHEAD") == set()
    # Orthanc 1.10 with plugin 1.7 never decodes '%20' (nor reads '+' as a space), so no query
    # can carry a space to it; '?' stands in for one. The gateway passes both forms on unchanged.
    assert found(node, "StudyDescription=CT?CHEST") == PLAIN
    assert found(node, "StudyDescription=CT?CHEST*") == BOTH
    for query in ("StudyDescription=CT%20CHEST", "StudyDescription=CT+CHEST", "StudyDescription=CT%20CHEST*"):
        assert gateway(node, query).keys() == orthanc(node, query).keys(), query


def test_includefield_as_ohif_sends_it_and_repeated(node):
    description, modalities = "00081030", "00080061"
    for query in ("includefield=00081030%2C00080060", "includefield=00081030&includefield=00080060"):
        study = gateway(node, f"PatientID=PHANTOM-000501&{query}")[node.uids["PHANTOM-000501"]]
        assert study[description]["Value"] == ["CT CHEST"], query
        assert "CT" in study[modalities]["Value"]
    # OHIF's study list, as its DicomWebDataSource builds it (supportsWildcard, no fuzzy matching).
    ohif = ("PatientName=*PHANTOM*&00100020=*0501*&limit=101&offset=0&fuzzymatching=false"
            "&includefield=00081030%2C00080060")
    (study,) = gateway(node, ohif).values()
    assert study["00100020"]["Value"] == ["PHANTOM-000501"] and study[description]["Value"] == ["CT CHEST"]


def test_an_escaped_ampersand_or_newline_adds_no_parameter(node):
    # '%26' stays escaped, so it cannot start a second parameter that widens the match.
    assert found(node, "PatientID=NOPE%26PatientID%3D*") == set()
    assert found(node, "PatientID=*") == BOTH
    status, body = raw_get(node, "/dicom-web/studies?PatientID=%0D%0AX-Injected:%201")
    assert (status, json.loads(body)) == (200, [])


def test_only_dicomweb_resources_and_sane_queries_pass(node):
    for target in ("/dicom-web/..%2Fsystem", "/dicom-web/%2E%2E/system", "/dicom-web/../system",
                   "/dicom-web/studies/%2E%2E/%2E%2E/system", "/dicom-web/studies%3FPatientID=*",
                   "/dicom-web/servers", "/dicom-web/app/client/index.html"):
        status, body = raw_get(node, target)
        assert status == 404, target
        assert b"ApiVersion" not in body and b"PHANTOM" not in body
        assert b"is not a DICOMweb resource" in body
    for target, shown in (('/dicom-web/studies?PatientID="x"', "'\"'"), ("/dicom-web/studies?PatientID=x#y", "'#'"),
                          ("/dicom-web/studies?PatientID=%2", "'%2'")):
        status, body = raw_get(node, target)
        assert status == 400, target
        assert json.loads(body)["detail"].startswith(f"query: {shown} at position"), body
    # A UID path with its query still goes through.
    uid = node.uids["PHANTOM-000502"]
    status, body = raw_get(node, f"/dicom-web/studies/{uid}/series?Modality=C?")
    assert status == 200 and json.loads(body)[0]["0020000D"]["Value"] == [uid]
