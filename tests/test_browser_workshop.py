"""A workshop server in a real browser, bound as README's "Workshop server" says (every interface).

A visitor finds no remote-code switch, cannot load a folder outside the operator's roots, gets the
same message for a missing and a forbidden path, and an upload's folder is gone once its session
has ended. Skipped where Debian's Chromium is not installed (``make browser-deps``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from safetensors.torch import save_file
import torch

from tests.browser_app import CHROMIUM, EXCEPTION, SETTLED, launch, streamlit_server, wait_settled

pytestmark = pytest.mark.browser
SIDEBAR = '[data-testid="stSidebar"]'


def _choose(page, option: str) -> None:
    page.locator(f'{SIDEBAR} [data-testid="stSelectbox"]').first.click()
    page.get_by_role("option", name=option).click()
    wait_settled(page, "QuantLab")


def _sidebar_alerts(page) -> list[str]:
    return [text.strip() for text in page.locator(f'{SIDEBAR} [data-testid="stAlert"]').all_inner_texts()]


def _wait_for_alert_naming(page, text: str, timeout_ms: float = 60_000) -> None:
    page.wait_for_function(
        """([sidebar, text]) => [...document.querySelectorAll(sidebar + ' [data-testid="stAlert"]')]
                 .some(alert => alert.innerText.includes(text))""",
        arg=[SIDEBAR, text], timeout=timeout_ms,
    )


def _session_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("quantlab-uploads-*/session-*"))


def test_a_visitor_cannot_reach_past_the_operators_settings(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium (make browser-deps) to run the browser test")
    from playwright.sync_api import sync_playwright

    roots, server_tmp = tmp_path / "models", tmp_path / "server-tmp"
    roots.mkdir()
    server_tmp.mkdir()
    secret = tmp_path / "private-model"
    secret.mkdir()
    (secret / "config.json").write_text("{}")
    weights = tmp_path / "w.safetensors"
    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(16, 64)}, weights)
    env = {"QUANTLAB_LOCAL_ROOTS": str(roots), "QUANTLAB_UPLOAD_GRACE_S": "1", "TMPDIR": str(server_tmp)}
    with streamlit_server(address="0.0.0.0", env=env) as url, sync_playwright() as playwright:
        browser = launch(playwright)
        visitor = browser.new_page(viewport={"width": 1440, "height": 1600})
        visitor.goto(url)
        wait_settled(visitor, "QuantLab")
        _choose(visitor, "Hugging Face hub id (needs network)")
        assert visitor.locator('[data-testid="stCheckbox"]').count() == 0  # no remote-code switch
        _choose(visitor, "Local path (folder, .safetensors or shard index)")
        label = "Folder, .safetensors file or *.safetensors.index.json"
        box = visitor.get_by_label(label, exact=True).and_(visitor.get_by_role("textbox"))  # not its help button
        messages = set()
        for path in (secret, tmp_path / "no-such-folder", Path("/etc"), Path("/proc/self/environ")):
            box.fill(str(path))
            box.press("Enter")
            # Waits on what the run draws, not on seeing it start: a refusal's run can be so short that the
            # page never shows it running (React batches running -> notRunning into one render).
            _wait_for_alert_naming(visitor, str(path))  # not the previous path's alert, still on screen
            visitor.wait_for_selector(SETTLED, timeout=120_000)
            alerts = _sidebar_alerts(visitor)
            assert len(alerts) == 1 and "cannot open" in alerts[0], alerts
            messages.add(alerts[0].replace(str(path), "PATH"))
        assert len(messages) == 1, messages
        assert visitor.locator(EXCEPTION).count() == 0

        _choose(visitor, "Upload .safetensors")
        visitor.locator('input[type="file"]').set_input_files(str(weights))
        visitor.wait_for_function("() => true")
        deadline = time.monotonic() + 120
        while not _session_folders(server_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        (first,) = _session_folders(server_tmp)
        assert any(first.glob("upload-*.safetensors"))
        visitor.close()  # the session ends

        other = browser.new_page()
        other.goto(url)
        wait_settled(other, "QuantLab")
        time.sleep(3)  # past the 1 s grace
        _choose(other, "Upload .safetensors")
        other.locator('input[type="file"]').set_input_files(str(weights))  # an upload sweeps first
        deadline = time.monotonic() + 120
        while first.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not first.exists(), "the closed session's upload folder is still there"
        browser.close()
