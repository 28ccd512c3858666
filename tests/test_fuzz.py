"""Fuzzing (hypothesis): whatever bytes or text arrive, only a QuantLabError may come out.

- safetensors inspection: real small files with random bytes flipped, inserted, deleted or cut, and
  headers re-written with random dtypes, shapes, offsets, missing keys and metadata. Whenever a file
  is accepted, the listing read from its header must agree with the tensors actually loaded.
- format and configuration names: ``QuantFormat.parse`` and ``parse_config_name`` on random text and
  on near-valid names; every name they accept parses back to the same object.
- CLI arguments: random ``size`` command lines run end to end (exit 0 with JSON, or 2 with one
  line), and random ``quantize`` / ``eval`` options turned into configurations for a tiny model.

``FUZZERS`` maps each fuzzer to its strategy, its check and its number of examples in CI (a few
thousand in all); bench/bench_fuzz.py runs the same fuzzers with many more.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from bad_input_corpus import saved_bytes
from conftest import build_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantlab.recipe import ALIASES, parse_config_name
from quantlab.analysis.tensors import file_matrices
from quantlab.cli import build_parser, main
from quantlab.cli.quantize_cmd import config_from_args
from quantlab.errors import QuantLabError
from quantlab.evaluation import EvalConfig
from quantlab.numerics.formats import Granularity, QuantFormat
from quantlab.models.loading import inspect_tensors, load_tensors, model_size
from quantlab.runs.pipeline import check_config_fits
from quantlab.numerics.primitives import error_report
from quantlab.models.weightfiles import SAFETENSORS_DTYPES

RNG = torch.Generator().manual_seed(0)
BASE_FILES = (  # real files written by safetensors: several dtypes, a matrix, an empty and a bool tensor
    saved_bytes({"a": torch.randn(4, 8, generator=RNG), "b": torch.randn(8, generator=RNG).half(),
                 "c": torch.zeros(2, 2, 2, dtype=torch.int8), "d": torch.randn(3, 16, generator=RNG).bfloat16()}),
    saved_bytes({"model.layers.0.mlp.down_proj.weight": torch.randn(16, 32, generator=RNG)}),
    saved_bytes({"x": torch.ones(0, 4), "flag": torch.ones(3, dtype=torch.bool),
                 "w": torch.randn(2, 64, generator=RNG)}),
)
FORMAT = QuantFormat.parse("int4-g16")
ODD_VALUES = st.one_of(  # JSON values of every type, where the header expects something else
    st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6), st.none(), st.booleans(),
    st.lists(st.integers(-5, 2**40), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _split(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


# --- safetensors -------------------------------------------------------------------------------
@st.composite
def mutated_bytes(draw) -> bytes:
    """A real file with 1-4 byte-level edits, mostly inside the 8-byte length and the header."""
    data = bytearray(draw(st.sampled_from(BASE_FILES)))
    header_end = 8 + int.from_bytes(data[:8], "little")
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, min(len(data), header_end + 16) - 1)))
        edit = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate")))
        if edit == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[draw(st.integers(0, len(data))):]
    return bytes(data)


@st.composite
def mutated_headers(draw) -> bytes:
    """A real file whose JSON header is rewritten: odd dtypes, shapes, offsets, keys; a lying length."""
    header, data = _split(draw(st.sampled_from(BASE_FILES)))
    names = [name for name in header if name != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        entry = header[name] if isinstance(header[name], dict) else {}
        edit = draw(st.sampled_from(("dtype", "shape", "offsets", "drop", "entry", "metadata", "swap")))
        if edit == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from([*SAFETENSORS_DTYPES, "C64", "F4", "Q4_K"]), ODD_VALUES))
        elif edit == "shape":
            entry["shape"] = draw(st.one_of(st.lists(st.integers(-2, 2**33), max_size=5), ODD_VALUES))
        elif edit == "offsets":
            entry["data_offsets"] = draw(st.one_of(st.lists(st.integers(-4, len(data) + 8), max_size=3), ODD_VALUES))
        elif edit == "drop":
            entry.pop(draw(st.sampled_from(("dtype", "shape", "data_offsets"))), None)
        elif edit == "entry":
            header[name] = draw(ODD_VALUES)
        elif edit == "metadata":
            header["__metadata__"] = draw(ODD_VALUES)
        else:
            other = draw(st.sampled_from(names))
            header[name], header[other] = header[other], header[name]
    raw = json.dumps(header).encode() + draw(st.sampled_from((b"", b" ", b"  ")))
    length = max(0, len(raw) + draw(st.sampled_from((0, 0, 0, -1, 1, -8, 8, 2**40))))
    data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    return length.to_bytes(8, "little") + raw + data


def check_safetensors(data: bytes) -> None:
    """Listing, loading, sizing and a look at the matrices: results, or a QuantLabError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.safetensors"
        path.write_bytes(data)
        try:
            listing = inspect_tensors(path)
        except QuantLabError:
            return
        try:
            tensors = load_tensors(path)
        except QuantLabError:
            return
        loaded = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()}
        assert loaded == {t.name: (t.shape, t.dtype) for t in listing.tensors}, "header and data disagree"
        with contextlib.suppress(QuantLabError):
            model_size(listing, FORMAT)
        with contextlib.suppress(QuantLabError):
            error_report(file_matrices(tensors)[0].weight, FORMAT)


