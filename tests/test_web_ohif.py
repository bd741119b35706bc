"""OHIF, served by the node, reading a phantom CT and its SEG, RTSTRUCT and SR through the gateway.

A real node (managed Orthanc 1.10 + DICOMweb plugin 1.7) receives the CT by C-STORE; the lung
results, made by the node's encoders from the phantom's true lungs, go in by STOW-RS through the
gateway. Debian's chromium, driven by playwright, signs in as a viewer (or, to save a SEG, as an
annotator) and uses OHIF as a radiologist would. Overlays are checked by pixel colour against where the true lungs are on the
screen (mapped with cornerstone's own world-to-canvas transform). Screenshots stay under
test-artifacts/web/.
"""
from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from node.encoders.sr import KEY_SLICE_PREFIX
from node.encoders.sr_templates import load_template
from tests.nodeproc import NodeProcess, running_node, storescu, wait_for
from tests.web_support import (
    CINE_DESCRIPTION,
    CINE_PALETTE,
    LUNG_LEFT_COLOR,
    LUNG_RIGHT_COLOR,
    BrowserErrors,
    LungStudy,
    add_user,
    colored,
    dilate,
    erode,
    launch,
    lung_study,
    mask_on_screen,
    screenshot,
    sign_in,
    slice_on_screen,
    stable_listing,
    stow,
    wait_brush_ready,
    wait_hydrated,
)

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.slow

# A returning user: OHIF's onboarding tour and investigational-use notice were already seen.
SEEN_BEFORE = """localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
localStorage.setItem('investigationalUseDialog', JSON.stringify({expiryDate: '2999-01-01T00:00:00Z'}));"""
VIEWPORT = {"width": 1400, "height": 900}


@dataclass
class Site:
    node: NodeProcess
    study: LungStudy
    contexts: dict  # user -> a signed-in browser context (one per user: OHIF's bundles stay cached)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ohif")
    study = lung_study(tmp / "study")
    rules = tmp / "rules"
    rules.mkdir()
    with running_node(tmp / "node", rules) as node:
        add_user(node, "rad", "viewer")
        add_user(node, "ann", "annotator")
        out = storescu(node.dicom_port, study.dicom_dir)
        assert out.returncode == 0, out.stderr
        n_ct = len(list(study.dicom_dir.iterdir()))
        wait_for(lambda: len(node.api("GET", f"/dicom-web/studies/{study.study_uid}/series/{study.series_uid}"
                                             "/instances").json() or []) == n_ct, 90, "the CT in the archive")
        r = stow(node, study.results)
        assert r.status_code == 200, r.text
        with playwright_api.sync_playwright() as pw:
            browser = launch(pw)
            contexts = {}
            for user in ("rad", "ann"):
                contexts[user] = browser.new_context(viewport=VIEWPORT)
                contexts[user].add_init_script(SEEN_BEFORE)
                first = contexts[user].new_page()
                sign_in(first, node.web, user)
                first.close()
            yield Site(node, study, contexts)
            browser.close()


def _page(ctx):
    page = ctx.new_page()
    page.errors = BrowserErrors(page).errors
    return page


@pytest.fixture
def page(site):
    """A page of the radiologist (viewer role)."""
    page = _page(site.contexts["rad"])
    yield page
    page.close()


@pytest.fixture
def annotator_page(site):
    """A page of a radiologist who may store into the archive (annotator role)."""
    page = _page(site.contexts["ann"])
    yield page
    page.close()


def open_viewer(page, site: Site) -> None:
    page.goto(f"{site.node.web}/viewer?StudyInstanceUIDs={site.study.study_uid}")
    page.get_by_text("CHEST 5mm").first.wait_for(timeout=90_000)  # the CT's thumbnail
    page.wait_for_function("() => window.cornerstone && window.cornerstone.getRenderingEngines().length > 0"
                           " && window.cornerstone.getRenderingEngines()[0].getViewports().some("
                           "v => v.getImageIds && v.getImageIds().length > 1)", timeout=90_000)


def load_overlay(page, modality: str) -> None:
    """Double-click the series in the study browser and accept OHIF's offer to overlay it on the CT."""
    page.get_by_text(modality, exact=True).first.dblclick()
    page.get_by_role("button", name="Yes").click(timeout=90_000)
    wait_hydrated(page)  # OHIF reloads the viewport with the overlay: measure only the new one


def lung_slice(study: LungStudy) -> int:
    return int((study.left | study.right).sum(axis=(1, 2)).argmax())


