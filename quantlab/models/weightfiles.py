"""Weights files, read safely: safetensors headers checked before use, pickles only as plain tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header that maps each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data that
follows the header), then the raw bytes. ``read_header`` checks every promise the header makes
(length, JSON, known dtype, offsets inside the file, no overlap, ``numel * itemsize == end - begin``)
so that a truncated download or a corrupt file is reported by name, without reading the data.

``.bin`` / ``.pt`` files are pickles; they are only ever opened with ``torch.load(weights_only=True)``
and must hold a flat ``{name: tensor}`` dict, so a file that would run code is refused.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import pickle
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from quantlab.errors import ModelLoadError
from quantlab.models.paths import file_kind, printable, require_regular_file

log = logging.getLogger(__name__)

# safetensors dtype code -> torch dtype. Anything else (e.g. F4, custom codes) is refused by name.
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit: a larger "header" is garbage
# The largest real checkpoints hold a few thousand tensors per file (DeepSeek-V3: ~91k over 163 shards).
# Far more is a file built to make every page walk millions of entries; refused before any work.
MAX_TENSORS_PER_FILE = 65_536
MAX_INDEX_BYTES = 64 * 2**20  # a shard index lists names only: a 100k-tensor model's is a few MiB


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: one spelling for every source (files, loaded models)."""
    return str(dtype).removeprefix("torch.")


FLOAT_DTYPE_NAMES = tuple(dtype_name(d) for d in FLOAT_DTYPES)


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: what ``inspect`` lists."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch spelling without the prefix, e.g. "bfloat16"
    bytes: int  # bytes it occupies in the file (or in memory for a loaded model)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "bytes": self.bytes}


@dataclass(frozen=True)
class TensorListing:
    """Every tensor of a model or weights file set, with totals."""

    tensors: tuple[TensorInfo, ...]
    total_params: int
    total_bytes: int

    @classmethod
    def of(cls, tensors) -> TensorListing:
        tensors = tuple(tensors)
        return cls(tensors, sum(t.numel for t in tensors), sum(t.bytes for t in tensors))

    def to_dict(self) -> dict:
        """The ``quantlab inspect --json`` document."""
        return {
            "tensors": [t.to_dict() for t in self.tensors],
            "total_params": self.total_params,
            "total_bytes": self.total_bytes,
        }


