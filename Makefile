# The two commands a new user needs: `make run` (set up, then start the app) and `make test`.
PYTHON ?= python3
PORT ?= 8501

.PHONY: setup run test bench browser-deps screenshots

setup:
	$(PYTHON) -m pip install -q -r requirements.txt

# Debian's Chromium for the real-browser test (Playwright cannot download browsers offline).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"

run: setup
	$(PYTHON) -m streamlit run app.py --server.port $(PORT)

test: setup browser-deps
	$(PYTHON) -m pytest -q

bench: setup
	for b in bench/bench_*.py; do $(PYTHON) $$b || exit 1; done

# Refresh the committed screenshots README shows (the browser test, writing into assets/).
screenshots: setup browser-deps
	QUANTLAB_SCREENSHOTS=assets/screenshots $(PYTHON) -m pytest -q tests/test_browser.py