def screen_masks(page, study: LungStudy, k: int, shape) -> tuple[np.ndarray, np.ndarray, tuple]:
    affine, box = slice_on_screen(page, study.geometry, k)
    return (mask_on_screen(study.left[k], affine, box, shape), mask_on_screen(study.right[k], affine, box, shape),
            box)


def test_study_list_opens_the_study(site, page):
    page.goto(site.node.web + "/")
    row = page.get_by_text(site.study.patient_id)
    row.wait_for(timeout=90_000)
    listed = page.inner_text("body")
    assert "PHANTOM, CHEST" in listed  # PN PHANTOM^CHEST, formatted by OHIF
    instances = len(list(site.study.dicom_dir.iterdir())) + len(site.study.results)
    assert re.search(rf"(^|\s){instances}(\s|$)", listed), f"the study's {instances} instances are not listed"
    screenshot(page, "ohif-study-list")
    row.click()
    page.get_by_role("button", name="Basic Viewer").first.click(timeout=30_000)
    page.wait_for_url(f"**/viewer?*StudyInstanceUIDs={site.study.study_uid}*", timeout=60_000)
    for label in ("CHEST 5mm", "SEG", "RTSTRUCT", "SR"):
        page.get_by_text(label, exact=True).first.wait_for(timeout=90_000)
    screenshot(page, "ohif-study-opened")
    assert page.errors == []


def test_seg_overlay_covers_the_true_lungs(site, page):
    open_viewer(page, site)
    load_overlay(page, "SEG")
    k = lung_slice(site.study)
    # The labelmap is drawn asynchronously after the slice change, and a screenshot may catch the
    # canvas mid-resize (the segmentation panel opening): look again until what is asserted holds.
    deadline = time.monotonic() + 60
    while True:
        left, right, box = screen_masks(page, site.study, k, (VIEWPORT["height"], VIEWPORT["width"]))
        img = screenshot(page, "ohif-seg-overlay")
        green, magenta = colored(img, LUNG_LEFT_COLOR), colored(img, LUNG_RIGHT_COLOR)
        core_left, core_right = erode(left, 4), erode(right, 4)  # ~ half a voxel in from the edge
        recall = (green[core_left].mean(), magenta[core_right].mean())
        precision = (green[dilate(left, 8)].sum() / max(green.sum(), 1),
                     magenta[dilate(right, 8)].sum() / max(magenta.sum(), 1))
        if (min(recall) > 0.95 and min(precision) > 0.97 and green[core_right].mean() < 0.01
                and magenta[core_left].mean() < 0.01) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(1000)
    assert core_left.sum() > 5000 and core_right.sum() > 5000, "the lungs are too small on screen to judge"
    # Inside each true lung: its segment's colour. Colour anywhere else: only next to that lung.
    assert recall[0] > 0.95, f"left lung: only {recall[0]:.1%} of its pixels are green"
    assert recall[1] > 0.95, f"right lung: only {recall[1]:.1%} of its pixels are magenta"
    assert min(precision) > 0.97, f"segment colour outside the lungs: precision {precision}"
    # The other lung is not painted in this lung's colour: the segments are not swapped.
    assert green[core_right].mean() < 0.01 and magenta[core_left].mean() < 0.01
    assert page.errors == []


def test_rtstruct_contours_follow_the_lung_borders(site, page):
    open_viewer(page, site)
    load_overlay(page, "RTSTRUCT")
    k = lung_slice(site.study)
    study = site.study

    def judged(mask, line, scale):
        """(contour pixels, share on the true border, share of the inside painted, share of the border covered)."""
        band = int(round(scale))  # one voxel either side of the true border
        border = dilate(mask, band) & ~erode(mask, band)
        on_border = line[border].sum() / max(line.sum(), 1)
        inside = line[erode(mask, 2 * band)].mean()
        covered = dilate(line, band)[mask & ~erode(mask, 1)].mean()
        return line.sum(), on_border, inside, covered

    # Contours are drawn asynchronously after the slice change, and a screenshot may catch the wrong
    # slice or the canvas mid-resize (the segmentation panel opening): look again until what is asserted holds.
    deadline = time.monotonic() + 60
    while True:
        left, right, box = screen_masks(page, study, k, (VIEWPORT["height"], VIEWPORT["width"]))
        img = screenshot(page, "ohif-rtstruct-contours")
        green, magenta = colored(img, LUNG_LEFT_COLOR), colored(img, LUNG_RIGHT_COLOR)
        scale = box[3] / study.geometry.shape[1]  # screen pixels per voxel (about 6.6)
        judgements = {name: judged(mask, line, scale) for name, mask, line in (("left", left, green),
                                                                                ("right", right, magenta))}
        if all(n > 4 * scale * 20 and on_border > 0.95 and inside < 0.02 and covered > 0.9
               for n, on_border, inside, covered in judgements.values()) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(1000)
    for name, (n, on_border, inside, covered) in judgements.items():
        assert n > 4 * scale * 20, f"{name} lung: hardly any contour drawn ({n} pixels)"
        assert on_border > 0.95, f"{name} lung: only {on_border:.1%} of the contour lies on the true border"
        # Contours, not a fill: the lung's inside stays as the CT shows it.
        assert inside < 0.02, f"{name} lung: its inside is painted"
        # And the contour goes all the way round: most of the true border has a line next to it.
        assert covered > 0.9, f"{name} lung: only {covered:.1%} of its border has a contour next to it"
    assert page.errors == []


