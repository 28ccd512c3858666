"""Time from a page switch to a settled page, with warm caches, for every page of the app; the
Playground's interactions; and a fresh server's first paint.

    python bench/bench_pages.py [--rounds 3]

Starts ``streamlit run app.py`` on localhost and drives it in headless Chromium (Debian's). One
round visits every page to warm the caches (model load, calibration pass, histograms); the timed
rounds then click each page in the sidebar and wait until its script has finished and every
plotly chart has drawn. Prints the median per page and the ratio to the 1 s target. Then, on the
Playground, each interaction a workshop does (a bits step, the asymmetric grid, groups, adding an
outlier, resetting) from the input to the redrawn page. First paint: seconds from opening the
fresh server's page until the sidebar navigation shows, and until the home page's title shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser_app import (  # noqa: E402  (after the path set-up above)
    CHROMIUM, EXCEPTION, NAV_LINK, PAGES, launch, streamlit_server, switch_page, timed_interaction, wait_settled,
)

TARGET_S = 1.0


def _playground_actions(page) -> dict:
    main = page.locator('[data-testid="stMainBlockContainer"]')
    bits = main.locator('[data-testid="stSlider"] input[type="range"]').first  # react-aria's thumb input
    return {
        "bits +1": lambda: (bits.focus(), bits.press("ArrowRight")),
        "bits -1": lambda: (bits.focus(), bits.press("ArrowLeft")),
        "asymmetric grid": lambda: main.get_by_text("asymmetric", exact=True).click(),
        "symmetric grid": lambda: main.get_by_text("symmetric", exact=True).click(),
        "groups": lambda: main.get_by_text("groups", exact=True).click(),
        "whole vector": lambda: main.get_by_text("the whole vector", exact=True).click(),
        "add an outlier": lambda: main.get_by_role("button", name="Add an outlier").click(),
        "reset": lambda: main.get_by_role("button", name="Reset to the example").click(),
    }


def measure_playground(page, rounds: int) -> dict[str, list[float]]:
    switch_page(page, "Playground", "Playground")
    actions = _playground_actions(page)
    timings: dict[str, list[float]] = {name: [] for name in actions}
    for round_index in range(rounds + 1):  # the first round warms the caches and is not kept
        for name, action in actions.items():
            seconds = timed_interaction(page, action)
            if round_index:
                timings[name].append(seconds)
    return timings


def measure(rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    from playwright.sync_api import sync_playwright

    timings: dict[str, list[float]] = {title: [] for _, title in PAGES}
    with streamlit_server() as url, sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        start = time.perf_counter()
        page.goto(url)
        page.locator(NAV_LINK).first.wait_for(timeout=180_000)
        first_paint = {"navigation shown": time.perf_counter() - start}
        wait_settled(page, "QuantLab")
        first_paint["home page shown"] = time.perf_counter() - start
        for label, title in PAGES:  # warm-up: first visits fill the caches
            switch_page(page, label, title)
        for _ in range(rounds):
            for label, title in PAGES:
                timings[title].append(switch_page(page, label, title))
                if page.locator(EXCEPTION).count():
                    raise RuntimeError(f"exception box on the {title} page")
        playground = measure_playground(page, rounds)
        browser.close()
    return timings, playground, first_paint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed visits per page (median reported)")
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: install Debian's chromium to run this benchmark", file=sys.stderr)
        return 2
    timings, playground, first_paint = measure(args.rounds)
    medians = {title: statistics.median(values) for title, values in timings.items()}
    interactions = {name: statistics.median(values) for name, values in playground.items()}
    if args.json:
        print(json.dumps({"target_s": TARGET_S, "median_s": medians, "all_s": timings,
                          "playground_median_s": interactions, "playground_all_s": playground,
                          "first_paint_s": first_paint}, indent=1))
        return 0
    print("fresh server, first visit: " + ", ".join(f"{k} after {v:.2f} s" for k, v in first_paint.items()))
    print(f"page switch -> settled page, warm caches, median of {args.rounds} (target {TARGET_S:.1f} s)")
    print(f"{'page':<24} {'median s':>9} {'x target':>9}")
    for title, median in medians.items():
        print(f"{title:<24} {median:9.3f} {median / TARGET_S:9.2f}")
    worst = max(medians, key=medians.get)
    print(f"slowest: {worst} at {medians[worst]:.3f} s; all under target: {max(medians.values()) < TARGET_S}")
    print(f"Playground interaction -> redrawn page, median of {args.rounds} (target {TARGET_S:.1f} s)")
    print(f"{'interaction':<24} {'median s':>9} {'x target':>9}")
    for name, median in interactions.items():
        print(f"{name:<24} {median:9.3f} {median / TARGET_S:9.2f}")
    print(f"all Playground interactions under target: {max(interactions.values()) < TARGET_S}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
