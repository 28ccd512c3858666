"""The bad-input corpus of issue 7, generated: files and values a user could hand QuantLab.

Used by tests/test_bad_input.py (CLI and app) and tests/test_fuzz.py (as seeds). Every file is real:
written by safetensors, torch.save or Pillow, then corrupted, or filled with values that cannot be
quantized. ``BAD_SAFETENSORS`` and ``NOT_MATRICES`` pair each case with what its message must say.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import tempfile
import zipfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

LAYER = "model.layers.0.mlp.down_proj.weight"  # the tensor each value case poisons
VALUE_CASES = ("nan", "inf", "huge", "denormal", "zero rows")


def safetensors_bytes(header, data: bytes, header_len: int | None = None) -> bytes:
    """A safetensors file from its parts; ``header_len`` may lie about the header's length."""
    raw = json.dumps(header).encode()
    return (len(raw) if header_len is None else header_len).to_bytes(8, "little") + raw + data


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def saved_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    path = Path(tempfile.mkdtemp()) / "t.safetensors"
    save_file(tensors, path)
    data = path.read_bytes()
    path.unlink()
    path.parent.rmdir()
    return data


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    return buffer.getvalue()


GOOD = saved_bytes({"w": torch.randn(8, 8)})
# name -> (file bytes, what the message must say). Every one is a .safetensors file that cannot be read.
BAD_SAFETENSORS = {
    "empty file": (b"", "0 bytes"),
    "truncated file": (GOOD[: len(GOOD) // 2], "truncated"),
    "header longer than the file": (safetensors_bytes({"w": _entry("F32", [2, 2], 0, 16)}, bytes(16), 10_000),
                                    "header claims 10000 bytes"),
    "header not JSON": ((5).to_bytes(8, "little") + b"{oops" + bytes(16), "not JSON"),
    "header a JSON list": (safetensors_bytes([1, 2], bytes(16)), "not a JSON object"),
    "offsets past the end": (safetensors_bytes({"w": _entry("F32", [2, 2], 8, 24)}, bytes(16)), "spans bytes 8..24"),
    "overlapping offsets": (safetensors_bytes({"w": _entry("F32", [2, 2], 0, 16), "b": _entry("F32", [2], 8, 16)},
                                              bytes(16)), "overlap"),
    "shape disagrees with the bytes": (safetensors_bytes({"w": _entry("F32", [3, 2], 0, 16)}, bytes(16)),
                                       "needs 24 bytes but spans 16"),
    "header claims terabytes": (safetensors_bytes({"w": _entry("F32", [2**20, 2**20], 0, 2**42)}, bytes(16)),
                                "4398046511104"),
    "header length of a terabyte": ((2**40).to_bytes(8, "little") + b"{}", "1099511627776"),
    "complex dtype": (saved_bytes({"w": torch.zeros(4, 4, dtype=torch.complex64)}), "'C64'"),
    "a PNG image": (_png(), "not a valid safetensors file"),
    "a zip archive": (_zip(), "not a valid safetensors file"),
}
# Valid files without a float matrix: listed by `inspect`, refused with the reason where a matrix is expected.
NOT_MATRICES = {
    "int32": (torch.ones(8, 8, dtype=torch.int32), "int32 is not a float dtype"),
    "bool": (torch.ones(8, 8, dtype=torch.bool), "bool is not a float dtype"),
    "float8": (torch.ones(8, 8).to(torch.float8_e4m3fn), "float8_e4m3fn is not a float dtype"),
    "zero-size": (torch.ones(0, 8), "empty"),
    "1-D": (torch.ones(8), "1-D, not a matrix"),
    "3-D": (torch.ones(2, 8, 8), "3-D, not a matrix"),
}


def poisoned(weight: torch.Tensor, case: str) -> torch.Tensor:
    """``weight`` with the value case applied: one NaN/Inf/1e30 entry, all denormal, or zero rows and groups."""
    weight = weight.clone()
    if case in ("nan", "inf", "huge"):
        weight[3, 5] = {"nan": math.nan, "inf": math.inf, "huge": 1e30}[case]
    elif case == "denormal":
        weight[:] = 1e-40  # below fp32's smallest normal number (1.2e-38)
    elif case == "zero rows":
        weight[2] = 0.0
        weight[5, :32] = 0.0  # one whole group of 32
    return weight


class RunsCode:
    """Unpickling this calls Path.touch: the marker file tells whether the pickle's code ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def write_corpus(root: Path, tiny_llama: Path) -> Path:
    """Every file of the corpus into ``root``; ``tiny_llama`` is a saved model folder to poison."""
    for name, (data, _) in BAD_SAFETENSORS.items():
        (root / f"{name}.safetensors").write_bytes(data)
    for name, (tensor, _) in NOT_MATRICES.items():
        save_file({LAYER: tensor}, root / f"{name}.safetensors")
    for case in VALUE_CASES:
        save_file({LAYER: poisoned(torch.randn(16, 64), case)}, root / f"values {case}.safetensors")
        folder = root / f"model {case}"
        folder.mkdir()
        for item in tiny_llama.iterdir():
            (folder / item.name).write_bytes(item.read_bytes())
        state = load_file(folder / "model.safetensors")
        state[LAYER] = poisoned(state[LAYER], case)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    torch.save({"w": torch.zeros(2, 2), "evil": RunsCode(root / "code-ran")}, root / "runs code.bin")
    (root / "image.bin").write_bytes(_png())
    (root / "archive.pt").write_bytes(_zip())
    (root / "empty.txt").write_text("")
    (root / "three.txt").write_text("abc")
    return root


# --- issue 13: hostile inputs, each kind generated in variants ---------------------------------------
# Nesting past Python's recursion limit (1,000) and far past it; list and object nesting.
DEPTHS = (3_000, 200_000)


def deep_json(depth: int, kind: str) -> str:
    """``[[[...]]]`` or ``{"a": {"a": ...}}`` nested ``depth`` levels."""
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


DEEP_JSON = {f"{kind} x{depth}": deep_json(depth, kind) for depth in DEPTHS for kind in ("list", "object")}


def raw_safetensors(header_text: str, data: bytes = b"") -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(8, "little") + raw + data


# Tensor names a terminal or a web page must not receive raw: escapes, controls, lone surrogates.
HOSTILE_NAMES = {
    "lone high surrogate": "w\ud800", "lone low surrogate": "x\udfffy", "clear screen": "\x1b[2J\x1b[31mred",
    "bell": "a\x07b", "newline": "layer\nquantlab: fake line", "carriage return": "a\rb", "NUL": "a\x00b",
    "right-to-left override": "a\u202eb",
}


def named_tensor(name: str) -> bytes:
    """A valid one-tensor safetensors file whose tensor is called ``name`` (JSON escapes keep surrogates)."""
    return raw_safetensors(json.dumps({name: _entry("F32", [1, 1], 0, 4)}), bytes(4))


def many_tensors(count: int) -> bytes:
    """A valid file of ``count`` one-value tensors: tiny on disk, a long walk for every page."""
    header = {f"t{i}": _entry("F32", [1], 4 * i, 4 * i + 4) for i in range(count)}
    return raw_safetensors(json.dumps(header), bytes(4 * count))


# weight_map values that are not shard names next to the index: (value, what the message says).
BAD_WEIGHT_MAP = {
    "number": (5, "must be shard file names"), "null": (None, "must be shard file names"),
    "true": (True, "must be shard file names"), "list": ([1], "must be shard file names"),
    "object": ({"a": 1}, "must be shard file names"), "empty": ("", "must be shard file names"),
    "parent": ("../outside.safetensors", "not a file in the index's own folder"),
    "absolute": ("/etc/passwd", "not a file in the index's own folder"),
    "subfolder": ("sub/inner.safetensors", "not a file in the index's own folder"),
    "dot-dot": ("..", "not a file in the index's own folder"),
    "missing shard": ("model-00002.safetensors", "lists shards that are missing"),
}

# config.json edits: a field -> a value of the wrong type or size (None deletes nothing: it is JSON null).
BAD_CONFIG_FIELDS = {
    "architectures 5": ("architectures", 5), "architectures [null]": ("architectures", [None]),
    "architectures string": ("architectures", "LlamaForCausalLM"),
    "positions 'big'": ("max_position_embeddings", "big"), "positions -1": ("max_position_embeddings", -1),
    "positions 1.5": ("max_position_embeddings", 1.5), "positions true": ("max_position_embeddings", True),
    "heads 0": ("num_attention_heads", 0), "heads 'x'": ("num_attention_heads", "x"),
    "layers 10^9": ("num_hidden_layers", 10**9), "layers more than the weights": ("num_hidden_layers", 64),
    "hidden 10^9": ("hidden_size", 10**9), "hidden not the weights'": ("hidden_size", 48),
    "vocab -1": ("vocab_size", -1), "dtype float128": ("torch_dtype", "float128"), "dtype 5": ("torch_dtype", 5),
    "model_type 5": ("model_type", 5),
}
# Whole config.json documents that are not a config object.
BAD_CONFIG_DOCUMENTS = {"null": "null", "a list": "[]", "a string": '"config"', "not JSON": "{oops",
                        **{f"nested {name}": text for name, text in DEEP_JSON.items()}}


def pickle_streams() -> dict[str, bytes]:
    """Malformed legacy (non-zip) torch pickles: a real one truncated at several points, and with bytes flipped."""
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    streams = {f"truncated at {cut}": data[:cut] for cut in (2, 3, 12, 40, len(data) // 2, len(data) - 3)}
    for offset in (2, 9, 20, 33):
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        streams[f"byte {offset} flipped"] = bytes(flipped)
    streams["protocol byte, then garbage"] = b"\x80\x02" + bytes(range(256))
    return streams


def make_special(path: Path, kind: str) -> Path:
    """``path`` made into a FIFO, a folder, a symlink loop or a dangling symlink (what ``kind`` says)."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "symlink loop":
        os.symlink(path.name + ".other", path)
        os.symlink(path.name, path.with_name(path.name + ".other"))
    elif kind == "dangling symlink":
        os.symlink(path.name + ".gone", path)
    else:
        raise ValueError(kind)
    return path


SPECIAL_KINDS = ("fifo", "folder", "symlink loop", "dangling symlink")
