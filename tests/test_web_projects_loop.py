"""The learning loop in a real browser: the console's project page and OHIF's segmentation mode.

A real node predicts two project cases with a (threshold) model. An annotator opens the project page,
clicks "Open next case in OHIF": OHIF opens the case at the top of the uncertainty queue in segmentation
mode with the model's SEG pre-loaded (hydrated, editable); they paint, export to the archive, and the saved
SEG becomes the case's label version that names the prediction it started from. With the second case
labelled too, the admin clicks Train, and the page draws the run's curves (loss, validation Dice) from
the run's epochs while it goes and once it is done.
"""
from __future__ import annotations

import io
import json
import os
import signal
import time

import pydicom
import pytest
import yaml
from pydicom.sr.codedict import codes

from node.models.train_config import TrainConfig
from node.phantom import generate_ct
from tests.nodeproc import running_node, storescu, wait_for
from tests.test_models_train import TINY_PHANTOM, tiny_config
from tests.test_projects import _seg
from tests.test_projects_node import _stow
from tests.web_support import (
    BrowserErrors,
    add_user,
    api_session,
    launch,
    screenshot,
    sign_in,
    wait_brush_ready,
    wait_hydrated,
)

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.slow

SEEN_BEFORE = """localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
localStorage.setItem('investigationalUseDialog', JSON.stringify({expiryDate: '2999-01-01T00:00:00Z'}));"""
VIEWPORT = {"width": 1400, "height": 900}
PHANTOM = {**TINY_PHANTOM, "rows": 64, "cols": 64, "pixel_spacing": 5.6}
EPOCHS = 4  # of the project's training run: enough to hold it mid-way and see the curves so far

SEGMENTATIONS = """() => {
  const s = window.services && window.services.segmentationService;
  if (!s) return null;
  return s.getSegmentations().map(seg => ({id: seg.segmentationId || seg.id, label: seg.label,
    segments: Object.values(seg.segments || {}).filter(x => x).map(x => x.label)}));
}"""


