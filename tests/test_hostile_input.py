"""Issue 13's hostile inputs, generated in variants (tests/bad_input_corpus.py), through the CLI and the app.

CLI: exit code 2, exactly one line on stderr, no traceback, nothing written (the ``sandbox`` of
test_bad_input.py checks the working directory, the temp dir and the corpus). App: a message in the
page, never an exception box; outside the operator's roots one message for missing and present paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bad_input_corpus import (
    BAD_CONFIG_DOCUMENTS, BAD_CONFIG_FIELDS, BAD_WEIGHT_MAP, DEEP_JSON, HOSTILE_NAMES, SPECIAL_KINDS, make_special,
    many_tensors, named_tensor, pickle_streams, raw_safetensors,
)
from streamlit.testing.v1 import AppTest
from test_bad_input import APP, ROOT, TIMEOUT, assert_refused, cli, corpus, sandbox  # noqa: F401  (fixtures)

from quantlab.cli import build_parser
from quantlab.models.paths import AccessPolicy, allowed_path
from quantlab.models.uploads import UploadSpace
from quantlab.models.weightfiles import MAX_TENSORS_PER_FILE

FOLDER_LABEL = "Local path (folder, .safetensors or shard index)"
HUB_LABEL = "Hugging Face hub id (needs network)"


def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# --- files: nesting, names, indexes, configs, pickles, file types ------------------------------------
@pytest.mark.parametrize("case", list(DEEP_JSON))
def test_deeply_nested_json_is_one_line_everywhere(tmp_path, sandbox, capsys, tiny_model_dirs, case):
    (tmp_path / "header.safetensors").write_bytes(raw_safetensors(DEEP_JSON[case]))
    assert_refused(["inspect", str(tmp_path / "header.safetensors")], "header is not JSON", capsys)
    (tmp_path / "model.safetensors.index.json").write_text(DEEP_JSON[case])
    assert_refused(["inspect", str(tmp_path / "model.safetensors.index.json")], "not a valid shard index", capsys)
    model = _copy_model(tiny_model_dirs["llama"], tmp_path / "model")
    (model / "config.json").write_text(DEEP_JSON[case])
    assert_refused(["eval", str(model)], "config.json is not a JSON object", capsys)


@pytest.mark.parametrize("case", list(HOSTILE_NAMES))
def test_tensor_names_are_escaped_in_text_output(tmp_path, sandbox, capsys, case):
    path = tmp_path / "named.safetensors"
    path.write_bytes(named_tensor(HOSTILE_NAMES[case]))
    code, out, err = cli(["inspect", str(path)], capsys)
    assert code == 0 and not err
    assert out.isascii() or all(c.isprintable() or c == "\n" for c in out), repr(out)
    assert len(out.strip().splitlines()) == 3  # the heading, the one tensor, the totals: no injected line
    code, out, _ = cli(["inspect", str(path), "--json"], capsys)
    assert code == 0 and json.loads(out)["tensors"][0]["name"] == HOSTILE_NAMES[case]


@pytest.mark.parametrize("case", list(BAD_WEIGHT_MAP))
def test_shard_indexes_name_only_files_next_to_them(tmp_path, sandbox, capsys, case):
    value, message = BAD_WEIGHT_MAP[case]
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    for name in ("model-00001.safetensors", "sub/inner.safetensors"):
        (folder / name).write_bytes(named_tensor("w"))
    (tmp_path / "outside.safetensors").write_bytes(named_tensor("secret"))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model-00001.safetensors", "other": value}}))
    for command in ("inspect", "size"):
        assert_refused([command, str(index)], message, capsys)


@pytest.mark.parametrize("case", list(BAD_CONFIG_FIELDS))
def test_config_fields_of_wrong_type_or_size_are_refused_before_the_model_is_built(
        tmp_path, sandbox, capsys, tiny_model_dirs, case):
    key, value = BAD_CONFIG_FIELDS[case]
    model = _copy_model(tiny_model_dirs["llama"], tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config[key] = value
    (model / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    for command in ("eval", "size"):
        assert_refused([command, str(model)], "config", capsys)
    assert time.perf_counter() - started < 60  # 10^9 layers are never built


@pytest.mark.parametrize("case", list(BAD_CONFIG_DOCUMENTS))
def test_config_documents_that_are_not_objects_are_refused(tmp_path, sandbox, capsys, tiny_model_dirs, case):
    model = _copy_model(tiny_model_dirs["llama"], tmp_path / "model")
    (model / "config.json").write_text(BAD_CONFIG_DOCUMENTS[case])
    assert_refused(["eval", str(model)], "config.json is not a JSON object", capsys)


@pytest.mark.parametrize("case", list(pickle_streams()))
def test_malformed_pickle_streams_are_one_line(tmp_path, sandbox, capsys, case):
    path = tmp_path / "weights.bin"
    path.write_bytes(pickle_streams()[case])
    line = assert_refused(["inspect", str(path)], "weights.bin", capsys)
    assert "PyTorch weights file" in line or "refused" in line


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("where", ["file", "in a folder"])
def test_only_regular_files_are_opened(tmp_path, kind, where):
    """A FIFO would block a reader forever: run as a real process with a timeout, so a hang fails the test."""
    folder = tmp_path / "model"
    folder.mkdir()
    if where == "in a folder":
        shutil.copy(ROOT / "assets" / "models" / "pystdlib-llama-4m" / "config.json", folder / "config.json")
    target = make_special(folder / "model.safetensors", kind)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for command in ("inspect", "eval"):
        argv = [command, str(target if where == "file" else folder)]
        result = subprocess.run([sys.executable, "-m", "quantlab", *argv], capture_output=True, text=True,
                                env=env, timeout=300, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_file_of_too_many_tensors_is_refused_before_any_walk(tmp_path, sandbox, capsys):
    path = tmp_path / "many.safetensors"
    path.write_bytes(many_tensors(MAX_TENSORS_PER_FILE + 10))
    started = time.perf_counter()
    assert_refused(["inspect", str(path)], f"more than the {MAX_TENSORS_PER_FILE:,}", capsys)
    assert time.perf_counter() - started < 30


# --- options --------------------------------------------------------------------------------------------
def _numeric_options():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps its subparsers here
    for command, sub in commands.items():
        for action in sub._actions:
            if action.type is not None and action.option_strings:
                yield command, action


def test_every_numeric_option_has_bounds():
    plain = [f"{c} {a.option_strings[0]}" for c, a in _numeric_options() if a.type in (int, float)]
    assert not plain, f"options without bounds: {plain}"


@pytest.mark.parametrize("command, option", [(c, a.option_strings[0]) for c, a in _numeric_options()])
@pytest.mark.parametrize("value", [str(2**70), str(-(2**70)), "1e400", "nan", "12abc"])
def test_huge_or_malformed_numbers_are_argparse_errors(sandbox, capsys, command, option, value):
    assert_refused([command, f"{option}={value}"], f"argument {option}", capsys)


@pytest.mark.parametrize("device, message", [("bogus", "unknown device 'bogus'"), ("meta", "cannot run a model"),
                                             ("xla", "cannot run a model"), ("cuda:99", "GPU")])
@pytest.mark.parametrize("command", ["eval", "quantize", "speed"])
def test_devices_that_cannot_run_a_model_are_refused(sandbox, capsys, command, device, message):
    assert_refused([command, "--device", device], message, capsys)


@pytest.mark.parametrize("source", ["a" * 300, "org/" + "b" * 300, "o/" + "c" * 97, "x" * 5000])
def test_long_hub_ids_are_one_line(sandbox, capsys, source):
    assert_refused(["inspect", source], "", capsys)


@pytest.mark.parametrize("configs", [",,,", " , ", ","])
def test_an_empty_configuration_list_is_an_error(sandbox, capsys, configs):
    assert_refused(["sweep", "--configs", configs], "names no configuration", capsys)


# --- outputs: checked before the work, never overwritten, no leftovers ---------------------------------
def test_outputs_are_checked_before_any_work(tmp_path, sandbox, capsys):
    existing = sandbox / "existing.json"
    existing.write_text("{}")
    blocker = sandbox / "a-file"
    blocker.write_text("x")
    cases = [
        (["quantize", "--record", str(existing)], "add --force"),
        (["sweep", "--out", str(existing)], "add --force"),
        (["sweep", "--out", str(sandbox)], "is a folder"),
        (["quantize", "--record", str(blocker / "r.json")], "not a writable folder"),
        (["quantize", "--out", str(blocker / "export")], "not a writable folder"),
        (["sweep", "--out", str(sandbox / ("n" * 300) / "s.json")], "too long"),
    ]
    for argv, message in cases:
        started = time.perf_counter()
        assert_refused(argv, message, capsys)
        assert time.perf_counter() - started < 30  # refused before loading or quantizing anything
    assert existing.read_text() == "{}" and sorted(p.name for p in sandbox.iterdir()) == ["a-file", "existing.json"]
    existing.unlink()
    blocker.unlink()


def test_closed_full_and_broken_outputs_are_handled_without_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    shell = f"{sys.executable} -m quantlab inspect"
    checks = {
        f"{shell} > /dev/full": (2, "No space left on device"),
        f"{shell} >&-": (2, "stdout is closed"),
        f"{shell} | true; exit ${{PIPESTATUS[0]}}": (141, None),  # the reader is gone before the first write
    }
    for line, (code, message) in checks.items():
        result = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, cwd=tmp_path,
                                timeout=300)
        assert result.returncode == code, (line, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 1, result.stderr
        assert message is None or message in result.stderr


# --- the engine's path rule ---------------------------------------------------------------------------
def test_outside_the_roots_missing_and_present_paths_get_the_same_message(tmp_path, tiny_model_dirs):
    root = tmp_path / "root"
    model = _copy_model(tiny_model_dirs["llama"], root / "model")
    outside = _copy_model(tiny_model_dirs["llama"], tmp_path / "outside")
    (root / "escape").symlink_to(outside)
    policy = AccessPolicy((root.resolve(),))
    assert allowed_path(str(model), policy) == model.resolve()
    messages = set()
    for path in (outside, tmp_path / "missing", root / "escape", root / "missing", Path("/etc/shadow"),
                 Path("/proc/self/environ"), Path("~/.ssh"), root / ".." / "outside"):
        with pytest.raises(Exception) as refused:
            allowed_path(str(path), policy)
        messages.add(str(refused.value).replace(str(path), "PATH"))
    assert len(messages) == 1, messages


def test_a_link_in_an_allowed_folder_may_not_lead_out(tmp_path, tiny_model_dirs):
    root = tmp_path / "root"
    model = _copy_model(tiny_model_dirs["llama"], root / "model")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(tiny_model_dirs["llama"] / "tokenizer.json")
    with pytest.raises(Exception, match="links outside the folders"):
        allowed_path(str(model), AccessPolicy((root.resolve(),)))


def test_the_default_roots_follow_the_address(monkeypatch):
    monkeypatch.delenv("QUANTLAB_LOCAL_ROOTS", raising=False)
    served, local = AccessPolicy.for_server("0.0.0.0"), AccessPolicy.for_server("127.0.0.1")
    assert Path.cwd().resolve() not in served.roots and Path.cwd().resolve() in local.roots
    assert not served.allow_remote_code and AccessPolicy.for_cli().roots is None
    assert AccessPolicy.for_server("", {"QUANTLAB_ALLOW_REMOTE_CODE": "1"}).allow_remote_code


def test_abandoned_upload_folders_are_swept_and_the_space_is_capped(tmp_path):
    space = UploadSpace(tmp_path / "uploads", max_bytes=1000, idle_s=3600, grace_s=60)
    gone, live, idle = (space.folder(name) for name in ("gone", "live", "idle"))
    space.save(gone, b"x" * 400, ".safetensors")
    space.save(live, b"y" * 400, ".safetensors")
    with pytest.raises(Exception, match="upload space is full"):
        space.save(live, b"z" * 400, ".safetensors")
    now = time.time()
    os.utime(idle, (now - 7200, now - 7200))
    os.utime(gone, (now - 120, now - 120))
    removed = space.sweep(lambda session: {"gone": False, "live": True}.get(session), now=now)
    assert sorted(p.name.split(".")[0] for p in removed) == ["session-gone", "session-idle"] and live.is_dir()
    assert space.save(live, b"z" * 400, ".safetensors").is_file()  # the freed space is usable again


# --- the app ------------------------------------------------------------------------------------------
def _sidebar_errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def test_the_app_gives_one_message_for_missing_and_forbidden_paths(monkeypatch, tmp_path, tiny_model_dirs):
    monkeypatch.setenv("QUANTLAB_LOCAL_ROOTS", str(tmp_path / "root"))
    (tmp_path / "root").mkdir()
    outside = _copy_model(tiny_model_dirs["llama"], tmp_path / "outside")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    messages = set()
    for label, key in ((FOLDER_LABEL, "sb_folder"), (HUB_LABEL, "sb_hub_id")):
        at.selectbox(key="sb_model").set_value(label).run()
        for path in (outside, tmp_path / "missing", Path("/etc"), Path("/proc/self/environ"), Path("~/.ssh")):
            at.text_input(key=key).set_value(str(path)).run()
            assert not at.exception and at.session_state["_model_choice"] is None
            messages.update(e.replace(str(path), "PATH") for e in _sidebar_errors(at))
    assert len(messages) == 1, messages


def test_a_folder_with_custom_code_runs_none_of_it(monkeypatch, tmp_path, tiny_model_dirs):
    model = _copy_model(tiny_model_dirs["llama"], tmp_path / "custom")
    marker = tmp_path / "code-ran"
    (model / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                                 "from transformers import LlamaConfig as EvilConfig\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (model / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("QUANTLAB_LOCAL_ROOTS", str(tmp_path))
    monkeypatch.delenv("QUANTLAB_ALLOW_REMOTE_CODE", raising=False)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    for label, key in ((FOLDER_LABEL, "sb_folder"), (HUB_LABEL, "sb_hub_id")):
        at.selectbox(key="sb_model").set_value(label).run()
        at.text_input(key=key).set_value(str(model)).run()
        at.switch_page("pages/model_page.py").run()
        assert not at.exception and not marker.exists()
        assert any("trust_remote_code" in e for e in _sidebar_errors(at))


def _upload(at: AppTest, data: bytes, page: str = "weights") -> AppTest:
    at.selectbox(key="sb_model").set_value("Upload .safetensors").run()
    at.file_uploader(key="sb_upload").set_value(("w.safetensors", data, "application/octet-stream")).run()
    at.switch_page(f"pages/{page}_page.py").run()
    assert not at.exception, at.exception
    return at


def test_hostile_uploads_are_messages_in_the_page():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    cases = {**{f"nested {k}": raw_safetensors(v) for k, v in DEEP_JSON.items()},
             **{f"name {k}": named_tensor(v) for k, v in HOSTILE_NAMES.items()},
             "12,000 tensors": many_tensors(12_000)}
    for case, data in cases.items():
        _upload(at, data, "model")
        assert not at.exception, case
        if case == "12,000 tensors" or case.startswith("nested"):
            assert _sidebar_errors(at), case


def _sweep_file(tmp_path: Path, edit) -> bytes:
    document = json.loads((ROOT / "assets" / "sweeps" / "pystdlib-llama-4m-default.json").read_text())
    edit(document["runs"][0])
    return json.dumps(document).replace('"__NaN__"', "NaN").encode()


@pytest.mark.parametrize("case, edit", [
    ("string bits", lambda run: run.update(bits_per_weight="4.125")),
    ("string bytes", lambda run: run.update(total_bytes="5000")),
    ("NaN perplexity", lambda run: run["quality"].update(perplexity="__NaN__")),
    ("Infinity KL", lambda run: run["quality"].update(kl_divergence=1e999)),
    ("string perplexity", lambda run: run["quality"].update(perplexity="17.5")),
    ("nested", None),
])
def test_sweep_files_with_bad_numbers_give_a_message_and_no_success_banner(tmp_path, case, edit):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page("pages/quality_page.py").run()
    data = _sweep_file(tmp_path, edit) if case != "nested" else DEEP_JSON["list x3000"].encode()
    at.file_uploader(key="q_file").set_value(("sweep.json", data, "application/json")).run()
    assert not at.exception, at.exception
    assert any("must be a finite number" in e or "not a JSON run record" in e for e in _sidebar_errors(at)), case
    assert not at.success


# --- text: bounded reading and tokenizing; a tokenizer that panics ----------------------------------
def test_eval_reads_and_tokenizes_only_what_max_tokens_needs(tmp_path, sandbox, capsys, bundled_lm_path, bundled_lm):
    from quantlab.evaluation.scoring import encode_text
    from quantlab.texts.sources import MAX_TEXT_BYTES, load_text

    big = tmp_path / "one-character.txt"
    big.write_bytes(b"a" * (MAX_TEXT_BYTES + 2**20))
    assert_refused(["eval", str(bundled_lm_path), "--text", str(big)], "evaluate a part of it", capsys)
    assert len(load_text(str(big), max_chars=10_000)) == 10_000
    seen = []

    def spy(text, **kwargs):
        seen.append(len(text))
        return bundled_lm.tokenizer(text, **kwargs)

    spy.is_fast = True
    stream = encode_text(spy, load_text(str(big), max_chars=256 * 64), max_tokens=256)
    assert stream.ids.numel() == 256 and max(seen) <= 256 * 64
    code, out, err = cli(["eval", str(bundled_lm_path), "--text", str(big), "--max-tokens", "256", "--ctx", "64",
                          "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["tokens"] <= 256


def test_a_tokenizer_that_panics_is_one_line(tmp_path, tiny_model_dirs):
    model = _copy_model(tiny_model_dirs["llama"], tmp_path / "model")
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    # Catastrophic backtracking: the regex engine gives up, and the Rust library panics.
    tokenizer["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(\\w+\\s?)*$"}, "behavior": "Isolated",
                                  "invert": False}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "text.txt").write_text("a" * 5000 + "!")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RUST_BACKTRACE", None)
    result = subprocess.run([sys.executable, "-m", "quantlab", "eval", str(model), "--text", str(tmp_path / "text.txt")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "tokenizer failed" in result.stderr


# --- hypothesis: JSON depth and kind, any unicode name, any file kind -----------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402  (kept with the tests that use it)
from hypothesis import strategies as hst  # noqa: E402

from quantlab.errors import QuantLabError  # noqa: E402
from quantlab.models.weightfiles import list_files, read_header, weight_files  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(depth=hst.integers(1, 60_000), kind=hst.sampled_from(["list", "object"]),
       where=hst.sampled_from(["header", "index"]))
def test_fuzz_json_depth_is_a_quantlab_error_or_a_listing(tmp_path_factory, depth, kind, where):
    from bad_input_corpus import deep_json

    folder = tmp_path_factory.mktemp("depth")
    text = deep_json(depth, kind)
    if where == "header":
        (folder / "f.safetensors").write_bytes(raw_safetensors(text))
        target = folder / "f.safetensors"
    else:
        (folder / "m.safetensors.index.json").write_text('{"weight_map": ' + text + "}")
        target = folder / "m.safetensors.index.json"
    try:
        list_files(weight_files(target))
    except QuantLabError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(name=hst.text(min_size=1, max_size=40))
def test_fuzz_any_unicode_name_is_listed_on_one_printable_line(tmp_path_factory, name):
    from quantlab.models.paths import printable

    path = tmp_path_factory.mktemp("names") / "n.safetensors"
    path.write_bytes(named_tensor(name))
    (info,) = read_header(path)
    assert info.name == name
    shown = printable(info.name)
    assert shown.isprintable() and len(shown.splitlines()) == 1
    shown.encode("utf-8")  # no lone surrogate left: a terminal or a web page can take it


@FUZZ
@given(kind=hst.sampled_from(SPECIAL_KINDS), as_index=hst.booleans())
def test_fuzz_special_files_are_refused_without_opening_them(tmp_path_factory, kind, as_index):
    folder = tmp_path_factory.mktemp("kinds")
    name = "model.safetensors.index.json" if as_index else "model.safetensors"
    make_special(folder / name, kind)
    for target in (folder, folder / name):
        with pytest.raises(QuantLabError):
            list_files(weight_files(target))
