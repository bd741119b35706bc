"""The web door under hostile or merely unlucky input: fast, in-process, against the real app over a Node
that is built but not started (no Orthanc: the archive is an ``httpx.MockTransport``).

1. The 3D-view WebSocket applies the HTTP routes' role check: no worker token, no unknown role.
2. /api/projects/{name}/next applies the project's visibility (refusals audited), store reads off the loop;
   the gateway's project check reads the store off the loop too.
3. The sign-in page's ``next`` stays on this node, as the browser's URL parser resolves it.
4. A SEG for a project case without SOPInstanceUID or SeriesInstanceUID is refused (409, naming it), not a 500.
5. A lone surrogate in a JSON body is a 422 without the input echoed, not a 500; the audit chain records one.
6. The same SEG stored again is the same label version: an accepted case stays accepted.
7. A rule file that is not UTF-8 makes only itself unreadable (422 naming it), and an admin may delete it.
"""
from __future__ import annotations

import asyncio
import io
import json
import uuid
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from starlette.websockets import WebSocketDisconnect

from node.audit.chain import ChainedLog, canonical
from node.audit.verify import verify
from node.config import Settings
from node.projects.store import ProjectStore
from node.runtime import Node
from node.web.app import create_app
from node.web.auth import create_token, hash_token
from node.web.users import set_user

PASSWORD = "correct horse battery staple"
CASE, INPUT_SERIES = "1.2.3.4", "1.2.3.4.5"
SEG_SOP, SEG_SERIES = "1.2.3.4.9.1", "1.2.3.4.9"
RULE = "name: ct-forward\ndescription: x\nmatch:\n  Modality: CT\ndestinations: [orthanc]\n"


def _archive(request: httpx.Request) -> httpx.Response:
    """The archive: the case's input series to a series search, 200 to everything else (STOW included)."""
    if request.url.path.endswith("/series"):
        return httpx.Response(200, json=[{"0020000E": {"vr": "UI", "Value": [INPUT_SERIES]}}])
    return httpx.Response(200, json=[], headers={"content-type": "application/dicom+json"})


@pytest.fixture
def site(tmp_path):
    (tmp_path / "rules").mkdir()
    node = Node(Settings(data_dir=tmp_path / "var", rules_dir=tmp_path / "rules"))
    node.http_client = httpx.AsyncClient(transport=httpx.MockTransport(_archive))
    for name, role in (("ada", "admin"), ("ann", "annotator"), ("vic", "viewer")):
        set_user(node.index, name, PASSWORD, role)
    app = create_app(node)
    try:
        yield node, app, tmp_path
    finally:
        node.ingest.close()
        node.vault.close()
        node.index.close()


