"""Streamlit helpers for quantization runs: run settings, and memos for long work that reports progress.

Used by the Quality, Compare and Outliers pages. Runs are keyed by ``common.results_key()``, the
configuration name and the settings, and shared by every session: a second browser asking for
the same run gets it at once, and nobody's run changes the cached model (the pipeline builds new
blocks and never writes to the original).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import streamlit as st

from pages.common import explain
from quantlab.models import loading as models
from quantlab.recipe import CalibConfig, RunResult, parse_config_name
from quantlab.device import release_memory
from quantlab.evaluation import EvalConfig
from quantlab.runs.pipeline import SWEEP_EVAL_CTX, QuantSession, quantize_model

# --- run settings ------------------------------------------------------------------------------
EVAL_TOKEN_CHOICES = (512, 1024, 2048, 4096, 8192, 16384)
CALIB_LEN_CHOICES = (64, 128, 256, 512, 1024, 2048)


def _env_limit(name: str, default: int) -> int:
    """A positive whole number from the environment (set before ``streamlit run``); ``default`` otherwise."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else default


# How much one click may compute on a shared workshop server (README "Workshop server").
MAX_SWEEP_CONFIGS = _env_limit("QUANTLAB_MAX_SWEEP_CONFIGS", 10)
MAX_CALIB_SAMPLES = _env_limit("QUANTLAB_MAX_CALIB_SAMPLES", 512)
MAX_EVAL_TOKENS = _env_limit("QUANTLAB_MAX_EVAL_TOKENS", EVAL_TOKEN_CHOICES[-1])


@dataclass(frozen=True)
class RunSettings:
    """How much text a run calibrates and evaluates on: small by default so that results come fast."""

    calib_samples: int = 8
    calib_len: int = 128
    eval_tokens: int = 4096

    @property
    def calib(self) -> CalibConfig:
        return CalibConfig(n_samples=self.calib_samples, seq_len=self.calib_len)


def run_settings(key: str) -> RunSettings:
    """An expander with the calibration and evaluation sizes; defaults suit the bundled models."""
    default = RunSettings()
    with st.expander("Run settings: calibration and evaluation sizes"):
        explain("calibration")
        left, mid, right = st.columns(3)
        samples = left.number_input("Calibration sequences", 1, MAX_CALIB_SAMPLES,
                                    min(default.calib_samples, MAX_CALIB_SAMPLES), key=f"{key}_cs")
        length = mid.select_slider("Tokens per sequence", CALIB_LEN_CHOICES, default.calib_len, key=f"{key}_cl")
        choices = [t for t in EVAL_TOKEN_CHOICES if t <= MAX_EVAL_TOKENS] or [EVAL_TOKEN_CHOICES[0]]
        tokens = right.select_slider("Evaluation tokens", choices, min(default.eval_tokens, choices[-1]),
                                     key=f"{key}_et",
                                     help="Held-out tokens for perplexity and KL (causal LMs). More is steadier, "
                                          "slower.")
    return RunSettings(int(samples), int(length), int(tokens))


class ResultStore:
    """A bounded memo shared by every session, for long work that reports progress as it goes.

    ``st.cache_data`` cannot hold such work: it records and replays the elements a cached function
    touches, and a progress bar drawn from inside belongs to the page that called it. Entries are
    evicted least recently used first; two sessions asking for the same missing entry at once may
    both compute it (each gets a correct result, one of them is kept).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, compute: Callable):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()  # outside the lock: other sessions keep reading while this one works
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return value


@st.cache_resource(show_spinner=False)
def result_store(name: str, max_entries: int) -> ResultStore:
    return ResultStore(max_entries)


@st.cache_resource(max_entries=4, show_spinner=False)
def quality_session(model_key: str, eval_tokens: int, _loaded: models.LoadedModel) -> QuantSession:
    """The evaluation text and full-precision reference for one model, shared by every run on it."""
    context = getattr(_loaded.model.config, "max_position_embeddings", None) or SWEEP_EVAL_CTX
    return QuantSession(_loaded, None, EvalConfig(ctx=min(SWEEP_EVAL_CTX, context), max_tokens=eval_tokens))


def _quantize(model_key: str, config_name: str, settings: RunSettings, loaded, progress,
              evaluate_quality: bool = True) -> tuple:
    config = parse_config_name(config_name, calib=settings.calib)
    session = quality_session(model_key, settings.eval_tokens, loaded)
    return quantize_model(loaded, config, progress, session=session, evaluate_quality=evaluate_quality)


def _run_key(model_key: str, config_name: str, settings: RunSettings) -> tuple:
    """One key per run whichever page asks and whatever alias was typed (int8 = rtn-int8-per-channel)."""
    return model_key, parse_config_name(config_name).name, settings


def cached_run(model_key: str, config_name: str, settings: RunSettings, loaded, progress=None) -> RunResult:
    """One configuration's results, kept without the quantized model (results are small, models are not)."""
    def compute() -> RunResult:
        result = _quantize(model_key, config_name, settings, loaded, progress)[1]
        release_memory()  # the quantized copy is gone: hand its memory back
        return result

    return result_store("runs", 64).get(_run_key(model_key, config_name, settings), compute)


def cached_quantized_model(model_key: str, config_name: str, settings: RunSettings, loaded, progress=None):
    """The quantized model itself, for generation and export on the Compare page; shared read-only.

    Not evaluated again: the figures come from :func:`cached_run`, which Quality and Compare share.
    """
    return result_store("quantized models", 4).get(
        _run_key(model_key, config_name, settings),
        lambda: _quantize(model_key, config_name, settings, loaded, progress, evaluate_quality=False)[0])


if __name__ == "__main__":  # only Streamlit's legacy pages/ mode runs this module as a page: see pages/navigation.py
    from pages.navigation import route

    route()
