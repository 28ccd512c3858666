"""Concurrent users: sessions quantizing at the same time keep their own results and files.

The app caches one full-precision model for every browser session (``st.cache_resource``), so two
people quantizing at once work on the same object. These tests run two sessions at the same time,
each quantizing different configurations, and check that each gets exactly the results a private,
sequential run gives, and that the cached model's weights are bit-for-bit what they were (a SHA-256
over every tensor). Uploads live in a folder per session, named by content, removed with the session.
"""

from __future__ import annotations

import gc
import hashlib
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from pages import runs
from pages.common import cached_model
from pages.runs import RunSettings
from quantlab.models import loading as models
from quantlab.recipe import parse_config_name
from quantlab.evaluation import EvalConfig
from quantlab.runs.pipeline import DEFAULT_SWEEP, QuantSession, quantize_model

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 600  # two sessions share two busy cores
SETTINGS = RunSettings(calib_samples=2, calib_len=64, eval_tokens=512)  # the smallest the run settings offer
SESSION_CONFIGS = (["int4-g128", "gptq-int4-g128"], ["int8", "w8a8-smoothquant"])


def weights_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the model (parameters and buffers), by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def in_parallel(*jobs) -> list:
    """Run the jobs in threads at the same time; re-raise the first failure."""
    results, errors = [None] * len(jobs), []

    def work(index, job):
        try:
            results[index] = job()
        except BaseException as exc:  # noqa: BLE001  handed to the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def private_results(names: list[str], loaded: models.LoadedModel) -> dict[str, dict]:
    """What the Quality page computes, on a private copy of the model, one configuration after another."""
    copy = models.copy_model(loaded)
    session = QuantSession(copy, None, EvalConfig(ctx=256, max_tokens=SETTINGS.eval_tokens))
    results = {}
    for name in names:
        _, result = quantize_model(copy, parse_config_name(name, calib=SETTINGS.calib), session=session)
        results[result.config.name] = {"bits_per_weight": result.bits_per_weight, **result.quality}
    return results


def quality_session(names: list[str]) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.selectbox(key="sb_device").set_value("cpu").run()  # the cached model below is the CPU one
    at.switch_page("pages/quality_page.py").run()
    at.multiselect(key="q_configs").set_value(names)
    at.number_input(key="q_cs").set_value(SETTINGS.calib_samples)
    at.select_slider(key="q_cl").set_value(SETTINGS.calib_len)
    at.select_slider(key="q_et").set_value(SETTINGS.eval_tokens)
    return at


def test_two_app_sessions_quantizing_at_once_keep_their_results_and_the_cached_model():
    shared = cached_model(models.BUNDLED_LM, "cpu", False, "auto")  # the object every session gets
    before = weights_checksum(shared.model)
    sessions = [quality_session(names) for names in SESSION_CONFIGS]
    in_parallel(*[lambda at=at: at.button(key="q_run").click().run() for at in sessions])
    assert cached_model(models.BUNDLED_LM, "cpu", False, "auto") is shared
    assert weights_checksum(shared.model) == before
    for at, names in zip(sessions, SESSION_CONFIGS):
        assert not at.exception, at.exception
        table = at.dataframe[0].value
        expected = private_results(["fp", *names], shared)  # fp: the baseline the page always runs
        assert list(table["config"]) == list(expected)  # this session's configurations, and only them
        for row in table.itertuples():
            if row.config != "fp":  # the baseline row shows the baseline's storage (bf16), not the run's fp32
                assert row.bits_per_weight == pytest.approx(expected[row.config]["bits_per_weight"])
            assert row.perplexity == pytest.approx(expected[row.config]["perplexity"], rel=1e-5)
            assert row.kl_divergence == pytest.approx(expected[row.config]["kl_divergence"], rel=1e-4, abs=1e-7)
    assert weights_checksum(shared.model) == before


def test_threads_quantizing_one_shared_model_match_sequential_runs(bundled_lm):
    """AWQ and SmoothQuant fold scales into norms: on a copy of each block, never the shared model."""
    names = ("awq-int4-g64", "w8a8-smoothquant")
    before = weights_checksum(bundled_lm.model)

    def run(name: str):
        config = parse_config_name(name, calib=SETTINGS.calib)
        return quantize_model(bundled_lm, config, max_eval_tokens=SETTINGS.eval_tokens)[1]

    together = in_parallel(*[lambda name=name: run(name) for name in names])
    assert weights_checksum(bundled_lm.model) == before
    for name, result in zip(names, together):
        alone = run(name)
        assert result.config == alone.config
        assert result.quality["perplexity"] == pytest.approx(alone.quality["perplexity"], rel=1e-5)
        assert [layer.output_error for layer in result.layers] == pytest.approx(
            [layer.output_error for layer in alone.layers], rel=1e-4)
    assert weights_checksum(bundled_lm.model) == before


def upload_session(name: str, data: bytes) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.selectbox(key="sb_model").set_value("Upload .safetensors").run()
    at.file_uploader(key="sb_upload").set_value((name, data, "application/octet-stream")).run()
    at.switch_page("pages/weights_page.py").run()
    assert not at.exception, at.exception
    return at


def test_uploads_live_in_a_folder_per_session_named_by_content_and_go_with_the_session(tmp_path):
    layer = "model.layers.0.mlp.down_proj.weight"
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_file({layer: torch.randn(16, 128)}, tmp_path / f"{seed}.safetensors")
        files.append((tmp_path / f"{seed}.safetensors").read_bytes())
    hostile = "../../" + str(tmp_path / "escaped.safetensors")  # a name that is a path out of any folder
    first, second = upload_session(hostile, files[0]), upload_session(hostile, files[1])
    stored = [Path(at.session_state["_model_choice"].weights_path) for at in (first, second)]
    folders = [at.session_state["_quantlab_session_folder"].path for at in (first, second)]
    assert folders[0] != folders[1] and [s.parent for s in stored] == folders
    assert stored[0].read_bytes() == files[0] and stored[1].read_bytes() == files[1]
    assert all("escaped" not in s.name and s.name.startswith("upload-") for s in stored)
    assert not (tmp_path / "escaped.safetensors").exists()
    # Each session shows its own file: the same layer, different weights.
    shown = [float(at.metric[1].value) for at in (first, second)]  # relative error of the layer
    assert shown[0] != shown[1]
    del first
    gc.collect()  # what happens to a session's state when its browser tab closes
    assert not folders[0].exists() and folders[1].exists() and stored[1].is_file()


@pytest.mark.parametrize("value, expected", [("7", 7), (" 12 ", 12), ("0", 10), ("-3", 10), ("abc", 10), ("", 10)])
def test_server_limits_come_from_the_environment_with_safe_defaults(monkeypatch, value, expected):
    monkeypatch.setenv("QUANTLAB_TEST_LIMIT", value)
    assert runs._env_limit("QUANTLAB_TEST_LIMIT", 10) == expected


def test_workshop_server_limits_bound_what_one_click_may_compute(monkeypatch):
    monkeypatch.setattr(runs, "MAX_SWEEP_CONFIGS", 3)
    monkeypatch.setattr(runs, "MAX_CALIB_SAMPLES", 16)
    monkeypatch.setattr(runs, "MAX_EVAL_TOKENS", 2048)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page("pages/quality_page.py").run()
    assert not at.exception, at.exception
    configs = at.multiselect(key="q_configs")
    assert configs.value == list(DEFAULT_SWEEP[:3]) and configs.proto.max_selections == 3
    assert at.number_input(key="q_cs").max == 16
    assert at.select_slider(key="q_et").options[-1] == "2048"
