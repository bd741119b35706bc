"""Helpers of the web tests: users, sign-in, STOW-RS, the headless browser, a lung study with results."""
from __future__ import annotations

import io
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from scipy import ndimage

from tests.iod import assert_valid_iod
from tests.nodeproc import REPO, NodeProcess, wait_for

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts" / "web"
PASSWORD = "correct horse battery staple"


def add_user(node: NodeProcess, name: str, role: str, password: str = PASSWORD) -> None:
    out = subprocess.run([sys.executable, "-m", "node.cli", "user", "add", name, "--role", role,
                          "--config", str(node.config_path)], input=password + "\n", capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr


def api_session(node: NodeProcess, name: str, password: str = PASSWORD) -> tuple[httpx.Client, str]:
    """An HTTP client signed in as ``name`` (cookie), and its CSRF token."""
    client = httpx.Client(base_url=node.web, timeout=60)
    r = client.post("/api/session", json={"username": name, "password": password})
    assert r.status_code == 200, r.text
    return client, r.json()["csrf_token"]


def stow(node: NodeProcess, files: list[Path], headers: dict | None = None) -> httpx.Response:
    """STOW-RS the files into the archive through the node's gateway (admin token by default)."""
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes()
                    + b"\r\n" for f in files) + b"--" + boundary.encode() + b"--\r\n"
    h = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
         "Accept": "application/dicom+json"}
    if headers is None:
        h["Authorization"] = f"Bearer {node.token}"
    else:
        h.update(headers)
    return httpx.post(node.web + "/dicom-web/studies", content=body, headers=h, timeout=120)


def launch(playwright):
    """Debian's chromium, headless; never a browser build downloaded by playwright."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)


def sign_in(page, web: str, name: str, password: str = PASSWORD, next_path: str = "/console/") -> None:
    page.goto(f"{web}/login?next={next_path}")
    page.fill("#username", name)
    page.fill("#password", password)
    page.click("#login-button")
    page.wait_for_url(web + next_path)


class BrowserErrors:
    """Uncaught exceptions and console errors of a page (failed requests are console errors too)."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("console", lambda m: self.errors.append(f"console.error: {m.text} @ {m.location.get('url')}")
                if m.type == "error" else None)


