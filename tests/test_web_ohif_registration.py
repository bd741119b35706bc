"""OHIF shows the node's registered MR in register with the CT (issue 18).

A head CT and MR of one study (each in its own Frame of Reference, the MR moved by a known rigid
transform) carry one bright marker at the same point of the head. A real node (managed Orthanc)
receives both by C-STORE, runs the shipped ``mr-to-ct-registration`` rule and stores the MR
resampled onto the CT's grid. OHIF, in headless chromium, shows the CT and the resampled MR side by
side (1x2 layout, OHIF's own viewport grid; no registration knowledge in the viewer). On the
marker's slice, each viewport is windowed so that only the marker is bright; the bright spots' screen
positions, found in a screenshot, must agree with each other within one screen pixel per mm of the
allowed MR-CT registration error (the issue's 2.0 mm), and with where cornerstone draws the true
marker point. Screenshots stay under test-artifacts/web/.
"""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from node.phantom.pairs import generate_head_ct_mr
from tests.nodeproc import REPO, running_node, storescu, wait_for
from tests.web_support import BrowserErrors, add_user, launch, screenshot, sign_in

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.slow

SEEN_BEFORE = """localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
localStorage.setItem('investigationalUseDialog', JSON.stringify({expiryDate: '2999-01-01T00:00:00Z'}));"""
VIEWPORT = {"width": 1400, "height": 900}
MARKER_MM = (25.5, -19.5, 30.0)  # in the brain, right of the midline, above the ventricles (CT patient mm)
MARKER_RADIUS_MM = 6.0
MR_CT_ERROR_MM = 2.0  # the bound on the MR-CT rigid registration error (mean TRE)
# Windows (modality units) under which only the marker (3000) is bright: above bone (1300 HU) on
# the CT, above the brightest tissue (scalp, 900 + noise) on the MR.
CT_WINDOW, MR_WINDOW = (1700.0, 2300.0), (1300.0, 1900.0)

SIDE_BY_SIDE = """([ctSeries, mrSeries]) => {
  // OHIF's viewport grid in two columns, the CT left and the resampled MR right: what a user gets
  // with the layout tool and drag-and-drop of the thumbnails.
  const s = window.services;
  const sets = s.displaySetService.getActiveDisplaySets();
  const ct = sets.find(d => d.SeriesInstanceUID === ctSeries);
  const mr = sets.find(d => d.SeriesInstanceUID === mrSeries);
  const show = [ct, mr].map(d => d.displaySetInstanceUID);
  s.viewportGridService.setLayout({numRows: 1, numCols: 2, findOrCreateViewport: position => ({
    displaySetInstanceUIDs: [show[position]], viewportOptions: {viewportType: 'stack'},
    displaySetOptions: [{}]})});
  return show;
}"""

SHOWN = """() => {
  // (viewport id, number of images, series) of each cornerstone viewport
  const cs = window.cornerstone;
  if (!cs || !cs.getRenderingEngines().length) return [];
  return cs.getRenderingEngines()[0].getViewports().map(v => {
    const ids = v.getImageIds ? v.getImageIds() : [];
    const series = ids.length ? cs.metaData.get('generalSeriesModule', ids[0]) : null;
    return [v.id, ids.length, series ? series.seriesInstanceUID : null];
  });
}"""