# OHIF's measurements, and whether each lies on an image a viewport shows now.
MEASUREMENTS = """() => {
  const cs = window.cornerstone;
  const shown = cs.getRenderingEngines()[0].getViewports().map(v => v.getCurrentImageId && v.getCurrentImageId())
    .filter(Boolean).map(id => (cs.metaData.get('instance', id) || {}).SOPInstanceUID);
  return window.services.measurementService.getMeasurements().map(m => ({
    name: m.finding && m.finding.text, tool: m.toolName, sop: m.SOPInstanceUID,
    on_screen: shown.includes(m.SOPInstanceUID), shown: m.displayText.primary, stats: Object.values(m.data)[0]}));
}"""


def test_sr_measurements_reach_ohif(site, page):
    """OHIF reads the TID 1500 report and lists both lungs in its measurement panel.

    Each lung's key-slice group (its outline where it is largest, with the area it encloses) is
    merged by tracking UID with its volumetric group: OHIF shows both the volume and the area,
    and, once the report is tracked, lists the outlines as freehand ROIs on the true key slices.
    """
    study = site.study
    template = load_template("ct-anatomy")
    open_viewer(page, site)
    page.get_by_text("SR", exact=True).first.dblclick()
    page.wait_for_function("() => window.services.displaySetService.getActiveDisplaySets()"
                           ".some(d => d.Modality === 'SR' && d.measurements && d.measurements.length)",
                           timeout=90_000)
    parsed = page.evaluate("""() => window.services.displaySetService.getActiveDisplaySets()
        .filter(d => d.Modality === 'SR')
        .flatMap(d => d.measurements.map(m => ({id: m.TrackingIdentifier, labels: m.labels})))""")
    by_id = {m["id"].removeprefix(KEY_SLICE_PREFIX): {x["label"]: x["value"] for x in m["labels"]} for m in parsed}
    assert set(by_id) == set(study.volumes_ml)
    key_slices = {}
    for tracking_id, volume in study.volumes_ml.items():
        mask = study.left if tracking_id == "Lung_L" else study.right
        k = int(mask.sum(axis=(1, 2)).argmax())
        area = ndimage.binary_fill_holes(mask[k]).sum() * study.geometry.spacing[0] * study.geometry.spacing[1]
        key_slices[tracking_id] = (k, area)
        assert by_id[tracking_id]["Volume"] == f"{volume:.2f} ml"
        sr_area = float(by_id[tracking_id]["Area"].split()[0])
        assert sr_area == pytest.approx(area, rel=0.03), f"{tracking_id}: key-slice area {sr_area} mm2, truth {area}"
    screenshot(page, "ohif-sr-outlines")

    # Track the report: OHIF turns its outlines into measurements of its own and lists them.
    page.get_by_role("button", name="Yes").click(timeout=90_000)
    page.locator('[data-cy="trackedMeasurements-btn"]').click()
    panel = page.locator('[data-cy="trackedMeasurements-panel"]')
    names = {tid: template.finding(study.findings[tid]).type.meaning for tid in study.volumes_ml}
    for name in names.values():
        panel.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
    listed, text = stable_listing(page, panel, MEASUREMENTS)
    screenshot(page, "ohif-sr-measurements")
    assert sorted(m["name"] for m in listed) == sorted(names.values())
    restored = 0
    for tracking_id, name in names.items():
        (m,) = [m for m in listed if m["name"] == name]
        k, area = key_slices[tracking_id]
        assert m["tool"] == "PlanarFreehandROI"
        assert m["sop"] == study.slice_uids[k], f"{name}: not on the slice where the lung is largest"
        assert all(line in text for line in m["shown"]), f"{name}: {m['shown']} not in the panel"
        # Until OHIF draws an outline it shows the report's own numbers; drawn, it recomputes them. An
        # outline on the image shown may be drawn by now or not; one on any other image is not.
        assert "unit" not in m["stats"] or m["on_screen"], f"{name}: recomputed, yet not on the image shown"
        if "unit" not in m["stats"]:
            restored += 1
            assert m["shown"][0] == f"{round(float(by_id[tracking_id]['Area'].split()[0]))} mm2"
    assert restored >= 1, "every value in the panel was recomputed by OHIF: none came from the report"
    assert page.errors == []


