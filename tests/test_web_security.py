"""The web door over HTTP: sign-in, sessions, CSRF, roles, security headers, STOW limits, the
DICOMweb gateway's normalisation for DICOMweb plugin 1.7, the rules and destinations APIs.

One real node (managed Orthanc) for the module; a real storescp plays a destination.
"""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import pydicom
import pytest

from node.web.sessions import SessionStore
from tests.encoder_sources import write_ct_series
from tests.nodeproc import running_node, storescp, storescu, wait_for
from tests.web_support import PASSWORD, add_user, api_session, stow

pytestmark = pytest.mark.slow

RULE = """name: ct-forward
description: CT series go to the archive
match:
  Modality: CT
destinations: [orthanc]
"""
BAD_RULE = """name: ct-forward
description: CT series go to the archive
match:
  Modality: CT
handler: no-such-handler
destinations: [orthanc]
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("websec")
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "ct.yaml").write_text(RULE)
    with storescp(tmp / "tps") as tps_port:
        dests = {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps_port},
                 "down": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": _closed_port()}}
        with running_node(tmp / "node", rules, stow_max_mb=1, destinations=dests) as n:
            add_user(n, "ada", "admin")
            add_user(n, "vic", "viewer")
            n.ct = write_ct_series(tmp / "ct", rows=32, cols=32, slices=4, seed="websec")
            assert storescu(n.dicom_port, n.ct).returncode == 0
            n.study_uid = str(pydicom.dcmread(n.ct[0]).StudyInstanceUID)
            wait_for(lambda: n.study(n.study_uid).get("stable"), 60, "the study to be complete")
            wait_for(lambda: len(n.api("GET", f"/dicom-web/studies/{n.study_uid}/instances").json() or []) == 4,
                     60, "the originals in the archive")
            yield n


def _closed_port() -> int:
    from tests.nodeproc import free_port
    return free_port()


# -- sign-in and sessions ----------------------------------------------------------------------------

def test_passwords_are_stored_as_argon2id_hashes(node):
    from node.store.index import Index

    row = Index(node.data_dir / "index.db").user("ada")
    assert row["password_hash"].startswith("$argon2id$")
    assert PASSWORD not in row["password_hash"]


def test_sign_in_sets_a_strict_http_only_cookie(node):
    r = httpx.post(node.web + "/api/session", json={"username": "ada", "password": PASSWORD})
    assert r.status_code == 200
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert "secure" not in cookie  # plain HTTP here; set whenever the request came over TLS
    assert r.json()["role"] == "admin" and r.json()["csrf_token"]
    assert httpx.post(node.web + "/api/session", json={"username": "ada", "password": "wrong password!"}
                      ).status_code == 401
    assert httpx.post(node.web + "/api/session", json={"username": "nobody", "password": PASSWORD}
                      ).status_code == 401
    # Both outcomes are in the audit trail, with who and from where.
    logins = node.api("GET", "/api/audit", params={"event": "login", "user": "ada"}).json()["entries"]
    assert {e["outcome"] for e in logins} == {0, 4}
    assert all(e["source_ip"] == "127.0.0.1" for e in logins)


def test_repeated_failed_sign_ins_are_throttled(node):
    add_user(node, "target", "viewer")
    for _ in range(5):
        assert httpx.post(node.web + "/api/session", json={"username": "target", "password": "guess guess"}
                          ).status_code == 401
    r = httpx.post(node.web + "/api/session", json={"username": "target", "password": PASSWORD})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0


def test_sign_out_ends_the_session(node):
    client, csrf = api_session(node, "vic")
    assert client.get("/api/session").status_code == 200
    assert client.request("DELETE", "/api/session", headers={"X-CSRF-Token": csrf}).json() == {"signed_out": True}
    assert client.get("/api/session").status_code == 401


def test_sessions_end_after_the_idle_timeout_and_polling_does_not_extend_them():
    now = [0.0]
    store = SessionStore(idle_s=60, max_age_s=3600, clock=lambda: now[0])
    sid, _ = store.create("ada")
    now[0] = 50
    assert store.get(sid) is not None  # activity: the idle clock restarts
    now[0] = 100
    assert store.get(sid, touch=False) is not None  # a background poll, 50 s after the last activity
    now[0] = 111
    assert store.get(sid) is None  # 61 s idle: gone for good
    sid, _ = store.create("ada")
    for t in range(0, 3651, 50):
        now[0] = 111 + t
        alive = store.get(sid)
    assert alive is None  # past the maximum age even when always active
    assert store.get("forged") is None


def test_node_reports_its_idle_timeout(node):
    client, _ = api_session(node, "vic")
    assert client.get("/api/session").json()["idle_timeout_s"] == 1800


# -- CSRF and roles ----------------------------------------------------------------------------------

def test_cookie_requests_that_change_state_need_the_csrf_token(node):
    client, csrf = api_session(node, "ada")
    body = {"files": {"ct.yaml": RULE}}
    assert client.post("/api/rules/validate", json=body).status_code == 403
    assert client.post("/api/rules/validate", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
    evil = client.post("/api/rules/validate", json=body, headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"})
    assert evil.status_code == 403
    assert client.post("/api/rules/validate", json=body, headers={"X-CSRF-Token": csrf}).json()["valid"] is True
    # A bearer token is never sent by a browser on its own: no CSRF token needed.
    assert node.api("POST", "/api/rules/validate", json=body).status_code == 200


def test_roles_are_enforced_by_the_server(node):
    viewer, vcsrf = api_session(node, "vic")
    h = {"X-CSRF-Token": vcsrf}
    assert viewer.get("/api/rules").status_code == 200
    assert viewer.get("/api/dashboard").status_code == 200
    assert viewer.put("/api/rules/files/new.yaml", json={"text": RULE.replace("ct-forward", "x")},
                      headers=h).status_code == 403
    assert not (Path(node.config["rules_dir"]) / "new.yaml").exists()
    assert viewer.post("/api/jobs/1/retry", headers=h).status_code == 403
    assert viewer.post("/api/deliveries/1/retry", headers=h).status_code == 403
    assert viewer.post(f"/api/studies/{node.study_uid}/complete", headers=h).status_code == 403
    assert viewer.post("/api/destinations/tps/echo", headers=h).status_code == 403
    assert viewer.post("/api/rules/history/1/revert", headers=h).status_code == 403
    assert stow(node, node.ct[:1], headers={"Cookie": f"hilum_session={viewer.cookies['hilum_session']}",
                                            "Origin": node.web}).status_code == 403
    # A role changed with the CLI applies to live sessions at once.
    add_user(node, "promoted", "viewer")
    client, csrf = api_session(node, "promoted")
    add_user(node, "promoted", "admin")
    assert client.post("/api/destinations/orthanc/echo", headers={"X-CSRF-Token": csrf}).json()["ok"] is True
    add_user(node, "promoted", "viewer")
    assert client.post("/api/destinations/orthanc/echo", headers={"X-CSRF-Token": csrf}).status_code == 403


def test_pages_need_a_session_and_the_archive_a_credential(node):
    anon = httpx.Client(base_url=node.web)
    for path, target in (("/", "/login?next=%2F"), ("/console/", "/login?next=%2Fconsole%2F"),
                         ("/console/rules", "/login?next=%2Fconsole%2Frules"),
                         ("/viewer?StudyInstanceUIDs=1.2", "/login?next=%2Fviewer%3FStudyInstanceUIDs%3D1.2")):
        r = anon.get(path)
        assert (r.status_code, r.headers["location"]) == (303, target), path
    assert anon.get("/dicom-web/studies").status_code == 401
    assert anon.get("/api/studies").status_code == 401
    assert anon.get("/login").status_code == 200
    assert anon.get("/console/static/common.js").status_code == 200  # code, no data


def test_security_headers_and_no_cors(node):
    client, _ = api_session(node, "vic")
    console = client.get("/console/")
    csp = console.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe" not in csp and "frame-ancestors 'none'" in csp
    ohif = client.get("/")
    assert "frame-ancestors 'none'" in ohif.headers["content-security-policy"]
    for r in (console, ohif, client.get("/api/health"), client.get("/dicom-web/studies")):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
    evil = {"Origin": "https://evil.example"}
    for r in (client.get("/api/studies", headers=evil),
              client.options("/api/studies", headers={**evil, "Access-Control-Request-Method": "GET"}),
              client.options("/dicom-web/studies", headers={**evil, "Access-Control-Request-Method": "POST"})):
        assert "access-control-allow-origin" not in r.headers
    assert client.get("/api/docs").status_code == 404  # no docs page loading scripts from a CDN


def test_annotators_store_through_the_gateway_and_administer_nothing(node, tmp_path):
    add_user(node, "ann", "annotator")
    annotator, acsrf = api_session(node, "ann")
    viewer, _ = api_session(node, "vic")
    h = {"X-CSRF-Token": acsrf}
    # Reads like a viewer...
    assert annotator.get("/api/dashboard").status_code == 200
    assert annotator.get("/api/rules").status_code == 200
    assert annotator.get(f"/dicom-web/studies/{node.study_uid}/series").status_code == 200
    # ... and stores through the gateway, as OHIF does when it saves a SEG; a viewer may not.
    mine, theirs = (write_ct_series(tmp_path / who, rows=16, cols=16, slices=1, seed=f"websec-{who}")[0]
                    for who in ("annotator", "viewer"))

    def stored(path) -> bool:
        study = pydicom.dcmread(path).StudyInstanceUID
        return bool(node.api("GET", f"/dicom-web/studies/{study}/instances").json() or [])

    def session_stow(client, path):
        return stow(node, [path], headers={"Cookie": f"hilum_session={client.cookies['hilum_session']}",
                                           "Origin": node.web})

    assert session_stow(annotator, mine).status_code == 200
    assert stored(mine)
    refused = session_stow(viewer, theirs)
    assert refused.status_code == 403 and "annotator" in refused.json()["detail"]
    assert not stored(theirs)
    # Nothing that changes the node itself.
    assert annotator.put("/api/rules/files/new.yaml", json={"text": RULE.replace("ct-forward", "x")},
                         headers=h).status_code == 403
    assert not (Path(node.config["rules_dir"]) / "new.yaml").exists()
    for path in ("/api/jobs/1/retry", "/api/deliveries/1/retry", f"/api/studies/{node.study_uid}/complete",
                 "/api/destinations/tps/echo", "/api/rules/history/1/revert"):
        assert annotator.post(path, headers=h).status_code == 403, path
    assert annotator.get("/api/audit").status_code == 403
    assert annotator.get("/api/session").json()["role"] == "annotator"


# -- the DICOMweb gateway ----------------------------------------------------------------------------

def test_an_api_body_without_a_length_is_limited_too(node):
    """A chunked body has no Content-Length: it was read whole (300 MiB held by the node for a
    sign-in that then failed); now refused once past the API's 1 MiB."""
    def chunks():
        for _ in range(4):
            yield b"x" * (512 << 10)

    r = httpx.post(f"{node.web}/api/session", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "content-length" not in {k.lower() for k in r.request.headers}
    small = httpx.post(f"{node.web}/api/session", content=iter([b'{"username": "x", ', b'"password": "y"}']),
                       headers={"content-type": "application/json"})
    assert small.status_code == 401  # a small chunked body still reaches the endpoint whole


def test_stow_is_limited_in_size(node):
    big = b"\0" * (1024 * 1024 + 1)
    h = {"Authorization": f"Bearer {node.token}", "Content-Type": "multipart/related; type=\"application/dicom\"; "
                                                                   "boundary=x"}
    assert httpx.post(node.web + "/dicom-web/studies", content=big, headers=h).status_code == 413

    def chunks():  # no Content-Length: counted while it streams
        for _ in range(17):
            yield b"\0" * 65536

    assert httpx.post(node.web + "/dicom-web/studies", content=chunks(), headers=h).status_code == 413
    assert stow(node, node.ct[:1]).status_code == 200


def test_stow_from_a_browser_session_needs_a_same_origin_dicom_request(node):
    admin, _ = api_session(node, "ada")
    cookie = {"Cookie": f"hilum_session={admin.cookies['hilum_session']}"}
    assert stow(node, node.ct[:1], headers={**cookie, "Origin": node.web}).status_code == 200
    assert stow(node, node.ct[:1], headers=cookie).status_code == 403  # no Origin: not a browser page of ours
    assert stow(node, node.ct[:1], headers={**cookie, "Origin": "https://evil.example"}).status_code == 403
    form = httpx.post(node.web + "/dicom-web/studies", content=b"x", headers={
        **cookie, "Origin": node.web, "Content-Type": "text/plain"})
    assert form.status_code == 403  # what a cross-site form could send


def test_gateway_points_bulk_data_at_itself_and_serves_single_part_octets(node):
    ds = pydicom.dcmread(node.ct[0])
    series = f"/dicom-web/studies/{node.study_uid}/series/{ds.SeriesInstanceUID}"
    meta = node.api("GET", f"{series}/instances/{ds.SOPInstanceUID}/metadata").json()[0]
    uri = meta["7FE00010"]["BulkDataURI"]
    assert uri.startswith(node.web + "/dicom-web/studies/"), uri  # not Orthanc's own address
    path = uri[len(node.web):]
    # What OHIF asks with singlepart 'bulkdata' (refused with 400 by DICOMweb plugin 1.7 itself).
    single = node.api("GET", path, headers={"Accept": "application/octet-stream"})
    assert single.status_code == 200
    assert single.headers["content-type"].startswith("application/octet-stream")
    assert single.content == ds.PixelData
    frame = node.api("GET", f"{series}/instances/{ds.SOPInstanceUID}/frames/1",
                     headers={"Accept": "application/octet-stream"})
    assert frame.status_code == 200 and frame.content == ds.PixelData
    multi = node.api("GET", path, headers={"Accept": "multipart/related; type=application/octet-stream"})
    assert multi.status_code == 200 and multi.headers["content-type"].startswith("multipart/related")
    assert ds.PixelData in multi.content
    # A browser accepts gzip: the archive compresses JSON for it, never pixel data (costly, little gain).
    gz = {"Accept-Encoding": "gzip"}
    meta = node.api("GET", f"{series}/metadata", headers={**gz, "Accept": "application/dicom+json"})
    assert meta.headers.get("content-encoding") == "gzip" and len(meta.json()) == 4
    frame = node.api("GET", f"{series}/instances/{ds.SOPInstanceUID}/frames/1",
                     headers={**gz, "Accept": "multipart/related; type=application/octet-stream"})
    assert frame.status_code == 200 and "content-encoding" not in frame.headers


# -- rules and destinations APIs ---------------------------------------------------------------------

def test_rules_api_validates_saves_explains_simulates_and_reverts(node):
    admin, csrf = api_session(node, "ada")
    h = {"X-CSRF-Token": csrf}
    before = admin.get("/api/rules").json()
    assert [r["name"] for r in before["rules"]] == ["ct-forward"]
    refused = admin.put("/api/rules/files/ct.yaml", json={"text": BAD_RULE}, headers=h)
    assert refused.status_code == 422
    (err,) = refused.json()["detail"]["errors"]
    assert (err["file"], err["line"], err["rule"]) == ("ct.yaml", 5, "ct-forward")
    assert "no-such-handler" in err["message"]
    assert admin.get("/api/rules/files/ct.yaml").json()["text"] == RULE  # nothing written
    edited = RULE.replace("CT series go to the archive", "CT series, archived")
    saved = admin.put("/api/rules/files/ct.yaml", json={"text": edited, "message": "reword"}, headers=h)
    assert saved.status_code == 200
    version = saved.json()["version"]
    assert (Path(node.config["rules_dir"]) / "ct.yaml").read_text() == edited
    history = admin.get("/api/rules/history").json()["versions"]
    assert history[0]["version"] == version and history[0]["author"] == "admin ada"
    assert "+description: CT series, archived" in admin.get(f"/api/rules/history/{version}").json()["diff"]
    explained = admin.post("/api/rules/explain", json={"study_uid": node.study_uid}, headers=h).json()
    series_rules = explained["explanations"][0]["rules"]
    assert series_rules[0]["rule"] == "ct-forward" and series_rules[0]["status"] == "matched"
    proposal = {"ct.yaml": RULE.replace("Modality: CT", "Modality: MR")}
    unmatched = admin.post("/api/rules/explain", json={"study_uid": node.study_uid, "files": proposal}, headers=h)
    assert unmatched.json()["explanations"][0]["rules"][0]["status"] == "not_matched"
    simulated = admin.post("/api/rules/simulate", json={"files": proposal}, headers=h).json()
    assert simulated["studies"] >= 1 and simulated["lost_jobs"] >= 1
    reverted = admin.post(f"/api/rules/history/{version - 1}/revert", headers=h)
    assert reverted.status_code == 200
    assert (Path(node.config["rules_dir"]) / "ct.yaml").read_text() == RULE
    assert admin.post("/api/rules/explain", json={"study_uid": "1.2.3.4"}, headers=h).status_code == 404


def test_destinations_are_listed_and_echoed(node):
    admin, csrf = api_session(node, "ada")
    listed = admin.get("/api/destinations").json()
    assert [d["name"] for d in listed["destinations"]] == ["down", "tps"]
    assert listed["accepts_any_caller"] is True
    h = {"X-CSRF-Token": csrf}
    ok = admin.post("/api/destinations/tps/echo", headers=h).json()
    assert ok["ok"] is True and ok["detail"] == "C-ECHO success"
    down = admin.post("/api/destinations/down/echo", headers=h).json()
    assert down["ok"] is False and "NOBODY@127.0.0.1" in down["detail"]
    assert admin.post("/api/destinations/orthanc/echo", headers=h).json()["ok"] is True
    assert admin.post("/api/destinations/nope/echo", headers=h).status_code == 404


def test_study_json_contract_is_kept(node):
    study = node.study(node.study_uid)
    assert {"study_uid", "patient_id", "patient_name", "instances_received", "stable", "series", "jobs"} <= set(study)
    assert study["instances_received"] == 4 and study["stable"] is True
    start = time.time()
    dash = node.api("GET", "/api/dashboard").json()
    assert dash["studies"][0]["study_uid"] == node.study_uid
    assert dash["last_hour"]["instances_received"] >= 4 and dash["now"] >= start - 5