TO_MARKER = """async ([ctSeries, mrSeries, marker, windows]) => {
  // Both viewports to the slice nearest the marker, windowed so that only the marker is bright;
  // where cornerstone draws the marker point (and a point 10 mm beside it) on the page.
  const cs = window.cornerstone;
  const vps = cs.getRenderingEngines()[0].getViewports();
  const out = {};
  for (const [key, uid, win] of [['ct', ctSeries, windows[0]], ['mr', mrSeries, windows[1]]]) {
    const vp = vps.find(v => v.getImageIds && v.getImageIds().length > 1
      && cs.metaData.get('generalSeriesModule', v.getImageIds()[0]).seriesInstanceUID === uid);
    if (!vp) return null;
    const ids = vp.getImageIds();
    let best = -1, distance = Infinity;
    ids.forEach((id, i) => {
      const d = Math.abs(cs.metaData.get('imagePlaneModule', id).imagePositionPatient[2] - marker[2]);
      if (d < distance) { distance = d; best = i; }
    });
    try {
      await vp.setImageIdIndex(best);
      vp.setProperties({voiRange: {lower: win[0], upper: win[1]}});
      vp.render();
    } catch (e) {
      if (cs.getRenderingEngines()[0].getViewport(vp.id) !== vp) return null;  // OHIF replaced it: again
      throw e;
    }
    await new Promise(r => setTimeout(r, 1000));
    const voi = vp.getProperties().voiRange;
    const rect = vp.canvas.getBoundingClientRect();
    const onPage = w => { const c = vp.worldToCanvas(w); return [rect.left + c[0], rect.top + c[1]]; };
    // The slice shown when measured: OHIF may still set up the stack after the layout change.
    out[key] = {distance, best, index: vp.getCurrentImageIdIndex(), marker: onPage(marker), beside: onPage([marker[0] + 10, marker[1], marker[2]]),
                rect: [rect.left, rect.top, rect.width, rect.height], voi: voi ? [voi.lower, voi.upper] : null};
  }
  return out;
}"""

STILL = """([ctSeries, mrSeries]) => {
  // Each viewport's image index and window now (read after the screenshot): OHIF finishing a stack's
  // set-up may have moved it or reset its window since TO_MARKER measured.
  const cs = window.cornerstone;
  const vps = cs.getRenderingEngines()[0].getViewports();
  const out = {};
  for (const [key, uid] of [['ct', ctSeries], ['mr', mrSeries]]) {
    const vp = vps.find(v => v.getImageIds && v.getImageIds().length > 1
      && cs.metaData.get('generalSeriesModule', v.getImageIds()[0]).seriesInstanceUID === uid);
    if (!vp) return null;
    const voi = vp.getProperties().voiRange;
    out[key] = {index: vp.getCurrentImageIdIndex(), voi: voi ? [voi.lower, voi.upper] : null};
  }
  return out;
}"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A node that has registered the head MR onto the CT; yields (node, CT, resampled MR series UID)."""
    tmp = tmp_path_factory.mktemp("ohif_reg")
    ct, mr = generate_head_ct_mr(tmp / "pair", ct_pixel_mm=3.0, mr_pixel_mm=3.0, marker_mm=MARKER_MM,
                                 marker_radius_mm=MARKER_RADIUS_MM)
    rules = tmp / "rules"
    rules.mkdir()
    shutil.copy(REPO / "rules" / "registration.yaml", rules)
    with running_node(tmp / "node", rules) as node:
        add_user(node, "rad", "viewer")
        for study in (ct, mr):
            out = storescu(node.dicom_port, study.dicom_dir)
            assert out.returncode == 0, out.stderr
        n_ct = len(ct.series_files())

        def resampled() -> str | None:
            series = node.api("GET", f"/dicom-web/studies/{ct.study_uid}/series").json() or []
            for s in series:
                uid = s["0020000E"]["Value"][0]
                if s["00080060"]["Value"] == ["MR"] and uid != mr.series_uid:
                    n = len(node.api("GET", f"/dicom-web/studies/{ct.study_uid}/series/{uid}/instances").json()
                            or [])
                    return uid if n == n_ct else None
            return None

        wait_for(lambda: resampled() is not None, 300, "the resampled MR in the archive")
        yield node, ct, resampled()


