"""The projects page against answers that come late, twice or not at all: requests are held or failed
in the browser (playwright routes), so each race happens every time, not when the machine is slow."""
from __future__ import annotations

import pytest

from node.projects.store import ProjectStore
from tests.nodeproc import running_node
from tests.test_projects import _model_and_config
from tests.web_support import add_user, launch, sign_in

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("races")
    (tmp / "rules").mkdir()
    with running_node(tmp / "node", tmp / "rules") as node:
        add_user(node, "ada", "admin")
        store = ProjectStore.for_data_dir(node.data_dir)
        for name in ("alpha", "beta"):
            card, train = _model_and_config(tmp / name)
            store.create(name, model_card=card, train_config=train, study_uids=["1.2.3"], annotators=[], by="t")
        with playwright_api.sync_playwright() as pw:
            browser = launch(pw)
            yield node, browser
            browser.close()


@pytest.fixture
def page(site):
    node, browser = site
    ctx = browser.new_context()
    page = ctx.new_page()
    sign_in(page, node.web, "ada", next_path="/console/projects")
    expect(page.locator("#project h2").first).to_contain_text("alpha — model tiny", timeout=30_000)
    yield page
    ctx.close()


def test_a_late_answer_for_a_project_clicked_before_is_dropped(page):
    held = []
    page.route(lambda url: url.endswith("/api/projects/alpha"), lambda route: held.append(route))
    page.click("#project-list a >> text=alpha")
    page.click("#project-list a >> text=beta")
    expect(page.locator("#project h2").first).to_contain_text("beta — model tiny", timeout=30_000)
    with page.expect_response(lambda r: r.url.endswith("/api/projects/alpha")):
        held[0].continue_()
    page.wait_for_timeout(300)  # a drawn answer would be on the page by now
    expect(page.locator("#project h2").first).to_contain_text("beta — model tiny")


def test_a_double_click_on_train_starts_one_run(page):
    held = []
    page.route(lambda url: url.endswith("/api/projects/alpha/runs"),
               lambda route: held.append(route) if route.request.method == "POST" else route.continue_())
    page.dblclick("#train")
    expect(page.locator("#train")).to_be_disabled()
    page.wait_for_timeout(300)
    assert len(held) == 1
    held[0].fulfill(json={"project": "alpha", "run": "20260101T000000-1", "labeled_cases": 0})
    expect(page.locator("#project-result")).to_contain_text("run 20260101T000000-1 started")
    expect(page.locator("#train")).to_be_enabled()


def test_a_failed_poll_of_the_runs_is_shown_and_polled_again(page):
    failed = []

    def once_502(route) -> None:
        if failed:
            route.continue_()
        else:
            failed.append(route.request.url)
            route.fulfill(status=502, json={"detail": "bad gateway"})

    page.route(lambda url: url.endswith("/api/projects/beta/runs"), once_502)
    page.click("#project-list a >> text=beta")
    expect(page.locator("#runs-status")).to_contain_text("not updated: bad gateway", timeout=30_000)
    expect(page.locator("#runs")).to_contain_text("no run yet", timeout=10_000)
    expect(page.locator("#runs-status")).to_be_empty()
