"""Drive the real app in headless Chromium: start ``streamlit run``, switch pages, wait until settled.

Shared by the browser test (tests/test_browser.py) and the page-switch benchmark
(bench/bench_pages.py). Playwright cannot download browsers offline, so it runs Debian's Chromium.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# (label in the sidebar navigation, the page's title)
PAGES = (
    ("QuantLab", "QuantLab"), ("Model", "Model"), ("Playground", "Playground"), ("Weights", "Weights"),
    ("Outliers", "Outliers"), ("Clipping", "Clipping"), ("Size & scale overhead", "Size & scale overhead"),
    ("Quality vs bits", "Quality vs bits"), ("Compare", "Compare"), ("Mixed precision", "Mixed precision"),
)
EXTRA_ARGS: list[str] = []
SETTLED = '[data-testid="stApp"][data-test-script-state="notRunning"]'
# The router (pages/navigation.py) draws the navigation as page links at the top of the sidebar.
NAV_LINK = '[data-testid="stSidebar"] [data-testid="stPageLink-NavLink"]'
# (URL path, the page's title): every page's shared link, "/home" included.
URLS = (("", "QuantLab"), ("home", "QuantLab"), ("model", "Model"), ("playground", "Playground"),
        ("weights", "Weights"), ("outliers", "Outliers"), ("clipping", "Clipping"), ("size", "Size & scale overhead"),
        ("quality", "Quality vs bits"), ("compare", "Compare"), ("mixed", "Mixed precision"))
EXCEPTION = '[data-testid="stException"]'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def streamlit_server(start_timeout: float = 120.0, address: str = "127.0.0.1", env: dict | None = None,
                     root: Path = ROOT):
    """``python -m streamlit run app.py`` of the checkout ``root``, on a free port bound to ``address``; yields
    its (localhost) URL."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
               "--server.port", str(port), "--server.address", address, *EXTRA_ARGS]
    # stderr into a file, not a pipe nobody reads: a full pipe (64 KB of logs) would block the server.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, process, start_timeout, stderr)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float, stderr) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr.seek(0)
            raise RuntimeError(f"streamlit exited with {process.returncode}: {stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"streamlit did not answer on {url} within {timeout:.0f} s")


def launch(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def wait_settled(page, title: str, timeout_ms: float = 180_000) -> None:
    """The page shows ``title``, its script has finished, and every plotly chart has drawn."""
    page.locator("h1", has_text=title).first.wait_for(timeout=timeout_ms)
    page.wait_for_selector(SETTLED, timeout=timeout_ms)
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
                 .every(chart => chart.querySelector('.main-svg'))""",
        timeout=timeout_ms,
    )


def switch_page(page, label: str, title: str, timeout_ms: float = 180_000) -> float:
    """Click ``label`` in the sidebar navigation; seconds until the new page has settled."""
    link = page.locator(NAV_LINK, has_text=label).first
    start = time.perf_counter()
    link.click()
    wait_settled(page, title, timeout_ms)
    return time.perf_counter() - start


QUIET_MS = 400  # a run that ends and is not followed by another within this long is the last one

# Resolves, once the app's script has run and finished and no further run followed within QUIET_MS, to the
# page-clock time of that last finish. A button that calls st.rerun() runs the script twice: the time to
# count is until the second run ends, and the next interaction must not click into that second run (a click
# on a widget being redrawn is lost, and the benchmark then waited for a rerun that never came).
_ARM_RERUN = """(quietMs) => {
    const app = document.querySelector('[data-testid="stApp"]');
    let ran = false, finished = null, timer = null;
    window.__quantlabSettled = new Promise(resolve => {
        const observer = new MutationObserver(records => {
            const state = app.getAttribute('data-test-script-state');
            clearTimeout(timer);
            // A short run can go running -> notRunning between two callbacks: its 'running' is then only
            // in a record's old value, and reading the attribute alone would wait for a run already over.
            if (state === 'running' || records.some(record => record.oldValue === 'running')) ran = true;
            if (ran && state === 'notRunning') {
                finished = performance.now();
                timer = setTimeout(() => { observer.disconnect(); resolve(finished); }, quietMs);
            }
        });
        observer.observe(app, {attributes: true, attributeOldValue: true,
                                attributeFilter: ['data-test-script-state']});
    });
    window.__quantlabStart = performance.now();
}"""


def timed_interaction(page, action, timeout_ms: float = 120_000) -> float:
    """Seconds from ``action()`` (a click, a key press) until the last rerun it caused has finished and drawn."""
    page.evaluate(_ARM_RERUN, QUIET_MS)
    action()
    page.wait_for_function("() => window.__quantlabSettled.then(() => true)", timeout=timeout_ms)
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
                 .every(chart => chart.querySelector('.main-svg'))""",
        timeout=timeout_ms,
    )
    # Measured on the page's clock, without the quiet wait that only confirmed no other run followed.
    return page.evaluate("async () => ((await window.__quantlabSettled) - window.__quantlabStart) / 1000")