def test_secondary_capture_cine_plays_its_frames(site, page):
    open_viewer(page, site)
    page.get_by_text(CINE_DESCRIPTION).first.dblclick()
    page.wait_for_function("() => window.cornerstone.getRenderingEngines()[0].getViewports()"
                           f".some(v => v.getImageIds().length === {len(CINE_PALETTE)})", timeout=90_000)
    box = page.locator('[data-cy="viewport-pane"]').first.bounding_box()
    centre = {"x": box["x"] + box["width"] / 2 - 10, "y": box["y"] + box["height"] / 2 - 10, "width": 20,
              "height": 20}

    def shown_frame() -> int | None:
        """Which frame's colour fills the middle of the viewport (None: none of them)."""
        rgb = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=centre))).convert("RGB")).reshape(-1, 3)
        mean = rgb.mean(axis=0)
        distance = np.abs(np.array(CINE_PALETTE) - mean).sum(axis=1)
        return int(distance.argmin()) if distance.min() < 30 else None

    deadline = time.monotonic() + 30
    while shown_frame() != 0 and time.monotonic() < deadline:  # the first frame may still be loading
        page.wait_for_timeout(250)
    assert shown_frame() == 0, "the first frame (red) is not what the viewport shows"
    screenshot(page, "ohif-sc-cine-first-frame")
    page.locator('[data-cy="cine-player-play-pause"]').click()
    seen: list[int | None] = []
    deadline = time.monotonic() + 30
    while len({f for f in seen if f is not None}) < len(CINE_PALETTE) - 2 and time.monotonic() < deadline:
        seen.append(shown_frame())
        page.wait_for_timeout(100)
    # The loop goes through (nearly) all frames, and the samples are the frames shown whole (a
    # capture may catch a repaint now and then).
    assert len({f for f in seen if f is not None}) >= len(CINE_PALETTE) - 2, f"cine showed only {seen}"
    assert seen.count(None) <= max(2, len(seen) // 10), f"samples that matched no frame's colour: {seen}"
    assert page.errors == []


def test_segmentation_mode_saves_a_new_seg_into_the_study(site, annotator_page):
    """A radiologist-made SEG: painted in OHIF's segmentation mode, stored by STOW-RS through the gateway
    with the annotator role (no admin rights needed)."""
    page, study = annotator_page, site.study
    page.goto(f"{site.node.web}/segmentation?StudyInstanceUIDs={study.study_uid}")
    page.get_by_text("CHEST 5mm").first.wait_for(timeout=90_000)
    page.wait_for_function("() => window.cornerstone && window.cornerstone.getRenderingEngines().length > 0"
                           " && window.cornerstone.getRenderingEngines()[0].getViewports().some("
                           "v => v.getImageIds && v.getImageIds().length > 1)", timeout=90_000)
    page.click('[data-cy="addSegmentation"]')
    page.click('[data-cy="Brush-btn"]')
    wait_brush_ready(page)  # the segmentation is made, and the brush active, asynchronously
    box = page.locator('[data-cy="viewport-pane"]').first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 60, y)
    page.mouse.down()
    for i in range(30):
        page.mouse.move(x - 60 + 4 * i, y)
    page.mouse.up()
    page.locator('button[role="combobox"]:has-text("Segmentation 1")').locator(
        "xpath=preceding-sibling::button[1]").click()
    page.get_by_text("Download & Export").hover()
    page.locator('[role="menu"]').nth(1).get_by_text("DICOM SEG").nth(1).click()  # Export, not Download
    page.get_by_placeholder("Report name").fill("Radiologist lungs")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/dicom-web/studies"),
                              timeout=60_000) as stored:
        page.get_by_role("button", name="Save").click()
    assert stored.value.status == 200
    screenshot(page, "ohif-segmentation-saved")
    series = site.node.api("GET", f"/dicom-web/studies/{study.study_uid}/series").json()
    saved = [s for s in series if s.get("0008103E", {}).get("Value") == ["Radiologist lungs"]]
    assert len(saved) == 1 and saved[0]["00080060"]["Value"] == ["SEG"]
    uid = saved[0]["0020000E"]["Value"][0]
    with site.node.orthanc() as orthanc:
        (found,) = orthanc.post("/tools/lookup", content=uid).json()
        (instance,) = orthanc.get(f"/series/{found['ID']}/instances").json()
        ds = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance['ID']}/file").content))
    assert ds.StudyInstanceUID == study.study_uid
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uid
    assert ds.pixel_array.any(), "the saved SEG has no painted voxel"
    assert page.errors == []