def screenshot(page, name: str) -> np.ndarray:
    """Save a screenshot under test-artifacts/web/ and return it as an (h, w, 3) uint8 array."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def stable_listing(page, panel, script: str, timeout: float = 30) -> tuple[list[dict], str]:
    """OHIF's measurements (``script``: a list of dicts with the lines ``shown`` in the panel) and the
    measurement panel's text, read at one moment: the list is the same before and after the text is
    read, and the text has every line it shows. After ``timeout``, the last reading, for the asserts."""
    deadline = time.monotonic() + timeout
    while True:
        before = page.evaluate(script)
        text = panel.inner_text()
        after = page.evaluate(script)
        if before == after and all(line in text for m in after for line in m["shown"]) \
                or time.monotonic() > deadline:
            return after, text
        page.wait_for_timeout(500)


# -- a CT phantom with lung results, as a handler would have made them ------------------------------

LUNG_LEFT_COLOR = (0, 255, 0)
LUNG_RIGHT_COLOR = (255, 0, 255)
# One flat colour per frame of the cine Secondary Capture, so a screenshot tells which frame shows.
CINE_PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
                (255, 255, 255), (255, 128, 0))
CINE_DESCRIPTION = "Volume rendering cine"


@dataclass
class LungStudy:
    study_uid: str
    series_uid: str
    patient_id: str
    dicom_dir: Path
    geometry: object  # node.volume.Geometry of the CT
    left: np.ndarray  # (slices, rows, cols) bool, patient left lung
    right: np.ndarray
    volumes_ml: dict[str, float]  # tracking id -> volume
    findings: dict[str, str]  # tracking id -> finding key of the SR template ("ct-anatomy")
    slice_uids: list[str]  # SOP Instance UIDs of the CT slices, in the order of ``geometry``
    results: list[Path]  # SEG, RTSTRUCT, SR, multi-frame SC (dciodvfy-valid)


def lung_study(out: Path) -> LungStudy:
    """A small chest CT phantom; SEG (a Label Map SEG, JPEG-LS) + RTSTRUCT + SR of its true lungs and a
    cine Secondary Capture, made by the node's encoders as a handler's results would be."""
    from node.encoders import EncodeContext, encode_all
    from node.phantom import generate_ct
    from node.results import Code, ImageSeries, LabelMap, Measurement, MeasurementGroup, MeasurementReport, Segment
    from node.volume import load_series

    ph = generate_ct(out / "phantom", seed=1, rows=128, cols=128, slices=48, slice_thickness=5.0, fov_mm=400,
                     nodules=0, noise_hu=5)
    source = load_series(ph.series_files())
    truth, _ = ph.label_volume()
    left, right = truth == ph.label("lung_left"), truth == ph.label("lung_right")
    labels = (left * 1 + right * 2).astype(np.uint8)
    anatomy = Code("91723000", "SCT", "Anatomical Structure")
    label_map = LabelMap(source.series_uid, source.volume.geometry, labels, (
        Segment(1, "Left lung", anatomy, Code("44029006", "SCT", "Left lung"), tg263="Lung_L", color=LUNG_LEFT_COLOR),
        Segment(2, "Right lung", anatomy, Code("3341006", "SCT", "Right lung"), tg263="Lung_R",
                color=LUNG_RIGHT_COLOR)), seg_format="labelmap")  # as ct-anatomy delivers the organs
    voxel_ml = float(np.prod(source.volume.geometry.spacing)) / 1000
    volumes = {"Lung_L": round(float(left.sum()) * voxel_ml, 2), "Lung_R": round(float(right.sum()) * voxel_ml, 2)}
    findings = {"Lung_L": "lung_left", "Lung_R": "lung_right"}
    report = MeasurementReport(source.series_uid, "ct-anatomy", tuple(
        MeasurementGroup(tracking_id, findings[tracking_id], (Measurement("volume", volumes[tracking_id], "ml"),),
                         segment_label=label) for label, tracking_id in ((1, "Lung_L"), (2, "Lung_R"))))
    frames = np.zeros((len(CINE_PALETTE), 96, 96, 3), np.uint8)
    frames[:] = np.array(CINE_PALETTE, np.uint8)[:, None, None, :]
    cine = ImageSeries(source.series_uid, CINE_DESCRIPTION, frames, burned_in_annotation=False, multiframe=True)
    ctx = EncodeContext(job_key="web-test-lungs", rule="web-test", handler="web-test", handler_version="1")
    results = []
    for ds in encode_all([label_map, report, cine], {source.series_uid: source}, ctx):
        path = out / f"{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert_valid_iod(path)
        results.append(path)
    return LungStudy(ph.study_uid, ph.series_uid, ph.patient_id, ph.dicom_dir, source.volume.geometry, left, right,
                     volumes, findings, [str(ds.SOPInstanceUID) for ds in source.datasets], results)


# -- where a label mask lands on the screen ---------------------------------------------------------

GO_TO_SLICE = """async ([z, corners]) => {
  // Show the CT slice at patient z and say where three voxel centres of that slice are on the page.
  // null: no such viewport yet, or OHIF replaced or moved it meanwhile (hydrating an overlay re-enables
  // the viewport and restores the slice it stored): the caller asks again.
  const cs = window.cornerstone;
  const engine = cs && cs.getRenderingEngines()[0];
  const vp = engine && engine.getViewports().find(v => v.getImageIds && v.getImageIds().length > 1);
  if (!vp) return null;
  const ids = vp.getImageIds();
  let best = -1, distance = Infinity;
  ids.forEach((id, i) => {
    const d = Math.abs(cs.metaData.get('imagePlaneModule', id).imagePositionPatient[2] - z);
    if (d < distance) { distance = d; best = i; }
  });
  try {
    await vp.setImageIdIndex(best);
    vp.render();
  } catch (e) {
    if (engine.getViewport(vp.id) !== vp) return null;  // our reference went stale mid-way
    throw e;
  }
  await new Promise(r => setTimeout(r, 1000));
  if (engine.getViewport(vp.id) !== vp || vp.getCurrentImageIdIndex() !== best) return null;
  const rect = vp.canvas.getBoundingClientRect();
  const onPage = (w) => { const c = vp.worldToCanvas(w); return [rect.left + c[0], rect.top + c[1]]; };
  return {distance, corners: corners.map(onPage), rect: [rect.left, rect.top, rect.width, rect.height]};
}"""


def slice_on_screen(page, geometry, k: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Go to slice ``k`` of the CT; return the affine (3x2) from (col, row, 1) to page pixels, and the canvas box."""
    rows, cols = geometry.shape[1:]
    corners = [geometry.index_to_patient((k, 0, 0)).tolist(), geometry.index_to_patient((k, 0, cols - 1)).tolist(),
               geometry.index_to_patient((k, rows - 1, 0)).tolist()]
    r = wait_for(lambda: page.evaluate(GO_TO_SLICE, [corners[0][2], corners]), 60,
                 f"a CT viewport that stays on slice {k}", interval=0.5)
    assert r["distance"] < 0.01, f"no CT image at z={corners[0][2]} in the viewport"
    src = np.array([[0, 0, 1], [cols - 1, 0, 1], [0, rows - 1, 1]], float)
    affine = np.linalg.solve(src, np.array(r["corners"], float))
    x, y, w, h = (int(round(v)) for v in r["rect"])
    return affine, (x, y, w, h)