def test_resampled_mr_lands_on_the_ct_in_ohif(registered):
    node, ct, resampled_uid = registered
    with playwright_api.sync_playwright() as pw:
        browser = launch(pw)
        ctx = browser.new_context(viewport=VIEWPORT)
        ctx.add_init_script(SEEN_BEFORE)
        page = ctx.new_page()
        errors = BrowserErrors(page).errors
        sign_in(page, node.web, "rad")
        page.goto(f"{node.web}/viewer?StudyInstanceUIDs={ct.study_uid}")
        page.get_by_text("HEAD 3mm").first.wait_for(timeout=90_000)
        n = len(ct.series_files())
        listed = []
        for _ in range(90):  # the study's series, as OHIF made them into display sets
            listed = page.evaluate("() => window.services ? window.services.displaySetService.getActiveDisplaySets()"
                                   ".map(d => [d.SeriesInstanceUID, d.Modality, d.numImageFrames]) : []")
            if {ct.series_uid, resampled_uid} <= {uid for uid, _, _ in listed}:
                break
            page.wait_for_timeout(1000)
        assert {ct.series_uid, resampled_uid} <= {uid for uid, _, _ in listed}, listed
        page.wait_for_function("() => window.cornerstone && window.cornerstone.getRenderingEngines().length > 0"
                               " && window.cornerstone.getRenderingEngines()[0].getViewports().some("
                               "v => v.getImageIds && v.getImageIds().length > 1)", timeout=90_000)
        page.evaluate(SIDE_BY_SIDE, [ct.series_uid, resampled_uid])
        want = {(ct.series_uid, n), (resampled_uid, n)}
        for _ in range(90):
            shown = page.evaluate(SHOWN)
            if want <= {(uid, k) for _, k, uid in shown}:
                break
            page.wait_for_timeout(1000)
        assert want <= {(uid, k) for _, k, uid in shown}, (shown, errors,
                                                            screenshot(page, "ohif-registration-failed")[:0])
        # Rendering is asynchronous (images stream, OHIF finishes setting up each stack after the
        # layout change): measure again until both viewports show the marker's slice and a marker-sized
        # spot (not the head lit up by a window reset), and still show that slice under that window
        # once the screenshot is taken. Where the spots are is judged only after, once.
        deadline = time.monotonic() + 90
        while True:
            shown = page.evaluate(TO_MARKER, [ct.series_uid, resampled_uid, list(MARKER_MM), [CT_WINDOW, MR_WINDOW]])
            if shown:
                img = screenshot(page, "ohif-registration-side-by-side")
                still = page.evaluate(STILL, [ct.series_uid, resampled_uid])
                if still and all(shown[k]["index"] == shown[k]["best"] == still[k]["index"]
                                 and shown[k]["voi"] is not None and still[k]["voi"] is not None
                                 and np.allclose(shown[k]["voi"], still[k]["voi"]) and marker_sized(img, shown[k])
                                 for k in ("ct", "mr")):
                    break
            if time.monotonic() > deadline:
                break
            page.wait_for_timeout(2000)
        browser.close()

    assert shown, f"no CT and resampled MR viewports to measure: {errors}"
    spots = {}
    for key in ("ct", "mr"):
        s = shown[key]
        assert s["distance"] < 2.0, f"{key}: no slice near the marker (z {MARKER_MM[2]})"
        assert s["index"] == s["best"], f"{key}: the viewport shows image {s['index']}, not the marker's {s['best']}"
        centre, px_per_mm = bright_spot(img, s)
        x, y, w, h = s["rect"]
        # Relative to its own viewport: the two viewports are the same size, side by side.
        spots[key] = (centre - (x, y), np.subtract(s["marker"], (x, y)), px_per_mm, (w, h))
    (ct_spot, ct_truth, ct_scale, ct_size), (mr_spot, mr_truth, mr_scale, mr_size) = spots["ct"], spots["mr"]
    # The two canvases may differ by a pixel in width (the grid splits the page), so each spot is
    # measured from where its own viewport draws the marker's true point.
    assert np.allclose(ct_size, mr_size, atol=2) and ct_scale == pytest.approx(mr_scale, rel=0.01), \
        f"viewports not alike: {ct_size} {ct_scale} vs {mr_size} {mr_scale}"
    assert np.allclose(ct_truth, mr_truth, atol=1.0), "the viewports do not draw the CT's grid alike"
    # The CT's spot is the marker (half a 3 mm voxel of discretisation); the MR's lands on the CT's.
    off_ct = float(np.linalg.norm(ct_spot - ct_truth))
    off_mr = float(np.linalg.norm((mr_spot - mr_truth) - (ct_spot - ct_truth)))
    assert off_ct <= 1.5 * ct_scale, f"CT marker drawn {off_ct / ct_scale:.2f} mm from its true point"
    assert off_mr <= MR_CT_ERROR_MM * ct_scale, \
        f"the resampled MR's marker is {off_mr:.1f} screen px ({off_mr / ct_scale:.2f} mm) from the CT's"
    print(f"marker: CT {off_ct / ct_scale:.2f} mm from truth, MR {off_mr:.1f} px = {off_mr / ct_scale:.2f} mm "
          f"from the CT's ({ct_scale:.2f} px/mm)")
    # This test drives cornerstone's viewports directly; when OHIF replaces one after the layout change
    # while the test still holds it, cornerstone throws about the test's stale reference (and the test
    # measures again). That is the test's doing, not the viewer's: every other error still fails.
    assert [e for e in errors if "viewport has been destroyed" not in e] == []