PMAP_SAMPLES = """([uid, points]) => {
  const ds = window.services.displaySetService.getDisplaySetByUID(uid);
  const vol = window.cornerstone.cache.getVolume(uid);
  if (!ds || !ds.isLoaded || !vol) return null;
  const ct = ds.getReferenceDisplaySet();
  return {dimensions: Array.from(vol.dimensions), origin: Array.from(vol.origin), spacing: Array.from(vol.spacing),
          direction: Array.from(vol.direction), ct: ct.SeriesInstanceUID,
          values: points.map(([i, j, k]) => vol.voxelManager.getAtIJK(i, j, k))};
}"""


def test_uncertainty_parametric_map_overlays_the_ct(site, page, tmp_path):
    """The node's Parametric Map on the source grid (``parametric_map_grid: source``) opens in OHIF's
    parametric-map viewport over its CT, every value at its place: a known map (it grows along each
    patient axis) is read back from OHIF's volume at random voxels, through OHIF's own geometry.
    (Last in this module: it adds a series to the study the tests above count.)"""
    from node.encoders import EncodeContext, encode_all
    from node.models.handler import ENTROPY, NO_UNITS
    from node.results import QuantityMap
    from node.volume import load_series
    from tests.iod import assert_valid_iod

    study = site.study
    geom = study.geometry
    source = load_series(sorted(study.dicom_dir.iterdir()))
    nz, ny, nx = geom.shape
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    values = (0.05 + 0.5 * k / (nz - 1) + 0.3 * i / (nx - 1) + 0.15 * j / (ny - 1)).astype(np.float32)
    qmap = QuantityMap(source_series_uid=study.series_uid, geometry=geom, values=values,
                       quantity=ENTROPY, unit=NO_UNITS,
                       description="test uncertainty", value_range=(0.0, 1.0))
    ctx = EncodeContext(job_key="web-test-pmap", rule="web-test", handler="web-test", handler_version="1")
    (pm,) = encode_all([qmap], {source.series_uid: source}, ctx)
    path = tmp_path / "PMAP.dcm"
    pm.save_as(path, enforce_file_format=True)
    assert_valid_iod(path)
    r = stow(site.node, [path])
    assert r.status_code == 200, r.text

    open_viewer(page, site)
    page.get_by_text("PMAP", exact=True).first.dblclick()
    uid = page.wait_for_function("() => (window.services.displaySetService.getActiveDisplaySets()"
                                 ".find(d => d.Modality === 'PMAP') || {}).displaySetInstanceUID",
                                 timeout=90_000).json_value()
    rng = np.random.default_rng(0)
    points = [[int(rng.integers(nx)), int(rng.integers(ny)), int(rng.integers(nz))] for _ in range(400)]
    got = wait_for(lambda: page.evaluate(PMAP_SAMPLES, [uid, points]), 90, "the parametric map loaded", interval=1)
    assert got["ct"] == study.series_uid  # laid over the CT it was made from
    # OHIF's volume index -> patient mm (its own origin, spacing, direction) -> the value the node wrote there
    direction = np.asarray(got["direction"]).reshape(3, 3)  # rows: the i, j, k axes
    origin, spacing = np.asarray(got["origin"]), np.asarray(got["spacing"])
    expected = []
    for p in points:
        world = origin + (np.asarray(p) * spacing) @ direction
        kk, jj, ii = (int(round(v)) for v in geom.patient_to_index(world))
        expected.append(float(values[kk, jj, ii]) * 100)  # OHIF shows the values x100
    np.testing.assert_allclose(got["values"], expected, rtol=1e-5, atol=1e-4)
    # and it is drawn: the viewport fuses the CT and the map
    page.wait_for_function("() => window.cornerstone.getRenderingEngines()[0].getViewports()"
                           ".some(v => v.getActors && v.getActors().length === 2)", timeout=60_000)
    screenshot(page, "ohif-uncertainty-pmap")
    assert [e for e in page.errors if "favicon" not in e] == []