def two_threshold_model(path) -> None:
    """ONNX: "Left lung" where HU > -250 (the body), "Heart" where HU > 450 (the bones): two non-empty
    segments, so a corrected prediction is a complete label (the gateway wants every structure)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gain, mean, std = 0.05, -200.0, 500.0  # the card's preprocessing: x = (HU - mean) / std
    w = np.zeros((3, 1, 1, 1, 1), np.float32)
    b = np.zeros(3, np.float32)
    w[1, 0, 0], b[1] = gain * std, gain * (mean + 250)
    w[2, 0, 0], b[2] = 2 * gain * std, 2 * gain * (mean - 100)  # beats channel 1 above 450 HU
    node = helper.make_node("Conv", ["image", "w", "b"], ["logits"])
    graph = helper.make_graph(
        [node], "two-thresholds", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "z", "y", "x"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3, "z", "y", "x"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    raw = {**tiny_config(tmp), "epochs": EPOCHS}
    cfg = TrainConfig.model_validate(raw)
    builtin = tmp / "builtin" / "tiny"
    builtin.mkdir(parents=True)
    two_threshold_model(builtin / "model.onnx")
    card = cfg.card_draft().model_dump(mode="json", exclude_none=True)
    card["emit"] = ["SEG"]
    (builtin / "card.yaml").write_text(yaml.safe_dump(card))
    (tmp / "train.yaml").write_text(yaml.safe_dump(raw))
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "level": "series", "match": {"Modality": "CT"}, "destinations": ["orthanc"],
        "handler": {"name": "model:tiny", "params": {"uncertainty": {"intensity_scales": [0.9, 1.1]}}}}))
    studies = [generate_ct(tmp / f"ct{i}", seed=20 + i, **PHANTOM) for i in range(2)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HILUM_MODELS_DIR", str(builtin.parent))
        with running_node(tmp / "data", rules) as node:
            out = node.hilum("project", "create", "lungs", "--model-card", str(builtin), "--train-config",
                             str(tmp / "train.yaml"), *sum((["--study", s.study_uid] for s in studies), []),
                             "--annotator", "alice", "--config", str(node.config_path))
            assert out.returncode == 0, out.stderr
            add_user(node, "alice", "annotator")
            add_user(node, "root", "admin")
            for s in studies:
                assert storescu(node.dicom_port, s.dicom_dir).returncode == 0

            def predicted():
                view = node.api("GET", "/api/projects/lungs").json()
                return view if all(c["state"] == "predicted" for c in view["cases"].values()) else None

            wait_for(predicted, 180, "both cases predicted", interval=1)
            with playwright_api.sync_playwright() as pw:
                browser = launch(pw)
                yield node, studies, browser
                browser.close()


def _context(browser, node, user):
    ctx = browser.new_context(viewport=VIEWPORT)
    ctx.add_init_script(SEEN_BEFORE)
    page = ctx.new_page()
    sign_in(page, node.web, user, next_path="/console/projects")
    return ctx, page


def test_next_case_api_names_the_queue_head_and_the_prediction_series(loop):
    node, studies, _ = loop
    queue = node.api("GET", "/api/projects/lungs/queue?strategy=uncertainty").json()["queue"]
    nxt = node.api("GET", "/api/projects/lungs/next?strategy=uncertainty").json()
    assert nxt["case"] == queue[0]["study_uid"] and nxt["reason"] == queue[0]["reason"]
    pred = node.api("GET", "/api/projects/lungs").json()["cases"][nxt["case"]]["prediction"]
    with node.orthanc() as c:
        (found,) = c.post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": pred["seg_sop_uid"]},
                                               "Expand": True}).json()
        series = c.get(f"/series/{found['ParentSeries']}").json()["MainDicomTags"]["SeriesInstanceUID"]
    assert nxt["prediction"] == {"model_version": "0.1", "seg_sop_uid": pred["seg_sop_uid"], "seg_series_uid": series}
    assert nxt["viewer_url"] == (f"/segmentation?StudyInstanceUIDs={nxt['case']}&hangingProtocolId=%40ohif%2Fseg"
                                 f"&initialSeriesInstanceUID={series}")
    assert node.api("GET", "/api/projects/lungs/next?strategy=bogus").status_code == 422
    assert node.api("GET", "/api/projects/nope/next").status_code == 404


def test_project_page_opens_the_next_case_in_ohif_with_the_prediction_preloaded_and_saves_a_label(loop):
    node, studies, browser = loop
    ctx, page = _context(browser, node, "alice")
    errors = BrowserErrors(page).errors
    page.wait_for_selector('#counts [data-count="predicted"] b')
    assert page.inner_text('#counts [data-count="predicted"] b') == "2"
    assert page.locator("#queue li").count() == 2
    head = page.get_attribute("#queue li >> nth=0", "data-case")
    prediction = node.api("GET", "/api/projects/lungs").json()["cases"][head]["prediction"]
    screenshot(page, "project-page")
    with ctx.expect_page() as popup:
        page.click("#open-next")
    ohif = popup.value
    ohif_errors = BrowserErrors(ohif).errors
    ohif.wait_for_url(f"**/segmentation?StudyInstanceUIDs={head}*", timeout=60_000)
    # The prediction is pre-loaded: OHIF shows the SEG first and offers to load it for editing.
    ohif.get_by_role("button", name="Yes").click(timeout=120_000)

    def has_the_prediction(segs) -> bool:
        return any(s["label"].startswith("AI: tiny 0.1") and {"Left lung", "Heart"} <= set(s["segments"])
                   for s in segs)

    # Wait for what is asserted, not for any list: it may be read before the prediction's segments are in it.
    deadline = time.monotonic() + 90
    while not has_the_prediction(segs := ohif.evaluate(SEGMENTATIONS) or []) and time.monotonic() < deadline:
        ohif.wait_for_timeout(1000)
    assert has_the_prediction(segs), segs
    wait_hydrated(ohif)  # OHIF reloads the viewport with the SEG: paint only into the new one
    screenshot(ohif, "project-next-case-preloaded")
    # Correct it: a brush stroke across the middle of the viewport (mediastinum and the lung beside it, which
    # the model left out), then export the SEG into the study as a new series (STOW through the gateway).
    ohif.click('[data-cy="Brush-btn"]')
    wait_brush_ready(ohif)  # else the stroke may start before the brush is the active tool
    box = ohif.locator('[data-cy="viewport-pane"]').first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    ohif.mouse.move(x - 120, y)
    ohif.mouse.down()
    for i in range(30):
        ohif.mouse.move(x - 120 + 4 * i, y)
    ohif.mouse.up()
    screenshot(ohif, "project-next-case-corrected")
    ohif.locator('button[role="combobox"]:has-text("AI: tiny 0.1")').first.locator(
        "xpath=preceding-sibling::button[1]").click()
    ohif.get_by_text("Download & Export").hover()
    ohif.locator('[role="menu"]').nth(1).get_by_text("DICOM SEG").nth(1).click()
    ohif.locator('[role="dialog"] button[role="combobox"]').first.click()
    ohif.get_by_role("option", name="Create new series").click()  # not into the AI's own series
    ohif.get_by_placeholder("Report name").fill("Corrected lungs")
    with ohif.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/dicom-web/studies"),
                              timeout=60_000) as stored:
        ohif.get_by_role("button", name="Save").click()
    assert stored.value.status == 200, stored.value.text()
    case = node.api("GET", "/api/projects/lungs").json()["cases"][head]
    assert case["state"] == "in_review"
    (label,) = case["labels"]
    assert label["by"] == "annotator alice"
    assert label["from_prediction"] == {"job": prediction["job"], "model_version": "0.1",
                                        "seg_sop_uid": prediction["seg_sop_uid"]}
    with node.orthanc() as c:
        def read(sop_uid):
            (found,) = c.post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}).json()
            return pydicom.dcmread(io.BytesIO(c.get(f"/instances/{found}/file").content))

        ds, predicted_seg = read(label["sop_uid"]), read(prediction["seg_sop_uid"])
    assert ds.SeriesDescription == "Corrected lungs" and ds.SeriesInstanceUID != predicted_seg.SeriesInstanceUID
    assert {"Left lung", "Heart"} <= {s.SegmentLabel for s in ds.SegmentSequence}
    # It is the prediction, corrected: the model's voxels are all there, and the stroke added more.
    assert ds.pixel_array.astype(bool).sum() > predicted_seg.pixel_array.astype(bool).sum() > 0
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == next(s.series_uid for s in studies
                                                                    if s.study_uid == head)
    page.reload()
    page.wait_for_selector(f'#cases tr[data-case="{head}"][data-state="in_review"]')
    assert "v1 by annotator alice" in page.inner_text(f'#cases tr[data-case="{head}"]')
    assert errors == [] and [e for e in ohif_errors if "favicon" not in e] == []
    ctx.close()


def _first_epochs_of_a_stopped_run(node, project: str) -> tuple[str, int, int]:
    """Wait for the project's run to finish an epoch, then SIGSTOP its process (the real training run):
    the page can then be checked mid-run without racing it. Returns (run id, pid, epochs written)."""
    def started():
        runs = node.api("GET", f"/api/projects/{project}/runs").json()["runs"]
        return runs[0]["run"] if runs else None

    run_id = wait_for(started, 30, "the training run", interval=0.2)
    run_dir = node.data_dir / "projects" / project / "runs" / run_id

    def one_epoch():
        progress = run_dir / "progress.jsonl"
        if not progress.is_file() or "epoch 1/" not in progress.read_text():
            return None
        return json.loads((run_dir / "run.json").read_text())["pid"]

    # the run's process starts, imports torch and fetches the cases first: slow on a busy machine
    pid = wait_for(one_epoch, 300, "the run's first epoch", interval=0.02)
    os.kill(pid, signal.SIGSTOP)
    (run,) = node.api("GET", f"/api/projects/{project}/runs").json()["runs"]
    assert run["state"] == "running" and 1 <= len(run["epochs"]) < run["epochs"][0]["of"], run
    return run_id, pid, len(run["epochs"])


def test_train_button_draws_the_runs_curves(loop):
    node, studies, browser = loop
    alice, csrf = api_session(node, "alice")
    cases = node.api("GET", "/api/projects/lungs").json()["cases"]
    for s in studies:  # whatever the browser test left: every case labelled and accepted
        if cases[s.study_uid]["state"] == "predicted":
            seg = _seg(s, [("lung_left", codes.SCT.Lung), ("Heart", codes.SCT.Heart)])
            assert _stow(alice, csrf, node.web, seg).status_code == 200
        if node.api("GET", "/api/projects/lungs").json()["cases"][s.study_uid]["state"] == "in_review":
            r = alice.post(f"/api/projects/lungs/cases/{s.study_uid}/accept", headers={"X-CSRF-Token": csrf})
            assert r.status_code == 200, r.text
    ctx, page = _context(browser, node, "root")
    errors = BrowserErrors(page).errors
    dashboard = ctx.new_page()
    dashboard_errors = BrowserErrors(dashboard).errors
    dashboard.goto(f"{node.web}/console/")
    dashboard.wait_for_selector("#studies tr.study")
    assert dashboard.locator("#training").is_hidden()  # no run yet: no training panel
    page.wait_for_selector('#counts [data-count="labeled"] b')
    assert page.inner_text('#counts [data-count="labeled"] b') == "2"
    page.click("#train")
    page.wait_for_selector("#runs .run")
    # Live: mid-run (its process held after an epoch), the page's polling has drawn the epochs so far ...
    run_id, pid, k = _first_epochs_of_a_stopped_run(node, "lungs")
    try:
        page.wait_for_selector(f'#runs .run[data-state="running"] svg.curves[data-points="{k}"]', timeout=30_000)
        assert page.locator("svg.curves polyline.loss").get_attribute("points").count(",") == k
        assert f"epoch {k}/{EPOCHS}" in page.inner_text("#runs")
        screenshot(page, "project-run-curves-live")
        # ... and the dashboard shows the run going, with its last epoch's loss and validation Dice
        # (the dashboard may have polled between the run starting and its first epoch: wait for epoch k)
        row = dashboard.locator(
            f'#training tr.training-run[data-run="{run_id}"][data-state="running"][data-epoch="{k}"]')
        row.wait_for(timeout=30_000)
        (live,) = node.api("GET", "/api/dashboard").json()["training"]
        assert live["last_epoch"]["epoch"] == k and row.locator("td.epoch").inner_text() == f"{k}/{EPOCHS}"
        assert row.locator("td.loss").inner_text() == f"{live['last_epoch']['loss']:.4f}"
        assert row.locator("td.dice").inner_text().startswith(f"{live['last_epoch']['val_mean_dice']:.3f}")
        screenshot(dashboard, "dashboard-training-live")
    finally:
        os.kill(pid, signal.SIGCONT)
    # When done, the plot has one point per epoch.
    page.wait_for_selector('#runs .run:not([data-state="running"])', timeout=300_000)
    (run,) = node.api("GET", "/api/projects/lungs/runs").json()["runs"]
    screenshot(page, "project-run-curves")
    assert run["state"] == "done", run
    svg = page.locator('#runs .run[data-state="done"] svg.curves')
    assert int(svg.get_attribute("data-points")) == len(run["epochs"]) == EPOCHS
    loss_points = page.get_attribute("svg.curves polyline.loss", "points").split()
    assert len(loss_points) == EPOCHS
    ys = [float(p.split(",")[1]) for p in loss_points]
    losses = [e["loss"] for e in run["epochs"]]
    # The drawn loss goes the way the run's loss went, epoch to epoch (SVG y grows downwards).
    assert all((y1 > y0) == (l1 < l0) for y0, y1, l0, l1 in zip(ys, ys[1:], losses, losses[1:]) if l1 != l0)
    assert page.locator("svg.curves circle.dice").count() == sum(e["val_mean_dice"] is not None for e in run["epochs"])
    assert f"version {run['version']}" in page.inner_text("#runs")
    # the dashboard keeps the ended run for a while, with the version it made
    done = dashboard.locator(f'#training tr.training-run[data-run="{run_id}"][data-state="done"]')
    done.wait_for(timeout=30_000)
    assert f"version {run['version']}" in done.inner_text()
    screenshot(page, "project-run-curves")
    assert errors == [] and dashboard_errors == []
    ctx.close()