FUSED = """([ctSeries, mrSeries]) => {
  // One volume viewport with the CT below and the resampled MR above it (50 % opacity): OHIF's
  // fusion, as its PET-CT mode sets it up, here for an MR that shares the CT's Frame of Reference.
  const s = window.services;
  const sets = s.displaySetService.getActiveDisplaySets();
  const show = [ctSeries, mrSeries].map(uid => sets.find(d => d.SeriesInstanceUID === uid).displaySetInstanceUID);
  s.viewportGridService.setLayout({numRows: 1, numCols: 1, findOrCreateViewport: () => ({
    displaySetInstanceUIDs: show, viewportOptions: {viewportType: 'volume', orientation: 'axial'},
    displaySetOptions: [{}, {colormap: {name: 'hsv', opacity: 0.5}}]})});
  return show;
}"""

FUSED_READY = """() => {
  const cs = window.cornerstone;
  if (!cs || !cs.getRenderingEngines().length) return 0;
  const vp = cs.getRenderingEngines()[0].getViewports().find(v => v.getActors().length === 2);
  return vp ? 2 : 0;
}"""

FUSED_LOADED = """() => {
  // Both layers' volumes streamed in whole: a half-loaded volume may show part of the marker only.
  const cs = window.cornerstone;
  const vp = cs.getRenderingEngines()[0].getViewports().find(v => v.getActors().length === 2);
  return !!vp && vp.getActors().every(a => {
    const volume = cs.cache.getVolume(a.referencedId);
    return !!volume && !!volume.loadStatus && volume.loadStatus.loaded;
  });
}"""

FUSED_LAYER = """async ([marker, windows, layer]) => {
  // The fused viewport on the marker's plane; only one of its two layers (0: CT, 1: MR) visible,
  // windowed so that only the marker is bright. Where cornerstone draws the marker on the page.
  const cs = window.cornerstone;
  const vp = cs.getRenderingEngines()[0].getViewports().find(v => v.getActors().length === 2);
  const cam = vp.getCamera();
  const dz = marker[2] - cam.focalPoint[2];
  vp.setCamera({focalPoint: [cam.focalPoint[0], cam.focalPoint[1], marker[2]],
                position: [cam.position[0], cam.position[1], cam.position[2] + dz]});
  vp.getActors().forEach((a, i) => {
    vp.setProperties({voiRange: {lower: windows[i][0], upper: windows[i][1]},
                      colormap: {name: 'Grayscale', opacity: 1}}, a.referencedId);
    a.actor.setVisibility(i === layer);
  });
  vp.render();
  await new Promise(r => setTimeout(r, 1000));
  const rect = vp.canvas.getBoundingClientRect();
  const onPage = w => { const c = vp.worldToCanvas(w); return [rect.left + c[0], rect.top + c[1]]; };
  return {visible: vp.getActors()[layer].referencedId, marker: onPage(marker),
          beside: onPage([marker[0] + 10, marker[1], marker[2]]), rect: [rect.left, rect.top, rect.width, rect.height]};
}"""


def px_per_mm(shown: dict) -> float:
    return float(np.hypot(*np.subtract(shown["beside"], shown["marker"]))) / 10.0


def bright_pixels(img: np.ndarray, shown: dict) -> np.ndarray:
    """A mask of the bright pixels within 30 mm of where the marker should be, in its viewport."""
    x, y, w, h = shown["rect"]
    r = 30 * px_per_mm(shown)  # the viewport's corner texts are white too: look only near the marker
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    near = ((xs + 0.5 - shown["marker"][0]) ** 2 + (ys + 0.5 - shown["marker"][1]) ** 2 < r * r) \
        & (xs >= x) & (xs < x + w) & (ys >= y) & (ys < y + h)
    return near & (img.mean(axis=2) > 128)


