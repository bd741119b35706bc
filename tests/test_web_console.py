"""The admin console in a real browser: sign-in, dashboard, retry, rules editor, destinations, XSS.

A real node runs the `overview` handler on a small CT whose PatientName is an XSS probe; its
results go to the archive and to a `tps` destination that is down, so a delivery fails. The
browser is Debian's chromium driven by playwright; screenshots stay under test-artifacts/web/.
"""
from __future__ import annotations

import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.encoder_sources import write_ct_series
from tests.nodeproc import DCMTK_ENV, NodeProcess, free_port, running_node, storescu, wait_for
from tests.web_support import BrowserErrors, add_user, launch, screenshot, sign_in

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
pytestmark = pytest.mark.slow

# PN cannot hold "=" (it separates component groups), so the attribute-based probe is the patient ID.
XSS_NAME = "<script>alert('name')</script>"
XSS_ID = "<img src=x onerror=alert('id')>"
RULE = """name: ct-overview
description: Overview of CT series
match:
  Modality: CT
handler: overview
destinations: [orthanc, tps]
"""


@dataclass
class Site:
    node: NodeProcess
    study_uid: str
    series_uid: str
    tps_port: int
    tps_dir: Path
    browser: object


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "ct.yaml").write_text(RULE)
    tps_port = free_port()  # nothing listens here yet: the TPS is down
    dests = {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}}
    with running_node(tmp / "node", rules, destinations=dests, delivery_max_attempts=1) as node:
        add_user(node, "ada", "admin")
        add_user(node, "vic", "viewer")
        ct = write_ct_series(tmp / "ct", rows=64, cols=64, slices=8, patient_name=XSS_NAME, seed="console")
        for path in ct:
            ds = pydicom.dcmread(path)
            ds.PatientID = XSS_ID
            ds.save_as(path, enforce_file_format=True)
        assert storescu(node.dicom_port, ct).returncode == 0
        first = pydicom.dcmread(ct[0])
        study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)

        def failed_tps():
            jobs = node.study(study_uid).get("jobs", [])
            return jobs and jobs[0]["status"] == "done" and any(
                r["deliveries"].get("tps") == "failed" for r in jobs[0]["results"])

        wait_for(failed_tps, 180, "the overview job to finish and its TPS delivery to fail")
        with playwright_api.sync_playwright() as pw:
            browser = launch(pw)
            yield Site(node, study_uid, series_uid, tps_port, tmp / "tps", browser)
            browser.close()


@pytest.fixture
def new_page(site):
    contexts = []

    def make(user: str, next_path: str = "/console/"):
        ctx = site.browser.new_context(viewport={"width": 1400, "height": 900})
        contexts.append(ctx)
        page = ctx.new_page()
        page.errors = BrowserErrors(page).errors
        page.dialogs = []
        page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
        sign_in(page, site.node.web, user, next_path=next_path)
        return page

    yield make
    for ctx in contexts:
        ctx.close()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def study_row(page, study_uid: str):
    return page.locator(f'tr.study[data-study="{study_uid}"]')


def test_dashboard_shows_the_study_its_job_and_the_failed_delivery(site, new_page):
    page = new_page("ada")
    row = study_row(page, site.study_uid)
    expect(row).to_be_visible(timeout=30_000)
    # The hostile PatientName and PatientID are shown as text: nothing ran, no element was made.
    expect(row.locator(".patient-name")).to_have_text(XSS_NAME)
    expect(row.locator(".uid").first).to_have_text(XSS_ID)
    page.wait_for_timeout(500)  # an injected image would have failed to load and fired by now
    assert page.dialogs == []
    assert page.locator("#studies script, #studies img").count() == 0
    expect(row.locator(".instances")).to_have_text("8")
    expect(row.locator("a.ohif")).to_have_attribute("href", f"/viewer?StudyInstanceUIDs={site.study_uid}")
    expect(row.locator("a.view3d")).to_have_attribute("href", f"/view3d/{site.study_uid}/{site.series_uid}")
    expect(row).to_contain_text("stable")
    job = page.locator("tr.job").first
    expect(job).to_contain_text("ct-overview → overview")
    expect(job.locator(".job-status")).to_have_text("done")
    expect(job).to_contain_text("100 %")
    expect(job.locator(".deliveries")).to_contain_text("tps failed")
    expect(job.locator(".deliveries")).to_contain_text("orthanc delivered")
    failed = page.locator("#failed-deliveries tbody tr").first
    expect(failed).to_contain_text("tps")
    expect(failed.locator(".error")).not_to_be_empty()
    expect(page.locator("#q-deliveries-failed b")).not_to_have_text("0")
    screenshot(page, "console-dashboard")
    assert page.errors == []