def _corrupt(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{printable(path.name)} is not a valid safetensors file: {what}; download or save it again")


def parse_json(raw: bytes | str):
    """JSON from untrusted bytes: NaN / Infinity refused; None when it is not JSON (or nested past recursion).

    Python's parser recurses once per nesting level, so ``[[[[...]]]]`` 100,000 deep is a RecursionError,
    not a JSONDecodeError: both mean the same to a user.
    """
    def no_constants(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return _NOT_JSON


_NOT_JSON = object()  # parse_json's "not JSON" (None is the JSON value null)


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors a safetensors file declares, after checking the header against the file's size."""
    path = Path(path)
    size = require_regular_file(path)  # a FIFO would block the read below forever
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"it has {size} bytes, fewer than the 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise _corrupt(path, f"the header claims {header_len} bytes but only {size - 8} follow (truncated?)")
        raw = handle.read(header_len)
    header = parse_json(raw)
    if header is _NOT_JSON:
        raise _corrupt(path, "its header is not JSON")
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    if len(header) > MAX_TENSORS_PER_FILE + 1:
        raise ModelLoadError(f"{printable(path.name)} declares {len(header) - 1:,} tensors, more than the "
                             f"{MAX_TENSORS_PER_FILE:,} QuantLab reads from one file; split it into shards")
    data_len = size - 8 - header_len
    entries = [(name, entry) for name, entry in header.items() if name != "__metadata__"]
    infos, spans = [], []
    for name, entry in entries:
        info, span = _check_entry(path, name, entry, data_len)
        infos.append(info)
        spans.append((span, name))
    _check_no_overlap(path, spans)
    return infos


def _check_entry(path: Path, name: str, entry, data_len: int) -> tuple[TensorInfo, tuple[int, int]]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _corrupt(path, f"tensor {printable(repr(name))} lacks dtype, shape or data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:  # a JSON list or object is unhashable
        raise ModelLoadError(
            f"{printable(path.name)}: tensor {printable(repr(name))} has dtype {printable(repr(code))[:40]}, "
            "which QuantLab cannot read; "
            f"supported: {', '.join(SAFETENSORS_DTYPES)}"
        )
    # type(...) is int: JSON true/false arrive as Python bools, which isinstance(..., int) would accept.
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise _corrupt(path, f"tensor {printable(repr(name))} has an invalid shape {printable(repr(shape))[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _corrupt(path, f"tensor {printable(repr(name))} has invalid data_offsets {printable(repr(offsets))[:80]}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _corrupt(path, f"tensor {name!r} spans bytes {begin}..{end} of a {data_len}-byte data section (truncated?)")
    dtype = SAFETENSORS_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise _corrupt(path, f"tensor {name!r} of shape {shape} {code} needs {expected} bytes but spans {end - begin}")
    return TensorInfo(name, tuple(shape), dtype_name(dtype), end - begin), (begin, end)


def _check_no_overlap(path: Path, spans: list[tuple[tuple[int, int], str]]) -> None:
    ordered = sorted(spans)
    for (first, first_name), (second, second_name) in zip(ordered, ordered[1:]):
        if second[0] < first[1]:
            raise _corrupt(path, f"tensors {first_name!r} and {second_name!r} overlap")


def weight_files(path: Path) -> list[Path]:
    """The weights files behind a path: one file, the shards of an index, or a folder's weights.

    A folder's safetensors win over its pickles (they hold the same weights, and are safe to read).
    """
    path = Path(path)
    kind = file_kind(path)
    if kind == "folder":
        return _folder_files(path)
    if kind == "missing":
        raise ModelLoadError(f"no such file or folder: {printable(str(path))}")
    if kind != "file":
        raise ModelLoadError(f"{printable(str(path))} is {kind}, not a weights file or folder")
    if path.name.endswith(".index.json"):
        return _index_shards(path)
    if path.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        return [path]
    raise ModelLoadError(
        f"{printable(path.name)}: not a weights file; give a .safetensors file, a *.safetensors.index.json, "
        "a .bin/.pt file, a model folder or a hub id"
    )


def _folder_files(folder: Path) -> list[Path]:
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.bin.index.json", "*.bin", "*.pt", "*.pth"):
        found = sorted(folder.glob(pattern))
        if found:
            return _index_shards(found[0]) if pattern.endswith(".index.json") else found
    raise ModelLoadError(f"{folder} holds no weights files (.safetensors, .bin, .pt); pick the model's folder")


def _index_shards(index: Path) -> list[Path]:
    """The shards an index names, each a regular file next to the index."""
    if require_regular_file(index) > MAX_INDEX_BYTES:
        raise ModelLoadError(f"{printable(index.name)} has more than {MAX_INDEX_BYTES // 2**20} MiB: not a shard index")
    document = parse_json(index.read_bytes())
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{printable(index.name)} is not a valid shard index (no weight_map); save it again")
    bad = [name for name in weight_map.values() if not (isinstance(name, str) and name)][:1]
    if bad:
        bad = bad[0]
        raise ModelLoadError(f"{printable(index.name)}: weight_map values must be shard file names, got "
                             f"{printable(repr(bad))[:60]}; save the index again")
    shards = [_shard_path(index, name) for name in sorted(set(weight_map.values()))]
    missing = [printable(s.name) for s in shards if file_kind(s) == "missing"]
    if missing:
        raise ModelLoadError(f"{printable(index.name)} lists shards that are missing: {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}; download them too")
    for shard in shards:
        require_regular_file(shard)
    return shards


def _shard_path(index: Path, name: str) -> Path:
    """``name`` as a file next to ``index``: ``../x``, ``sub/x`` and absolute names are refused.

    Checked on the name, not on the resolved path: the hub's cache links every shard to a blob in
    another folder, and such links are the hub's. Where a server confines paths, the model folder's
    own entries are checked against its roots (``paths.check_folder_entries``).
    """
    candidate = PurePath(name)
    if candidate.is_absolute() or len(candidate.parts) != 1 or name in (".", "..") or "\\" in name:
        raise ModelLoadError(f"{printable(index.name)} names the shard {printable(repr(name))[:80]}, which is not a "
                             "file in the index's own folder; shards must sit next to their index")
    return index.parent / name


def load_pickled(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin``/``.pt`` state dict, through ``torch.load(weights_only=True)`` only."""
    require_regular_file(path)
    with path.open("rb") as handle:
        head = handle.read(2)
    # torch.save writes a zip archive ("PK"); old torch versions a pickle stream (protocol byte 0x80).
    # Anything else (an image, a text file) would otherwise be reported as a refused pickle.
    if head != b"PK" and head[:1] != b"\x80":
        raise ModelLoadError(f"{printable(path.name)} is not a PyTorch weights file (it is neither a zip archive nor a pickle); "
                             "give .safetensors, .bin or .pt weights")
    try:
        with warnings.catch_warnings():  # torch's protocol warnings: the refusal below says it in one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))  # what the pickle asked to import, if torch says
        raise ModelLoadError(
            f"refused to load {printable(path.name)}: it holds Python objects or code, not just tensors"
            f"{f' (it imports {wanted[1]})' if wanted else ''}; convert it to safetensors from a trusted environment"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError,
            struct.error, RecursionError, MemoryError, OverflowError) as exc:
        # A malformed stream fails inside torch's weights-only unpickler with whatever it tripped on.
        detail = printable(str(exc).strip().splitlines()[0][:160]) if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{printable(path.name)} is not a readable PyTorch weights file ({detail}); "
                             "save it again") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelLoadError(f"refused {printable(path.name)}: it is not a flat {{name: tensor}} weights dict")
    return state


def list_files(paths: list[Path]) -> TensorListing:
    """Every tensor in ``paths``; safetensors are read from their headers alone."""
    infos = []
    for path in paths:
        if path.suffix in SAFETENSORS_SUFFIXES:
            infos += read_header(path)
        else:
            infos += [tensor_info(name, t) for name, t in load_pickled(path).items()]
    return TensorListing.of(sorted(infos, key=lambda info: natural_key(info.name)))


def natural_key(name: str) -> list:
    """Sort ``layers.2`` before ``layers.10``: numbers compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def load_files(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor in ``paths`` as CPU tensors; headers are checked before any data is read."""
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        if path.suffix in SAFETENSORS_SUFFIXES:
            read_header(path)
            try:
                tensors.update(load_file(path))
            except SafetensorError as exc:
                raise _corrupt(path, str(exc)) from None
        else:
            tensors.update(load_pickled(path))
    return tensors


def map_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of a memory map of it: nothing is read until used.

    The header is checked first (``read_header``). The map is private copy-on-write, so a tensor's
    pages are read from disk only when something touches them, and nothing is ever written back.
    """
    path = Path(path)
    read_header(path)
    with path.open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
        if path.stat().st_size == 0:
            return {}
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin = 8 + header_len + entry["data_offsets"][0]
        count = math.prod(shape)
        tensors[name] = (torch.frombuffer(mapped, dtype=dtype, count=count, offset=begin).reshape(shape)
                         if count else torch.empty(shape, dtype=dtype))
    return tensors


def map_files(paths: list[Path]) -> dict[str, torch.Tensor]:
    """``load_files`` without reading: safetensors memory-mapped (``map_file``), pickles loaded."""
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        tensors.update(map_file(path) if path.suffix in SAFETENSORS_SUFFIXES else load_pickled(path))
    return tensors


def local_path(text: str | Path) -> Path:
    """The one check of "may this local path be opened" for paths a user types (app path box, CLI).

    Today: the path must exist. Operator-configured allowed roots for a shared server belong here,
    so that every caller gets them at once.
    """
    path = Path(str(text).strip()).expanduser()
    if not str(text).strip() or not path.exists():
        raise ModelLoadError(f"no such file or folder: {text}; give a model folder, a .safetensors file or a "
                             "*.safetensors.index.json")
    return path


def map_tensors(source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local file, shard index or folder, memory-mapped: each is read when first used.

    What the app's weight pages take for a large checkpoint: listing it reads headers only, and
    a page that looks at one matrix reads that matrix's pages of the file, not the whole model.
    """
    return map_files(weight_files(local_path(source)))


def tensor_info(name: str, tensor: torch.Tensor) -> TensorInfo:
    return TensorInfo(name, tuple(tensor.shape), dtype_name(tensor.dtype), tensor.numel() * tensor.element_size())


def skip_reason(shape: tuple[int, ...], dtype: str) -> str | None:
    """Why a tensor of ``shape`` and ``dtype`` (``"float32"``...) is not a quantizable matrix, or None."""
    if len(shape) != 2:
        return f"{len(shape)}-D, not a matrix"
    if dtype not in FLOAT_DTYPE_NAMES:
        return f"{dtype} is not a float dtype (already quantized?)"
    if math.prod(shape) == 0:
        return "empty"
    return None


def _tensor_skip_reason(tensor: torch.Tensor) -> str | None:
    return skip_reason(tuple(tensor.shape), dtype_name(tensor.dtype))


def matrix_tensors(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The 2-D float tensors, in order: the ones a bare weights file offers for quantization."""
    return [(name, t) for name, t in tensors.items() if _tensor_skip_reason(t) is None]


def skipped_tensors(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """``(name, reason)`` for every tensor ``matrix_tensors`` leaves out."""
    return [(name, reason) for name, t in tensors.items() if (reason := _tensor_skip_reason(t)) is not None]


def describe_skipped(skipped: list[tuple[str, str]], limit: int = 4) -> str:
    """``a (3-D, not a matrix), b (int8 is not a float dtype ...) and 5 more``: one line for any count."""
    shown = ", ".join(f"{name} ({reason})" for name, reason in skipped[:limit])
    return shown + (f" and {len(skipped) - limit} more" if len(skipped) > limit else "")