def marker_sized(img: np.ndarray, shown: dict) -> bool:
    """Whether the bright area near the marker is about the marker's cut: more than bright_spot asks,
    at most twice the disc through its centre (not the head lit up by a window OHIF reset)."""
    scale = px_per_mm(shown)
    return 4 * scale ** 2 < bright_pixels(img, shown).sum() < 2 * np.pi * MARKER_RADIUS_MM ** 2 * scale ** 2


def bright_spot(img: np.ndarray, shown: dict) -> tuple[np.ndarray, float]:
    """The centre (page px) of the bright spot near where the marker should be, and px per mm."""
    scale = px_per_mm(shown)
    bright = bright_pixels(img, shown)
    assert bright.sum() > 4 * scale ** 2, f"no bright marker on screen near {shown['marker']}"
    ys, xs = np.nonzero(bright)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5]), scale


def test_resampled_mr_fused_over_the_ct_in_ohif(registered):
    node, ct, resampled_uid = registered
    with playwright_api.sync_playwright() as pw:
        browser = launch(pw)
        ctx = browser.new_context(viewport=VIEWPORT)
        ctx.add_init_script(SEEN_BEFORE)
        page = ctx.new_page()
        errors = BrowserErrors(page).errors
        sign_in(page, node.web, "rad")
        page.goto(f"{node.web}/viewer?StudyInstanceUIDs={ct.study_uid}")
        page.get_by_text("HEAD 3mm").first.wait_for(timeout=90_000)
        page.wait_for_function("() => window.cornerstone && window.cornerstone.getRenderingEngines().length > 0"
                               " && window.cornerstone.getRenderingEngines()[0].getViewports().some("
                               "v => v.getImageIds && v.getImageIds().length > 1)", timeout=90_000)
        page.wait_for_function("([a, b]) => [a, b].every(uid => window.services.displaySetService"
                               ".getActiveDisplaySets().some(d => d.SeriesInstanceUID === uid))",
                               arg=[ct.series_uid, resampled_uid], timeout=90_000)
        display_sets = page.evaluate(FUSED, [ct.series_uid, resampled_uid])
        page.wait_for_function(FUSED_READY, timeout=90_000)
        page.wait_for_function(FUSED_LOADED, timeout=120_000)  # the two volumes stream in
        screenshot(page, "ohif-registration-fused")
        layers = []
        for layer in (0, 1):
            for _ in range(15):  # until the layer shows a marker-sized spot (rendering is asynchronous)
                shown = page.evaluate(FUSED_LAYER, [list(MARKER_MM), [CT_WINDOW, MR_WINDOW], layer])
                img = screenshot(page, f"ohif-registration-fused-layer{layer}")
                if marker_sized(img, shown):
                    break
                page.wait_for_timeout(2000)
            layers.append((shown, img))
        browser.close()
    (ct_shown, ct_img), (mr_shown, mr_img) = layers
    # Each screenshot shows the layer it should: the CT's volume, then the resampled MR's.
    assert display_sets[0] in ct_shown.pop("visible") and display_sets[1] in mr_shown.pop("visible")
    assert ct_shown == mr_shown, "the viewport moved between the two layers"
    ct_spot, scale = bright_spot(ct_img, ct_shown)
    mr_spot, _ = bright_spot(mr_img, mr_shown)
    off_ct = float(np.linalg.norm(ct_spot - ct_shown["marker"]))
    off_mr = float(np.linalg.norm(mr_spot - ct_spot))
    assert off_ct <= 1.5 * scale, f"CT marker drawn {off_ct / scale:.2f} mm from its true point"
    assert off_mr <= MR_CT_ERROR_MM * scale, \
        f"the fused MR's marker is {off_mr:.1f} screen px ({off_mr / scale:.2f} mm) from the CT's"
    print(f"fused: CT {off_ct / scale:.2f} mm from truth, MR {off_mr:.1f} px = {off_mr / scale:.2f} mm "
          f"from the CT's ({scale:.2f} px/mm)")
    assert errors == []