def test_a_click_survives_the_dashboard_poll(site, new_page):
    """The dashboard polls every 2 s; an unchanged answer leaves the rows alone, so a button pressed
    before a poll and released after it is still clicked (a rebuilt row would lose the click)."""
    page = new_page("ada")
    button = page.locator("#failed-deliveries button.retry-delivery").first
    expect(button).to_be_visible(timeout=30_000)
    page.evaluate("""() => document.addEventListener('click', (e) => {
        if (e.target.matches('button.retry-delivery')) { window.retryClicked = true; e.stopPropagation(); }
      }, true)""")  # noted, and kept from the button: the delivery stays failed for the tests below
    page.evaluate("""() => { window.polls = 0;
        new MutationObserver(() => window.polls++).observe(document.getElementById('updated'), {childList: true}); }""")
    button.hover()
    page.mouse.down()
    page.wait_for_function("() => window.polls >= 1", timeout=10_000)  # a poll was answered meanwhile
    page.mouse.up()
    assert page.evaluate("window.retryClicked === true")
    assert page.errors == []


def test_an_older_answer_is_not_drawn_over_a_newer_one(site, new_page):
    """A poll and the refresh after a click overlap; the older answer may arrive last and is dropped."""
    page = new_page("vic")
    expect(study_row(page, site.study_uid)).to_be_visible(timeout=30_000)
    drawn = page.evaluate("""async () => {
        const answers = [], drawn = [];
        const view = Hilum.polled(() => new Promise((resolve) => answers.push(resolve)),
                                  (answer, changed) => drawn.push([answer, changed]));
        const older = view(), newer = view();
        answers[1]('new');
        await newer;
        answers[0]('old');
        await older;
        const again = view();
        answers[2]('new');
        await again;
        return drawn;
    }""")
    assert drawn == [["new", True], ["new", False]]


def test_hostile_patient_name_is_text_in_ohif_too(site, new_page):
    page = new_page("vic", next_path="/")
    page.get_by_text(XSS_NAME).first.wait_for(timeout=90_000)
    page.get_by_text(XSS_ID).first.wait_for(timeout=10_000)
    page.wait_for_timeout(500)
    assert page.dialogs == []
    screenshot(page, "ohif-xss-probe")


def test_viewer_sees_but_cannot_change(site, new_page):
    page = new_page("vic")
    expect(study_row(page, site.study_uid)).to_be_visible(timeout=30_000)
    expect(page.locator("button.retry-delivery").first).to_be_hidden()
    # Hidden buttons are a courtesy; the server refuses a viewer's change whatever the page does.
    refused = page.evaluate("""async () => {
        try { await Hilum.api('POST', '/api/deliveries/1/retry'); return 'accepted'; }
        catch (e) { return `${e.status} ${e.message}`; } }""")
    assert refused == "403 admin role required"
    page.goto(site.node.web + "/console/rules")
    expect(page.locator("#rule-text")).to_have_value(RULE, timeout=30_000)
    expect(page.locator("#save-button")).to_be_hidden()
    refused = page.evaluate("""async (text) => {
        try { await Hilum.api('PUT', '/api/rules/files/ct.yaml', {text}); return 'accepted'; }
        catch (e) { return `${e.status} ${e.message}`; } }""", RULE.replace("Overview", "Hijacked"))
    assert refused == "403 admin role required"
    assert (Path(site.node.config["rules_dir"]) / "ct.yaml").read_text() == RULE
    # The browser logs the two refused requests; nothing else went wrong.
    assert len(page.errors) == 2 and all("status of 403" in e for e in page.errors), page.errors


