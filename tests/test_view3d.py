"""The interactive 3D view through a real node (`hilum up`) in headless Chromium.

A small chest CT phantom goes in by C-STORE; a viewer signs in and opens
/view3d/{study}/{series}. Frames come from the node over the WebSocket; the tests drag, pinch,
click presets and MPR panes and compare what the canvases show, open two sessions at once and
check that closing them frees the series, and that nobody gets in without signing in.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.nodeproc import NodeProcess, running_node, storescu, wait_for
from tests.web_support import BROWSER_ARGS, CHROMIUM, BrowserErrors, add_user, api_session, launch, screenshot, sign_in

playwright_api = pytest.importorskip("playwright.sync_api")
websockets_sync = pytest.importorskip("websockets.sync.client")
pytestmark = pytest.mark.slow


@dataclass
class Site:
    node: NodeProcess
    study_uid: str
    series_uid: str
    browser: object

    @property
    def path(self) -> str:
        return f"/view3d/{self.study_uid}/{self.series_uid}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from node.phantom import generate_ct

    tmp = tmp_path_factory.mktemp("view3d")
    rules = tmp / "rules"
    rules.mkdir()
    ct = generate_ct(tmp / "ct", seed=3, rows=96, cols=96, slices=40, pixel_spacing=4.0, slice_thickness=7.5,
                     nodules=2, noise_hu=5)
    with running_node(tmp / "node", rules) as node:
        add_user(node, "vic", "viewer")
        assert storescu(node.dicom_port, ct.series_files()).returncode == 0
        wait_for(lambda: any(s["series_uid"] == ct.series_uid and s["instances"] == 40
                             for s in node.study(ct.study_uid).get("series", [])), 60, "the CT in the index")
        with playwright_api.sync_playwright() as pw:
            browser = launch(pw)
            yield Site(node, ct.study_uid, ct.series_uid, browser)
            browser.close()


@pytest.fixture
def open_view(site):
    contexts = []

    def make(user: str = "vic", **context_options):
        ctx = site.browser.new_context(viewport={"width": 1000, "height": 700}, **context_options)
        contexts.append(ctx)
        page = ctx.new_page()
        errors = BrowserErrors(page)
        sign_in(page, site.node.web, user, next_path=site.path)
        wait_for_frames(page, {"3d": 1, "axial": 1, "coronal": 1, "sagittal": 1})
        return page, errors

    yield make
    for ctx in contexts:
        ctx.close()


def stats(page) -> dict:
    return page.evaluate("() => JSON.parse(JSON.stringify(window.view3dStats))")


def wait_for_frames(page, at_least: dict, full_3d: int | None = None, timeout: float = 60) -> dict:
    def done():
        s = stats(page)
        ok = all(s["frames"].get(p, 0) >= n for p, n in at_least.items())
        return s if ok and (full_3d is None or s["full"] >= full_3d) else None

    return wait_for(done, timeout, f"frames {at_least}" + (f", {full_3d} full" if full_3d else ""), interval=0.1)


def settle(page, since: int | None = None, timeout: float = 60) -> dict:
    """Wait until every pane shows the latest request (the server says "idle"), in full quality.

    `since`: the request number before an action that changes the 3D pane. The page sends the
    request on its next animation frame, which a busy machine can delay past any fixed pause;
    until then the page is idle on the previous view, and a frame can still be decoding when the
    server's "idle" arrives. So the 3D pane's frame must answer a request newer than `since`."""
    page.wait_for_timeout(100)  # requests go out on the next animation frame

    def done():
        s = stats(page)
        last = s["last"].get("3d", {})
        if since is not None and not (s["seq"] > since and last.get("seq", -1) > since):
            return None
        return s if s["idle"] == s["seq"] and last.get("quality") == "full" else None

    return wait_for(done, timeout, "the full-quality 3D frame of the latest request", interval=0.1)


def canvas(page, pane: str, name: str) -> np.ndarray:
    png = page.locator(f"#pane-{pane}").screenshot()
    screenshot(page, name)  # the whole page, for a person to look at
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def differs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def view3d_status(site: Site) -> dict:
    r = site.node.api("GET", "/api/view3d")
    assert r.status_code == 200, r.text
    return r.json()


# -- access -----------------------------------------------------------------------------------------

def test_unauthenticated_requests_are_refused(site):
    url = site.node.web + site.path
    assert httpx.get(url, timeout=30).status_code == 401
    r = httpx.get(url, headers={"Accept": "text/html"}, timeout=30)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=%2Fview3d%2F")
    assert httpx.get(url, headers={"Authorization": "Bearer hlm_wrong"}, timeout=30).status_code == 401
    assert site.node.api("GET", site.path).status_code == 200  # a token works like a session
    assert site.node.api("GET", f"/view3d/{site.study_uid}/1.2.3.4").status_code == 404
    ws_url = url.replace("http", "ws", 1) + "/ws"
    with pytest.raises(Exception, match="403"):
        websockets_sync.connect(ws_url, open_timeout=30)
    with pytest.raises(Exception, match="403"):
        websockets_sync.connect(ws_url, additional_headers={"Authorization": "Bearer hlm_wrong"}, open_timeout=30)
    # A signed-in cookie from another site's page (foreign Origin) is refused too.
    client, _ = api_session(site.node, "vic")
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    with pytest.raises(Exception, match="403"):
        websockets_sync.connect(ws_url, additional_headers={"Cookie": cookie, "Origin": "http://evil.example"},
                                open_timeout=30)
    with websockets_sync.connect(ws_url, additional_headers={"Cookie": cookie, "Origin": site.node.web},
                                 open_timeout=30) as ws:
        assert json.loads(ws.recv(30))["type"] == "loading"
        ready = json.loads(ws.recv(60))
        assert ready["type"] == "ready" and ready["modality"] == "CT" and ready["shape"] == [40, 96, 96]
        ws.send(b"\x00\x01")
        assert json.loads(ws.recv(30)) == {"type": "error", "message": "message: send JSON text, not binary"}
        ws.send("{not json")
        assert json.loads(ws.recv(30))["message"].startswith("message: not JSON")
        ws.send(json.dumps({"type": "view", "seq": 1, "zoom": -1}))
        assert json.loads(ws.recv(30)) == {"type": "error", "message": "zoom: Input should be greater than or "
                                                                       "equal to 0.1"}


def test_browser_without_session_lands_on_sign_in(site):
    ctx = site.browser.new_context()
    try:
        page = ctx.new_page()
        page.goto(site.node.web + site.path)
        page.wait_for_url(f"{site.node.web}/login?next=**")
        assert page.locator("#login-button").is_visible()
    finally:
        ctx.close()


# -- interaction ------------------------------------------------------------------------------------

def test_page_loads_and_a_drag_rotates_the_view(site, open_view):
    page, errors = open_view()
    first_stats = settle(page)
    first = canvas(page, "3d", "view3d-first")
    assert first.max() > 100, "the first 3D frame is black"
    assert first_stats["last"]["3d"]["labels"] == {"left": "R", "right": "L", "top": "H", "bottom": "F"}

    box = page.locator("#pane-3d").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 16):
        page.mouse.move(x + 12 * i, y, steps=1)  # 180 px: 90 degrees of azimuth
        page.wait_for_timeout(40)
    page.mouse.up()
    after = settle(page, since=first_stats["seq"])
    assert after["interactive"] >= 1, "no reduced-quality frame while dragging"
    assert after["full"] > first_stats["full"], "no full-quality frame on release"
    rotated = canvas(page, "3d", "view3d-rotated")
    assert differs(first, rotated) > 3
    # Seen from the patient's right now (azimuth -90): posterior on the left, anterior on the right.
    assert after["last"]["3d"]["labels"] == {"left": "P", "right": "A", "top": "H", "bottom": "F"}
    assert errors.errors == []


def test_preset_and_mode_change_the_image(site, open_view):
    page, errors = open_view()
    settle(page)
    bone = canvas(page, "3d", "view3d-bone")
    before = stats(page)["seq"]
    page.click("button[data-preset=soft_tissue]")
    s = settle(page, since=before)
    soft = canvas(page, "3d", "view3d-soft-tissue")
    assert differs(bone, soft) > 3
    page.click("button[data-mode=minip]")
    s = settle(page, since=s["seq"])
    assert s["last"]["3d"]["mode"] == "minip"
    assert s["ready"]["windows"]["lung"] == [-600, 1500]
    minip = canvas(page, "3d", "view3d-minip")
    assert differs(soft, minip) > 3
    # A 20 mm coronal slab MinIP in the lung window: grey (R = G = B away from the overlay text),
    # lungs (-850 HU: about 85 of 255) inside soft tissue (40 HU: about 236).
    h, w = minip.shape[:2]
    centre = minip[h // 5:4 * h // 5, w // 5:4 * w // 5]
    assert np.abs(centre[..., 0] - centre[..., 1]).max() <= 12
    grey = centre[..., 0]
    assert (grey > 200).mean() > 0.05 and ((grey > 40) & (grey < 120)).mean() > 0.2
    assert errors.errors == []


def test_clicking_an_mpr_pane_moves_the_crosshair_in_the_others(site, open_view):
    page, errors = open_view()
    settle(page)
    before = stats(page)["last"]
    box = page.locator("#pane-axial").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6)
    wait_for(lambda: stats(page)["last"]["sagittal"]["slice"] != before["sagittal"]["slice"]
             and stats(page)["last"]["coronal"]["slice"] != before["coronal"]["slice"], 30, "MPR panes to follow")
    after = stats(page)["last"]
    assert after["axial"]["slice"] == before["axial"]["slice"]  # the clicked plane keeps its depth
    # Clicked left of and below the centre: towards the patient's right and posterior.
    assert after["sagittal"]["slice"] < before["sagittal"]["slice"]
    assert after["coronal"]["slice"] > before["coronal"]["slice"]
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 100)
    wait_for(lambda: stats(page)["last"]["axial"]["slice"] != before["axial"]["slice"], 30, "the wheel to page")
    assert errors.errors == []


def test_pinch_zooms_on_a_touch_screen(site, open_view):
    page, errors = open_view(has_touch=True)
    started = settle(page)
    start = started["last"]["3d"]["mm_per_px"]
    box = page.locator("#pane-3d").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    cdp = page.context.new_cdp_session(page)

    def touch(kind: str, spread: float):
        points = [] if kind == "touchEnd" else [{"x": cx - spread, "y": cy, "id": 0}, {"x": cx + spread, "y": cy, "id": 1}]
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

    touch("touchStart", 40)
    for spread in range(50, 130, 10):
        touch("touchMove", spread)
        page.wait_for_timeout(30)
    touch("touchEnd", 0)
    end = settle(page, since=started["seq"])["last"]["3d"]["mm_per_px"]
    assert end < start / 2, f"pinching apart 80 -> 240 px should zoom in about 3x: {start} -> {end} mm/px"
    assert errors.errors == []


def test_two_sessions_share_the_series_and_closing_frees_it(site, open_view):
    a, errors_a = open_view()
    b, errors_b = open_view()
    status = view3d_status(site)
    assert status["sessions"] >= 2
    [entry] = [s for s in status["cache"]["series"] if s["series_uid"] == site.series_uid]
    assert entry["state"] == "ready" and entry["in_use"] >= 2  # loaded once, shared
    settle(a)
    settle(b)
    b_before = canvas(b, "3d", "view3d-session-b")
    a_before = canvas(a, "3d", "view3d-session-a")
    b_frames = stats(b)["frames"]["3d"]
    a_seq = stats(a)["seq"]
    a.click("button[data-mode=mip]")  # one user's change is theirs alone
    settle(a, since=a_seq)
    assert differs(a_before, canvas(a, "3d", "view3d-session-a-mip")) > 3
    assert stats(b)["frames"]["3d"] == b_frames
    assert differs(b_before, canvas(b, "3d", "view3d-session-b-after")) < 1
    in_use = entry["in_use"]
    a.close()
    wait_for(lambda: view3d_status(site)["cache"]["series"][0]["in_use"] == in_use - 1, 30, "a's reference back")
    b.close()
    wait_for(lambda: view3d_status(site)["cache"]["series"][0]["in_use"] == in_use - 2, 30, "b's reference back")
    assert errors_a.errors == [] and errors_b.errors == []


def test_page_works_under_the_strict_content_security_policy(site):
    """No inline script or style, no eval, frames over the node's own origin: the console's
    strict policy (script-src 'self', connect-src 'self', no blob: images) is enough. The page's
    policy header is swapped in flight; Chromium counts such a rewritten response as from outside
    the machine, so this browser is told not to apply its local-network checks."""
    from node.web.security import STRICT_CSP

    browser = site.browser.browser_type.launch(
        executable_path=CHROMIUM, args=BROWSER_ARGS + ["--disable-features=LocalNetworkAccessChecks"])
    try:
        page = browser.new_page(viewport={"width": 900, "height": 600})
        errors = BrowserErrors(page)
        sign_in(page, site.node.web, "vic", next_path="/console/")

        def strict(route):
            response = route.fetch()
            route.fulfill(response=response, headers={**response.headers, "content-security-policy": STRICT_CSP})

        page.route(f"**{site.path}", strict)
        page.goto(site.node.web + site.path)
        wait_for_frames(page, {"3d": 1, "axial": 1, "coronal": 1, "sagittal": 1})
        assert errors.errors == []
        # The policy is in force: an inline script is refused.
        with pytest.raises(playwright_api.Error):
            page.add_script_tag(content="window.inlineRan = true")
        assert page.evaluate("() => window.inlineRan") is None
    finally:
        browser.close()
