"""PACS synchronisation, continued: where a study's series came from (the study view), the patient's
issuer in prior matching, priors on remote workers, DICOM TLS to a source. Real peers: a second
Orthanc playing the hospital PACS, the node as a real `hilum up`."""
from __future__ import annotations

import json

from tests.nodeproc import NodeProcess, storescu, wait_for
from tests.pacs_peers import pacs_orthanc, tiny_study


def dimse(port: int, ae: str = "PACS", **kw) -> dict:
    return {"ae_title": ae, "host": "127.0.0.1", "port": port, **kw}


def test_study_view_says_which_rule_user_or_modality_brought_each_series(tmp_path):
    """Study S: its thin axial series retrieved by a pull rule (C-GET), its coronal series pushed by a
    modality; study T retrieved by a user through the API (C-MOVE). The API, `hilum status --study`
    and the console's dashboard say so per series."""
    from playwright.sync_api import sync_playwright

    from tests.web_support import BrowserErrors, add_user, launch, screenshot, sign_in

    s = tiny_study(tmp_path / "s", patient_id="P5", study_date="20240301",
                   series=(("AX THIN", 1.0, 3), ("COR", 3.0, 2)))
    t = tiny_study(tmp_path / "t", patient_id="P6", study_date="20240302", series=(("AX", 1.0, 2),))
    ax = next(u for u, v in s.series.items() if len(v) == 3)
    cor = next(u for u, v in s.series.items() if len(v) == 2)
    cor_files = [f for f in s.files if f.stem in set(s.series[cor])]
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "pull.yaml").write_text("kind: pull\nname: thin\nsource: pacs\nquery: {PatientID: P5}\n"
                                     "series: {SliceThickness: {le: 1.5}}\nschedule: {every: 1h}\n")
    with pacs_orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(s.files + t.files)
        node = NodeProcess(tmp_path / "node", rules, store_originals_in_orthanc=False, sources={
            "pacs": dimse(pacs.dicom_port, retrieve="get"), "pacsmove": dimse(pacs.dicom_port)})
        pacs.set_node("HILUM", node.dicom_port)
        node.start()
        try:
            assert storescu(node.dicom_port, cor_files, calling="MODALITY").returncode == 0
            rid = node.api("POST", "/api/pacs/retrieves", json={"source": "pacsmove", "study_uids": [t.study_uid]}
                           ).json()["ids"][0]

            def settled():
                rs = node.api("GET", "/api/pacs/retrieves").json()["retrieves"]
                return len(rs) == 2 and all(r["status"] in ("done", "failed") for r in rs) and rs

            rs = wait_for(settled, 90, "both retrieves")
            assert all(r["status"] == "done" for r in rs), rs
            rule_rid = next(r["id"] for r in rs if r["id"] != rid)
            view = wait_for(lambda: (v := node.study(s.study_uid)).get("instances_received") == 5 and v, 30, "S")
            by_series = {x["series_uid"]: x["origin"] for x in view["series"]}
            [got] = by_series[ax]["retrieved"]
            assert (got["retrieve"], got["source"], got["method"], got["by"], got["rule"], got["instances"]) == \
                (rule_rid, "pacs", "get", "rule", "thin", 3)
            assert got["at"] and by_series[ax]["pushed"] is None and by_series[ax]["arriving"] == []
            assert by_series[cor]["retrieved"] == []
            pushed = by_series[cor]["pushed"]
            assert (pushed["calling_ae"], pushed["called_ae"], pushed["source_ip"], pushed["instances"]) == \
                ("MODALITY", "HILUM", "127.0.0.1", 2)
            [tser] = node.study(t.study_uid)["series"]
            [got] = tser["origin"]["retrieved"]
            assert (got["retrieve"], got["source"], got["method"], got["by"], got["via"], got["instances"]) == \
                (rid, "pacsmove", "move", "user", "api", 2)
            assert tser["origin"]["pushed"] is None  # C-MOVE's instances arrive at the SCP: not taken as a push
            out = node.hilum("status", "--study", s.study_uid, "--config", str(node.config_path))
            assert out.returncode == 0, out.stderr
            assert f"retrieved from pacs by pull rule thin (retrieve {rule_rid}, C-GET, " in out.stdout
            assert "pushed by MODALITY from 127.0.0.1 to HILUM" in out.stdout and ": 2 instance(s)" in out.stdout
            js = json.loads(node.hilum("status", "--study", t.study_uid, "--json",
                                       "--config", str(node.config_path)).stdout)
            assert js["series"][0]["origin"]["retrieved"][0]["retrieve"] == rid
            missing = node.hilum("status", "--study", "1.2.3.999", "--config", str(node.config_path))
            assert missing.returncode == 1 and "not found" in missing.stderr
            add_user(node, "val", "viewer")
            with sync_playwright() as p:
                browser = launch(p)
                page = browser.new_page()
                errors = BrowserErrors(page)
                sign_in(page, node.web, "val")
                page.wait_for_selector(f"tr.origin[data-study='{s.study_uid}'] .series-origin[data-series='{cor}']")
                row = f"tr.origin[data-study='{s.study_uid}']"
                assert "retrieved from pacs by pull rule thin" in page.inner_text(f"{row} [data-series='{ax}']")
                assert "pushed by MODALITY from 127.0.0.1" in page.inner_text(f"{row} [data-series='{cor}']")
                assert f" via api (retrieve {rid}, C-MOVE, " in page.inner_text(f"tr.origin[data-study='{t.study_uid}']")
                screenshot(page, "dashboard-origin")
                assert errors.errors == []
                browser.close()
        finally:
            node.stop()
            node._kill_orthanc()