# --- names ----------------------------------------------------------------------------------------
NEAR_FORMATS = st.from_regex(r"(INT|int|Int)[0-9]{0,3}(-g[0-9]{0,5}|-per-channel|-per-tensor|-channel|-tensor|-g-1)?"
                             r"(-asym)?|(fp8-e4m3|fp8-e5m2|nf4|fp8|nf3)(-g[0-9]{1,4}|-per-tensor)?(-asym)?",
                             fullmatch=True)
FORMAT_TEXT = st.one_of(st.text(max_size=24), NEAR_FORMATS, st.just("int" + "9" * 5000))
CONFIG_TEXT = st.one_of(
    st.text(max_size=32), st.sampled_from(sorted(ALIASES)),
    st.builds(lambda method, fmt, act, kv: method + fmt + act + kv,
              st.sampled_from(("", "rtn-", "gptq-", "awq-", "sq-", "smoothquant-", "fp-", "fp", "bogus-")),
              st.one_of(NEAR_FORMATS, st.just("")),
              st.sampled_from(("", "-a8", "-a4", "-a1", "-a9", "-a8-static", "-a16")),
              st.sampled_from(("", "-kv-int8", "-kv-int4", "-kv-fp8", "-kv-int8-per-head", "kv-int2"))),
)


def check_format_text(text: str) -> None:
    try:
        fmt = QuantFormat.parse(text)
    except QuantLabError:
        return
    assert QuantFormat.parse(fmt.name) == fmt
    for in_features in (1, 48, 64, 4096):
        with contextlib.suppress(QuantLabError):
            assert fmt.bits_per_weight(in_features) >= fmt.n_bits


def check_config_text(text: str) -> None:
    try:
        config = parse_config_name(text)
    except QuantLabError:
        return
    assert parse_config_name(config.name) == config
    assert config.name == config.canonical_name


def check_group_size(group_size: int) -> None:
    with contextlib.suppress(QuantLabError):
        granularity = Granularity.from_group_size(group_size)
        assert (granularity.kind == "group") == (group_size > 0)


# --- command lines --------------------------------------------------------------------------------
SIZE_FILE = saved_bytes({"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=RNG),
                         "model.layers.0.mlp.down_proj.weight": torch.randn(64, 128, generator=RNG),
                         "model.norm.weight": torch.ones(64)})
NUMBERS = st.one_of(st.integers(-3, 300), st.sampled_from(("x", "1.5", "", "9" * 5000, "-0", "0x10")))


@st.composite
def size_argv(draw) -> list[str]:
    argv = ["size", "{file}"]
    if draw(st.booleans()):
        argv += ["--format", draw(st.one_of(st.sampled_from(("int2", "int4", "int8", "nf4", "fp8-e4m3", "fp8-e5m2")),
                                             st.text(max_size=6)))]
    if draw(st.booleans()):
        argv += ["--group-size", str(draw(NUMBERS))]
    if draw(st.booleans()):
        argv += ["--scale-dtype", draw(st.sampled_from(("fp16", "bf16", "fp32", "fp8")))]
    if draw(st.booleans()):
        argv.append("--asym")
    if draw(st.booleans()):
        argv += ["--keep", *draw(st.lists(st.sampled_from(("down", "q", "norm", "layers", "zzz")), min_size=1,
                                          max_size=3))]
    return argv + ["--json"]


