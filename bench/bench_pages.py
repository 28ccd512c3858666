"""Time from a page switch to a settled page, with warm caches, for every page of the app.

    python bench/bench_pages.py [--rounds 3]

Starts ``streamlit run app.py`` on localhost and drives it in headless Chromium (Debian's). One
round visits every page to warm the caches (model load, calibration pass, histograms); the timed
rounds then click each page in the sidebar and wait until its script has finished and every
plotly chart has drawn. Prints the median per page and the ratio to the 1 s target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser_app import (  # noqa: E402  (after the path set-up above)
    CHROMIUM, EXCEPTION, PAGES, launch, streamlit_server, switch_page, wait_settled,
)

TARGET_S = 1.0


def measure(rounds: int) -> dict[str, list[float]]:
    from playwright.sync_api import sync_playwright

    timings: dict[str, list[float]] = {title: [] for _, title in PAGES}
    with streamlit_server() as url, sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(url)
        wait_settled(page, "QuantLab")
        for label, title in PAGES:  # warm-up: first visits fill the caches
            switch_page(page, label, title)
        for _ in range(rounds):
            for label, title in PAGES:
                timings[title].append(switch_page(page, label, title))
                if page.locator(EXCEPTION).count():
                    raise RuntimeError(f"exception box on the {title} page")
        browser.close()
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed visits per page (median reported)")
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: install Debian's chromium to run this benchmark", file=sys.stderr)
        return 2
    timings = measure(args.rounds)
    medians = {title: statistics.median(values) for title, values in timings.items()}
    if args.json:
        print(json.dumps({"target_s": TARGET_S, "median_s": medians, "all_s": timings}, indent=1))
        return 0
    print(f"page switch -> settled page, warm caches, median of {args.rounds} (target {TARGET_S:.1f} s)")
    print(f"{'page':<24} {'median s':>9} {'x target':>9}")
    for title, median in medians.items():
        print(f"{title:<24} {median:9.3f} {median / TARGET_S:9.2f}")
    worst = max(medians, key=medians.get)
    print(f"slowest: {worst} at {medians[worst]:.3f} s; all under target: {max(medians.values()) < TARGET_S}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