def _login(app, name: str) -> TestClient:
    client = TestClient(app, raise_server_exceptions=False)
    r = client.post("/api/session", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    return client


def _project(node, tmp_path: Path, viewers=()) -> ProjectStore:
    """Project 'secret' with the one case CASE: annotator ann, viewers as given (vic not among them)."""
    from tests.test_projects import _model_and_config

    (tmp_path / "mc").mkdir()
    card, train = _model_and_config(tmp_path / "mc")
    store = ProjectStore.for_data_dir(node.settings.data_dir)
    store.create("secret", model_card=card, train_config=train, study_uids=[CASE], annotators=["ann"],
                 viewers=list(viewers), by="test")
    return store


def _labels(store: ProjectStore) -> list[str]:
    """Segment labels the project's SEGs must carry (its label names)."""
    return [lab.name for lab in store.get("secret").labels]


def _seg(store: ProjectStore, drop: tuple[str, ...] = ()) -> bytes:
    """A SEG header (no pixels: the gateway's check reads none) for CASE, drawn on its input series."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SOPInstanceUID = SEG_SOP
    ds.StudyInstanceUID = CASE
    ds.SeriesInstanceUID = SEG_SERIES
    ds.Modality = "SEG"
    ref = Dataset()
    ref.SeriesInstanceUID = INPUT_SERIES
    ds.ReferencedSeriesSequence = Sequence([ref])
    items = []
    for i, label in enumerate(_labels(store), 1):
        item = Dataset()
        item.SegmentNumber = i
        item.SegmentLabel = label
        items.append(item)
    ds.SegmentSequence = Sequence(items)
    for keyword in drop:
        delattr(ds, keyword)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = SEG_SOP
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _stow(client: TestClient, part: bytes) -> httpx.Response:
    boundary = uuid.uuid4().hex.encode()
    body = b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--" + boundary + b"--\r\n"
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary.decode()}'
    return client.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})


def _audit_text(node) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (node.settings.data_dir / "audit").glob("*.jsonl"))


# -- 1. the 3D view's WebSocket --------------------------------------------------------------------------

def test_view3d_websocket_refuses_worker_tokens_and_unknown_roles(site):
    node, app, _ = site
    client = TestClient(app)
    node.index.add_token(hash_token("hlm_other_version"), "auditor", "a role this code does not know")
    for token in (create_token(node.index, "worker", "w1"), "hlm_other_version"):
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect("/view3d/1.2.3/4.5.6/ws", headers={"Authorization": f"Bearer {token}"}):
                pass
        assert refused.value.code == 1008  # closed before accept: the handshake is refused
    # a viewer's token is let in (and told that the series is not here)
    viewer = create_token(node.index, "viewer", "v")
    with client.websocket_connect("/view3d/1.2.3/4.5.6/ws", headers={"Authorization": f"Bearer {viewer}"}) as ws:
        assert ws.receive_json()["type"] == "error"


# -- 2. the next case, and the store off the event loop ----------------------------------------------------

def _loop_reads(monkeypatch) -> list[tuple[str, bool]]:
    """Record each ProjectStore.cases/names call and whether it ran on an event loop's thread."""
    seen: list[tuple[str, bool]] = []

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    for method in ("cases", "names"):
        original = getattr(ProjectStore, method)

        def spy(self, *args, _original=original, _method=method):
            seen.append((_method, on_loop()))
            return _original(self, *args)

        monkeypatch.setattr(ProjectStore, method, spy)
    return seen


def test_next_case_is_refused_to_a_user_who_may_not_see_the_project(site, monkeypatch):
    node, app, tmp_path = site
    _project(node, tmp_path)
    vic = _login(app, "vic")
    r = vic.get("/api/projects/secret/next")
    assert r.status_code == 403 and "not a viewer of project 'secret'" in r.json()["detail"]
    assert CASE not in r.text
    assert "project-access" in _audit_text(node) and "not a viewer of project" in _audit_text(node)
    missing = vic.get("/api/projects/nope/next")
    assert missing.status_code == 404 and "secret" not in missing.text  # no names of projects vic may not see

    seen = _loop_reads(monkeypatch)
    r = _login(app, "ann").get("/api/projects/secret/next")
    assert r.status_code == 200 and r.json()["case"] == CASE
    assert ("cases", False) in seen and ("cases", True) not in seen  # read in a thread, not on the loop


def test_gateway_reads_the_project_store_off_the_event_loop(site, monkeypatch):
    node, app, tmp_path = site
    store = _project(node, tmp_path)
    ann = _login(app, "ann")
    seen = _loop_reads(monkeypatch)
    assert _stow(ann, _seg(store)).status_code == 200
    assert ("names", False) in seen and not [call for call in seen if call[1]]


# -- 3. the sign-in page's next --------------------------------------------------------------------------

def test_login_next_never_leaves_the_node():
    """login.js's nextPath() in headless Chromium, on a page of a made-up origin (no server needed)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.web_support import CHROMIUM, launch

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}")
    script = (Path(__file__).resolve().parents[1] / "node" / "web" / "console" / "login.js").read_text()
    page_html = f'<form id="login-form"></form><script>{script}</script>'
    origin = "https://hilum.test"
    cases = {
        "/console/rules?x=1#top": "/console/rules?x=1#top",
        "/viewer?StudyInstanceUIDs=1.2": "/viewer?StudyInstanceUIDs=1.2",
        "/": "/",
        "": "/console/",
        "//evil.example/x": "/console/",
        "/\\evil.example/x": "/console/",
        "/\t/evil.example/x": "/console/",  # ?next=/%09/evil.example/x: the parser drops the tab
        "/\n/evil.example/x": "/console/",
        "/\r/evil.example/x": "/console/",
        "https://evil.example/": "/console/",
        "javascript:alert(1)": "/console/",
    }
    with sync_api.sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page()
            page.route(f"{origin}/**",
                       lambda route: route.fulfill(status=200, content_type="text/html", body=page_html))
            for next_value, expected in cases.items():
                page.goto(f"{origin}/login?{urlencode({'next': next_value})}")
                chosen = page.evaluate("nextPath()")
                assert chosen == expected, (next_value, chosen)
                # and where the browser would really go with it
                assert page.evaluate("p => new URL(p, location.origin).origin", chosen) == origin
        finally:
            browser.close()


# -- 4. and 6. SEGs for a project case ---------------------------------------------------------------------

@pytest.mark.parametrize("missing", ["SOPInstanceUID", "SeriesInstanceUID"])
def test_seg_without_its_uids_is_refused_naming_the_attribute(site, missing):
    node, app, tmp_path = site
    store = _project(node, tmp_path)
    r = _stow(_login(app, "ann"), _seg(store, drop=(missing,)))
    assert r.status_code == 409 and missing in r.json()["detail"], r.text
    assert store.cases("secret")[CASE]["labels"] == []


def test_the_same_seg_again_is_the_same_label_version(site):
    node, app, tmp_path = site
    store = _project(node, tmp_path)
    ann = _login(app, "ann")
    assert _stow(ann, _seg(store)).status_code == 200
    assert ann.post(f"/api/projects/secret/cases/{CASE}/accept").status_code == 200
    assert _stow(ann, _seg(store)).status_code == 200  # a retry of the same instance
    case = store.cases("secret")[CASE]
    assert case["state"] == "labeled"
    assert [(lab["version"], lab["sop_uid"]) for lab in case["labels"]] == [(1, SEG_SOP)]


# -- 5. lone surrogates ------------------------------------------------------------------------------------

def test_lone_surrogate_in_a_json_body_is_a_422_without_the_input(site):
    _, app, _ = site
    anon = TestClient(app, raise_server_exceptions=False)
    r = anon.post("/api/session", content=b'{"username": "\\ud800", "password": "xxxxxxxxxxxx"}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "username"]]
    assert all(set(e) == {"type", "loc", "msg"} for e in r.json()["detail"])

    ada = _login(app, "ada")
    body = json.dumps({"text": RULE, "message": "PLACEHOLDER"}).replace("PLACEHOLDER", "\\ud800")
    r = ada.put("/api/rules/files/ct.yaml", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "message"]
    # an ordinary validation error: the field named, the input (here a password) not echoed
    r = anon.post("/api/session", json={"username": "ada", "password": "p" * 5000})
    assert r.status_code == 422 and "ppppp" not in r.text and r.json()["detail"][0]["loc"] == ["body", "password"]


def test_audit_chain_records_a_lone_surrogate_and_keeps_existing_bytes(tmp_path):
    log = ChainedLog(tmp_path / "audit.jsonl", b"k" * 32)
    log.append({"user": "caf\u00e9 \U0001F600", "n": 1})
    log.append({"user": "x\ud800y"})
    log.append({"user": "after"})
    assert verify(log).ok
    assert [e["user"] for e in log.entries()] == ["caf\u00e9 \U0001F600", "x\ud800y", "after"]
    valid = {"user": "caf\u00e9 \U0001F600", "path": "\\ud800 as text"}  # no surrogate: bytes as they always were
    assert canonical(valid) == json.dumps(valid, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# -- 7. a rule file that is not UTF-8 ---------------------------------------------------------------------

def test_rule_file_that_is_not_utf8(site):
    node, app, tmp_path = site
    ada = _login(app, "ada")
    assert ada.put("/api/rules/files/ct.yaml", json={"text": RULE}).status_code == 200
    latin1 = tmp_path / "rules" / "latin1.yaml"
    latin1.write_bytes("description: caf\xe9\n".encode("latin-1"))  # saved by another editor

    assert ada.get("/api/rules/files/ct.yaml").json()["text"] == RULE  # the other files still read
    r = ada.get("/api/rules/files/latin1.yaml")
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["errors"][0]["file"] == "latin1.yaml"
    assert "not UTF-8" in r.json()["detail"]["errors"][0]["message"]

    assert _login(app, "vic").delete("/api/rules/files/latin1.yaml").status_code == 403  # admins only, as ever
    assert latin1.exists()
    r = ada.delete("/api/rules/files/latin1.yaml")
    assert r.status_code == 200 and r.json()["deleted"] is True, r.text
    assert not latin1.exists() and (tmp_path / "rules" / "ct.yaml").exists()
    assert "deleted latin1.yaml" in _audit_text(node)
    assert [rule.name for rule in node.rules.current().rules] == ["ct-forward"]
    assert ada.put("/api/rules/files/latin1.yaml", json={"text": "# fixed\n"}).status_code == 200


# -- the gateway and an archive closing kept-alive connections ---------------------------------------
class _ClosingArchive:
    """A real HTTP server that answers the first request of each connection with keep-alive and closes
    the connection when a second one arrives on it: what Orthanc does when its KeepAliveTimeout (1 s)
    ends just as a request goes out. The race itself is too rare to provoke; its effect is this."""

    def __init__(self) -> None:
        import socket
        import threading
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answered = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.answered += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: 2\r\n"
                         b"Connection: keep-alive\r\n\r\n[]")
            conn.recv(65536)  # the next request on this connection: dropped unanswered


def test_the_gateway_sends_a_read_again_when_the_archive_drops_a_kept_alive_connection(tmp_path):
    """Before: 'server disconnected' on the reused connection became a 502 in the viewer (a frame
    missing, seen twice in the browser tests). A GET is sent again once on a fresh connection."""
    archive = _ClosingArchive()
    (tmp_path / "rules").mkdir()
    node = Node(Settings(data_dir=tmp_path / "var", rules_dir=tmp_path / "rules", orthanc_http_port=archive.port))
    node.http_client = node.archive.async_client()
    set_user(node.index, "vic", PASSWORD, "viewer")
    try:
        # One event loop for every request (the context manager), as uvicorn has: the client's kept-alive
        # connections belong to it.
        with TestClient(create_app(node), raise_server_exceptions=False) as client:
            r = client.post("/api/session", json={"username": "vic", "password": PASSWORD})
            client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
            for _ in range(3):
                r = client.get("/dicom-web/studies", headers={"Accept": "application/dicom+json"})
                assert r.status_code == 200 and r.json() == [], r.text
        assert archive.answered == 3
    finally:
        archive.sock.close()
        node.ingest.close()
        node.vault.close()
        node.index.close()
