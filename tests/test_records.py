"""Run records: what a sweep or quantize run wrote, reopened exactly; damaged files named, never a traceback."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from quantlab import __version__
from quantlab.recipe import CalibConfig, parse_config_name
from quantlab.errors import DataError
from quantlab.models.loading import load_model
from quantlab.runs.pipeline import quantize_model
from quantlab.runs.records import (
    RECORD_FORMAT, DataSource, ModelIdentity, build_record, identify_model, read_record, record_from_dict,
    write_record,
)

CALIB = CalibConfig(n_samples=2, seq_len=32, seed=7)


@pytest.fixture(scope="module")
def runs(bundled_lm):
    """Two real runs on the bundled LM: full precision and GPTQ INT4 g64, evaluated on 512 tokens."""
    return [quantize_model(bundled_lm, parse_config_name(name, calib=CALIB), max_eval_tokens=512)[1]
            for name in ("fp", "gptq-int4-g64")]


def test_a_record_reopens_exactly_and_describes_itself(runs, bundled_lm, bundled_lm_path, tmp_path):
    path = tmp_path / "records" / "sweep.json"
    written = write_record(path, runs, bundled_lm, kind="sweep")
    record = read_record(path)
    assert record.to_dict() == written.to_dict()
    assert [r.to_dict() for r in record.runs] == [r.to_dict() for r in runs]
    assert record.quantlab_version == __version__ and record.kind == "sweep" and record.created
    expected = hashlib.sha256((bundled_lm_path / "model.safetensors").read_bytes()).hexdigest()
    assert record.model.files == {"model.safetensors": expected}
    assert record.model.name == bundled_lm.name and len(record.model.sha256) == 64
    assert record.seed == 7 and record.calibration == DataSource("train", 2, 32, 64)
    assert record.evaluation.name == "heldout" and record.evaluation.n_tokens == runs[1].quality["tokens"]
    assert record.device == "cpu"
    assert record.timings["runs"]["gptq-int4-g64"] == runs[1].seconds
    assert record.run("gptq-int4-g64").layers == runs[1].layers
    assert [p.name for p in path.parent.iterdir()] == ["sweep.json"]  # no temporary file left behind
    document = json.loads(path.read_text())
    assert (document["format"], document["version"]) == (RECORD_FORMAT, 1)


def test_the_bundled_model_is_recorded_by_name_not_by_this_machines_path():
    identity = identify_model(load_model("pystdlib-llama-4m"))
    assert identity.source == identity.name == "pystdlib-llama-4m" and len(identity.sha256) == 64


def test_the_weights_hash_tells_retrained_models_apart(bundled_lm_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundled_lm_path, copy)
    same = identify_model(load_model(copy))
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    changed = identify_model(load_model(copy))
    assert same.sha256 != changed.sha256 and same.n_params == changed.n_params


def test_a_bare_list_of_run_results_opens_with_unknowns(runs, tmp_path):
    path = tmp_path / "bare.json"
    path.write_text(json.dumps([r.to_dict() for r in runs]))
    record = read_record(path)
    assert [r.config.name for r in record.runs] == ["fp", "gptq-int4-g64"]
    assert record.model.name == "unknown" and record.device == "unknown"


def test_unknown_run_name_is_a_data_error(runs):
    record = build_record(runs, ModelIdentity("m", "m"), device="cpu")
    with pytest.raises(DataError, match="no run named 'awq'"):
        record.run("awq")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: "not json {", "is not a JSON run record"),
    (lambda d: json.dumps({"hello": 1}), "not a QuantLab run record"),
    (lambda d: json.dumps(d | {"version": 99}), "upgrade QuantLab"),
    (lambda d: json.dumps(d | {"model": "m"}), "field 'model' must be a dict"),
    (lambda d: json.dumps(d | {"model": d["model"] | {"colour": "red"}}), "wrong shape"),
    (lambda d: json.dumps(d | {"runs": [{"name": "x"}]}), "run 0 lacks the field 'config'"),
    (lambda d: json.dumps(d | {"runs": [d["runs"][0] | {"config": {"method": "magic"}}]}),
     "run 0 cannot be read .*unknown method"),
])
def test_damaged_records_are_refused_with_a_clear_message(runs, tmp_path, mutate, message):
    good = build_record(runs[:1], ModelIdentity("m", "m"), device="cpu").to_dict()
    path = tmp_path / "damaged.json"
    path.write_text(mutate(good))
    with pytest.raises(DataError, match=message):
        read_record(path)


def test_missing_file_and_bad_kind(tmp_path):
    with pytest.raises(DataError, match="no such record file"):
        read_record(tmp_path / "nope.json")
    with pytest.raises(DataError, match="record kind"):
        record_from_dict({"format": RECORD_FORMAT, "version": 1, "kind": "party", "model": {"name": "m", "source": "m"},
                          "runs": []})


def test_sweep_and_quantize_commands_write_records_the_reader_opens(bundled_lm_path, tmp_path, capsys):
    from quantlab.cli import main

    common = [str(bundled_lm_path), "--calib-samples", "2", "--calib-len", "32", "--max-eval-tokens", "256",
              "--device", "cpu"]
    assert main(["sweep", *common, "--configs", "fp,int8", "--out", str(tmp_path / "sweep.json")]) == 0
    quantize = ["quantize", *common, "--format", "int4", "--group-size", "64", "--record", str(tmp_path / "q.json")]
    assert main(quantize) == 0
    capsys.readouterr()
    sweep, single = read_record(tmp_path / "sweep.json"), read_record(tmp_path / "q.json")
    assert [r.config.name for r in sweep.runs] == ["fp", "rtn-int8-per-channel"] and sweep.kind == "sweep"
    assert single.kind == "quantize" and single.runs[0].config.weight_format.name == "int4-g64"
    assert sweep.model.sha256 == single.model.sha256 and sweep.evaluation.n_tokens <= 256