# After "Yes" to OHIF's offer to load a SEG/RTSTRUCT, OHIF puts the CT alone back into the viewport
# (a new cornerstone viewport, at the slice it stored), then adds the segmentation to it. Measuring
# before that ends measures a viewport about to go away.
HYDRATED = """() => {
  const s = window.services, cs = window.cornerstone;
  if (!s || !cs || !cs.getRenderingEngines().length) return false;
  const id = s.viewportGridService.getActiveViewportId();
  const sets = s.cornerstoneViewportService.getViewportDisplaySets(id);
  const vp = cs.getRenderingEngines()[0].getViewport(id);
  return sets.length > 0 && sets.every(d => d.Modality !== 'SEG' && d.Modality !== 'RTSTRUCT')
    && !!vp && !!vp.getImageIds && vp.getImageIds().length > 1
    && s.segmentationService.getSegmentationRepresentations(id).length > 0;
}"""


def wait_hydrated(page, timeout_ms: int = 90_000) -> None:
    page.wait_for_function(HYDRATED, timeout=timeout_ms)


# A stroke only paints once there is a segmentation on the viewport and the brush is its tool group's
# active left-button tool; a stroke made earlier is lost (or pans the image).
BRUSH_READY = """() => {
  const s = window.services, tools = window.cornerstoneTools;
  if (!s || !tools || !s.segmentationService.getSegmentations().length) return false;
  const id = s.viewportGridService.getActiveViewportId();
  if (!s.segmentationService.getActiveSegmentation(id)
      || !s.segmentationService.getSegmentationRepresentations(id).length) return false;
  const group = tools.ToolGroupManager.getToolGroupForViewport(id);
  const tool = group && group.getActivePrimaryMouseButtonTool();
  return !!tool && tool.includes('Brush');
}"""


def wait_brush_ready(page, timeout_ms: int = 30_000) -> None:
    page.wait_for_function(BRUSH_READY, timeout=timeout_ms)


def mask_on_screen(mask2d: np.ndarray, affine: np.ndarray, box: tuple[int, int, int, int],
                   shape: tuple[int, int]) -> np.ndarray:
    """The (rows, cols) mask drawn on a page-sized boolean image (nearest voxel), inside the canvas box."""
    out = np.zeros(shape, bool)
    x0, y0, w, h = box
    ys, xs = np.mgrid[y0:min(y0 + h, shape[0]), x0:min(x0 + w, shape[1])]
    inverse = np.linalg.inv(np.vstack([affine.T, [0, 0, 1]]))  # page (x, y, 1) -> (col, row, 1)
    col = inverse[0, 0] * (xs + 0.5) + inverse[0, 1] * (ys + 0.5) + inverse[0, 2]
    row = inverse[1, 0] * (xs + 0.5) + inverse[1, 1] * (ys + 0.5) + inverse[1, 2]
    ci, ri = np.rint(col).astype(int), np.rint(row).astype(int)
    inside = (ci >= 0) & (ci < mask2d.shape[1]) & (ri >= 0) & (ri < mask2d.shape[0])
    hit = np.zeros(ci.shape, bool)
    hit[inside] = mask2d[ri[inside], ci[inside]]
    out[ys, xs] = hit
    return out


def colored(img: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Pixels whose hue is that of ``color`` (pure green or magenta here), whatever the blending."""
    r, g, b = (img[..., i].astype(int) for i in range(3))
    if color == LUNG_LEFT_COLOR:
        return (g > 60) & (g > r + 40) & (g > b + 40)
    if color == LUNG_RIGHT_COLOR:
        return (r > 60) & (b > 60) & (np.minimum(r, b) > g + 40)
    raise ValueError(f"no classifier for colour {color}")


def erode(mask: np.ndarray, n: int) -> np.ndarray:
    return ndimage.binary_erosion(mask, iterations=n) if n else mask


def dilate(mask: np.ndarray, n: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=n) if n else mask