def check_size_argv(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.safetensors"
        path.write_bytes(SIZE_FILE)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(path) if arg == "{file}" else arg for arg in argv])
        except SystemExit as exc:  # argparse: bad choices and numbers
            code = exc.code
    assert code in (0, 2), (argv, code, err.getvalue())
    if code == 2:
        assert len(err.getvalue().strip().splitlines()) == 1 and "Traceback" not in err.getvalue()
    else:
        assert json.loads(out.getvalue())["bits_per_weight"] > 0


TINY = build_tiny("llama")


@st.composite
def quantize_options(draw) -> list[str]:
    """Options of ``quantize`` (parsed and turned into a configuration, not run)."""
    options = {
        "--method": st.sampled_from(("rtn", "gptq", "awq", "smoothquant")),
        "--format": st.sampled_from(("int2", "int3", "int4", "int8", "nf4", "fp8-e4m3")),
        "--group-size": NUMBERS, "--scale-dtype": st.sampled_from(("fp16", "bf16", "fp32")),
        "--calib-samples": NUMBERS, "--calib-len": st.one_of(NUMBERS, st.integers(200, 5000)),
        "--act": st.sampled_from(("int8", "int4")), "--act-mode": st.sampled_from(("dynamic", "static")),
        "--act-observer": st.sampled_from(("minmax", "percentile", "mse")),
        "--kv": st.sampled_from(("int8", "int4", "fp8-e4m3")), "--damp": st.floats(-1, 2).map(str),
        "--alpha": st.floats(-1, 2).map(str),
    }
    argv = ["quantize", "unused-source"]
    for flag, values in options.items():
        if draw(st.booleans()):
            argv += [flag, str(draw(values))]
    return argv + [flag for flag in ("--asym", "--act-order", "--static-groups") if draw(st.booleans())]


def check_quantize_options(argv: list[str]) -> None:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = build_parser().parse_args(argv)
        check_config_fits(TINY, config_from_args(args, TINY))
    except SystemExit as exc:
        assert exc.code == 2
    except QuantLabError:
        pass


EVAL_NUMBERS = st.one_of(st.none(), st.integers(-2, 600))


def check_eval_config(values: tuple) -> None:
    ctx, stride, max_tokens, batch_size = values
    try:
        config = EvalConfig(ctx=ctx, stride=stride, max_tokens=max_tokens, batch_size=batch_size).resolved(TINY)
    except QuantLabError:
        return
    # A window's last token is only a target, so the model sees ctx - 1 positions at most.
    assert 2 <= config.ctx <= TINY.config.max_position_embeddings + 1 and 1 <= config.stride <= config.ctx


# --- the fuzzers ------------------------------------------------------------------------------------
FUZZERS: dict[str, tuple[st.SearchStrategy, Callable, int]] = {  # name -> (cases, check, examples in CI)
    "safetensors bytes": (mutated_bytes(), check_safetensors, 600),
    "safetensors headers": (mutated_headers(), check_safetensors, 700),
    "format names": (FORMAT_TEXT, check_format_text, 600),
    "configuration names": (CONFIG_TEXT, check_config_text, 600),
    "group sizes": (st.integers(-2**40, 2**40), check_group_size, 100),
    "size command lines": (size_argv(), check_size_argv, 150),
    "quantize options": (quantize_options(), check_quantize_options, 250),
    "eval settings": (st.tuples(EVAL_NUMBERS, EVAL_NUMBERS, EVAL_NUMBERS, EVAL_NUMBERS), check_eval_config, 200),
}


CASES_RUN: Counter = Counter()  # fuzzer name -> cases checked (bench/bench_fuzz.py reports them)


def fuzz(name: str, examples: int | None = None) -> Callable[[], None]:
    """A hypothesis test running fuzzer ``name`` (``examples`` overrides its CI count)."""
    strategy, check, default = FUZZERS[name]

    @settings(max_examples=examples or default, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(strategy)
    def run(case) -> None:
        CASES_RUN[name] += 1
        check(case)

    return run


@pytest.mark.parametrize("name", list(FUZZERS))
def test_fuzz(name):
    fuzz(name)()
