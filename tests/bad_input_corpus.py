"""The bad-input corpus of issue 7, generated: files and values a user could hand QuantLab.

Used by tests/test_bad_input.py (CLI and app) and tests/test_fuzz.py (as seeds). Every file is real:
written by safetensors, torch.save or Pillow, then corrupted, or filled with values that cannot be
quantized. ``BAD_SAFETENSORS`` and ``NOT_MATRICES`` pair each case with what its message must say.
"""

from __future__ import annotations

import io
import json
import math
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