def test_admin_edits_a_rule_with_inline_validation(site, new_page):
    page = new_page("ada", next_path="/console/rules")
    text = page.locator("#rule-text")
    expect(text).to_have_value(RULE, timeout=30_000)
    text.fill(RULE.replace("handler: overview", "handler: no-such-handler"))
    page.click("#save-button")
    error = page.locator("#rule-errors li").first
    expect(error).to_contain_text("ct.yaml:5")
    expect(error).to_contain_text("no-such-handler")
    expect(page.locator("#save-result")).to_contain_text("not saved")
    assert (Path(site.node.config["rules_dir"]) / "ct.yaml").read_text() == RULE
    screenshot(page, "console-rule-refused")

    edited = RULE.replace("Overview of CT series", "Overview of every CT series")
    text.fill(edited)
    page.fill("#change-message", "clearer description")
    page.click("#save-button")
    expect(page.locator("#save-result")).to_contain_text("saved: version", timeout=30_000)  # validate, PUT, reload
    expect(page.locator("#rule-errors li")).to_have_count(0)
    assert (Path(site.node.config["rules_dir"]) / "ct.yaml").read_text() == edited
    latest = page.locator("#history tbody tr").first
    expect(latest).to_contain_text("admin ada")
    expect(latest).to_contain_text("clearer description")
    latest.locator("button.show-diff").click()
    expect(page.locator("#diff")).to_contain_text("+description: Overview of every CT series")
    page.select_option("#explain-study", site.study_uid)
    page.click("#explain-button")
    expect(page.locator("#explain-result")).to_contain_text("matched", timeout=30_000)
    expect(page.locator("#explain-result")).to_contain_text("ct-overview")
    screenshot(page, "console-rules")
    assert page.errors == []


def test_admin_retries_the_failed_delivery_once_the_tps_is_up(site, new_page):
    page = new_page("ada")
    failed = page.locator("#failed-deliveries tbody tr", has_text="tps").first
    expect(failed).to_be_visible(timeout=30_000)
    site.tps_dir.mkdir(exist_ok=True)
    tps = subprocess.Popen(["storescp", "-aet", "TPS", "-od", str(site.tps_dir), "+B", str(site.tps_port)],
                           env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: listening(site.tps_port), 30, "the TPS (storescp) to listen")
        page.goto(site.node.web + "/console/destinations")
        tps_row = page.locator('tr[data-destination="tps"]')
        tps_row.locator("button.echo").click()
        expect(tps_row.locator(".echo-result")).to_contain_text("C-ECHO success", timeout=30_000)
        archive = page.locator('tr[data-destination="orthanc"]')
        archive.locator("button.echo").click()
        expect(archive.locator(".echo-result")).to_contain_text("archive answers", timeout=30_000)
        page.goto(site.node.web + "/console/")
        page.locator("#failed-deliveries tbody tr", has_text="tps").first.locator("button.retry-delivery").click()
        # Live update, no reload: the failed list empties and the job shows the delivery done.
        expect(page.locator("#failed-deliveries tbody")).to_contain_text("none", timeout=30_000)
        expect(page.locator("tr.job .deliveries").first).to_contain_text("tps delivered", timeout=30_000)
        wait_for(lambda: any(site.tps_dir.iterdir()), 10, "the TPS to have the result")
        received = [pydicom.dcmread(p) for p in site.tps_dir.iterdir()]
        assert all(ds.StudyInstanceUID == site.study_uid for ds in received)
        screenshot(page, "console-after-retry")
    finally:
        tps.terminate()
        tps.wait(10)
    assert page.errors == []


def login_page(url: str) -> bool:
    return url.endswith("/login")


def held_login(route) -> None:
    time.sleep(2.5)  # longer than a dashboard poll: one is answered 401 while the page leaves
    route.continue_()


def test_sign_out(site, new_page):
    page = new_page("vic")
    expect(study_row(page, site.study_uid)).to_be_visible(timeout=30_000)  # the dashboard polls
    page.route(login_page, held_login)
    page.click("#logout")
    page.wait_for_url(re.compile(r"/login(\?|$)"), timeout=30_000)
    # The poll's 401 did not turn the sign-out's /login into /login?next=/console/.
    assert page.url == site.node.web + "/login"
    page.unroute(login_page)
    page.goto(site.node.web + "/console/")
    page.wait_for_url("**/login?next=%2Fconsole%2F")
