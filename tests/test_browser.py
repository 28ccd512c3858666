"""The real app in a real browser: every page opens in headless Chromium without an exception box.

A screenshot of each page goes to ``$QUANTLAB_SCREENSHOTS`` (default: pytest's temporary folder, so a
test run never rewrites tracked files); ``make screenshots`` refreshes the committed ones in
assets/screenshots/ that README shows. Skipped, with the reason, where Debian's Chromium is not
installed (``make browser-deps`` installs it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.browser_app import (
    CHROMIUM, EXCEPTION, NAV_LINK, PAGES, URLS, launch, streamlit_server, switch_page, wait_settled,
)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium (make browser-deps) to run the browser test")
    with streamlit_server() as url:
        yield url


def _slug(title: str) -> str:
    return title.lower().replace(" & ", "-").replace(" ", "-")


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("QUANTLAB_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_every_page_renders_without_an_exception(app_url, screenshots):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1440, "height": 2000})
        page.goto(app_url)
        wait_settled(page, "QuantLab")
        for index, (label, title) in enumerate(PAGES):
            switch_page(page, label, title)
            assert page.locator(EXCEPTION).count() == 0, f"exception box on the {title} page"
            page.screenshot(path=str(screenshots / f"{index}-{_slug(title)}.png"), full_page=True)
        assert len(list(screenshots.glob("[0-9]-*.png"))) == len(PAGES)
        # The workshop's instant path: the shipped sweep opens on the Quality page, charts and table drawn.
        switch_page(page, "Quality vs bits", "Quality vs bits")
        page.get_by_role("tab", name="Open a sweep file").click()
        page.get_by_role("button", name="Open this sweep").click()
        page.wait_for_selector('[data-testid="stPlotlyChart"]', timeout=60_000)
        wait_settled(page, "Quality vs bits")
        assert page.locator('[data-testid="stPlotlyChart"]').count() == 3
        assert page.locator(EXCEPTION).count() == 0
        page.screenshot(path=str(screenshots / "quality-vs-bits-shipped-sweep.png"), full_page=True)
        page.locator(NAV_LINK, has_text="Playground").first.click()
        wait_settled(page, "Playground")
        page.get_by_role("button", name="Add an outlier").click()
        # The outlier appended is 10 x the peak (12.0): INT4's full-range scale becomes 12 / 7.5 = 1.6 (fp16 1.5996)
        page.wait_for_selector('[data-testid="stMetricValue"] >> text="1.6"', timeout=60_000)
        assert page.locator(EXCEPTION).count() == 0
        browser.close()


def test_outliers_rotation_before_and_after(app_url, screenshots):
    """The Outliers page rotates a copy and draws block 0's down_proj input before and after (README's shot)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1440, "height": 1300})
        page.goto(f"{app_url}/outliers")
        wait_settled(page, "Outliers")
        page.get_by_text("down_proj", exact=True).click()
        wait_settled(page, "Outliers")
        page.get_by_role("button", name="Rotate a copy and compare").click()
        page.locator(".gtitle", has_text="down_proj input").wait_for(timeout=180_000)
        wait_settled(page, "Outliers")
        assert page.locator(EXCEPTION).count() == 0
        heading = page.locator("h3", has_text="Hadamard rotation: before and after")
        heading.evaluate("element => element.scrollIntoView({block: 'start'})")
        page.screenshot(path=str(screenshots / "outliers-rotation.png"))
        browser.close()


RAW_PAGE_NAMES = sorted({path.stem.replace("_", " ") for path in Path("pages").glob("*.py")} | {"app"})
WATCH_SIDEBAR = """() => ({
    links: [...document.querySelectorAll('[data-testid="stSidebar"] a')].map(a => a.innerText.split('\\n').pop()),
    dialogs: [...document.querySelectorAll('[role="dialog"]')].map(d => d.innerText.slice(0, 80)),
    title: (document.querySelector('h1') || {}).innerText || null,
})"""


def _watch_first_visit(page, title: str, timeout_s: float = 180.0) -> list[dict]:
    """Snapshots of the sidebar links, open dialogs and page title every 100 ms until ``title`` shows."""
    import time

    snapshots, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshots.append(page.evaluate(WATCH_SIDEBAR))
        if snapshots[-1]["title"] == title:
            return snapshots
        page.wait_for_timeout(100)
    raise AssertionError(f"{title} did not open within {timeout_s:.0f} s; last view {snapshots[-1]}")


def test_fresh_server_first_visit_and_every_shared_link():
    """A room opens a shared link on a server nobody has visited yet (Streamlit's legacy pages/ mode run)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium (make browser-deps) to run the browser test")
    titles = [title for _, title in PAGES]
    with streamlit_server() as url, sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(f"{url}/quality")
        snapshots = _watch_first_visit(page, "Quality vs bits")
        for snapshot in snapshots:
            assert not snapshot["dialogs"], f"dialog on the first visit: {snapshot['dialogs']}"
            assert not set(snapshot["links"]) & set(RAW_PAGE_NAMES), f"raw file names in the sidebar: {snapshot}"
            # none yet, or the page links as they are being drawn (a prefix of the list), never anything else
            assert snapshot["links"] == titles[:len(snapshot["links"])], f"unexpected navigation: {snapshot['links']}"
        wait_settled(page, "Quality vs bits")
        assert page.locator(NAV_LINK).all_inner_texts()[-1].endswith(PAGES[-1][0])  # every page, the last one too
        assert page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').count() >= 2  # the sidebar
        for path, title in URLS:
            page.goto(f"{url}/{path}")
            wait_settled(page, title)
            assert page.locator('[role="dialog"]').count() == 0, f"dialog on /{path}"
            assert page.locator("h1").first.inner_text() == title
            assert page.locator(EXCEPTION).count() == 0
        browser.close()
