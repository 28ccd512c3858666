"""Self-describing run records: one JSON file that says what was run, on what, and what came out.

A teacher precomputes a sweep once and every browser in the room opens the file instead of
recomputing. So the file carries everything needed to trust and reproduce it: QuantLab's version,
the model (name, source, and a sha256 of its weights files, so two files about "the same" model can
be told apart after a retrain), every configuration with its seed, the calibration and evaluation
texts and their sizes, the device, the timings, and each run's results (``RunResult.to_dict``).

Layout (``format`` and ``version`` first, so a reader can refuse what it does not understand)::

    {"format": "quantlab-run-record", "version": 1, "quantlab_version": "0.1.0",
     "created": "2025-01-01T12:00:00+00:00", "kind": "sweep",
     "model": {"name": ..., "source": ..., "sha256": ..., "files": {name: sha256}, "n_params": ...},
     "device": "cpu", "seed": 0, "calibration": {...} | null, "evaluation": {...} | null,
     "timings": {"total_seconds": ..., "runs": {config name: seconds}}, "runs": [RunResult...],
     "extra": {...}}

``read_record`` validates all of it and turns any problem into a ``DataError`` that names the file
and the field; it also opens a bare list of run results (or ``{"runs": [...]}``) from older tools,
filling what such a file does not say with "unknown".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from quantlab import __version__
from quantlab.recipe import CalibConfig, RunResult, jsonable
from quantlab.errors import DataError, FormatError, ModelLoadError, QuantLabError

RECORD_FORMAT = "quantlab-run-record"
RECORD_VERSION = 1
RECORD_KINDS = ("quantize", "sweep")
_HASH_CHUNK = 16 * 2**20  # read weights in 16 MiB pieces: constant memory for any model size
# Sweeps measured by the project and shipped with it: a workshop opens one without computing anything.
BUNDLED_SWEEPS = Path(__file__).resolve().parents[2] / "assets" / "sweeps"


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a record is about; ``sha256`` pins down the exact weights."""

    name: str
    source: str  # the folder or hub id it was loaded from
    sha256: str | None = None  # over the weights files (see ``hash_weights``); None when none are local
    files: dict[str, str] = field(default_factory=dict)  # weights file name -> its sha256
    n_params: int | None = None


@dataclass(frozen=True)
class DataSource:
    """A text a run used: its name and how much of it."""

    name: str  # "train" / "heldout" (bundled stdlib text), a file path, or "wikitext2"
    n_sequences: int | None = None
    seq_len: int | None = None
    n_tokens: int | None = None

    @classmethod
    def from_calib(cls, calib: CalibConfig) -> DataSource:
        return cls(calib.source, calib.n_samples, calib.seq_len, calib.n_tokens)

    @classmethod
    def from_quality(cls, name: str, quality: dict) -> DataSource | None:
        """Sizes from a run's quality dict: perplexity windows and tokens, or fidelity sentences."""
        if "tokens" in quality:
            return cls(name, quality.get("n_windows"), quality.get("ctx"), quality["tokens"])
        if "n_sentences" in quality:
            return cls(name, quality["n_sentences"], quality.get("max_sentence_tokens"))
        return None


@dataclass(frozen=True)
class RunRecord:
    """A whole record; ``runs`` are the results in the order they were run."""

    kind: str  # "quantize" (one run) | "sweep"
    model: ModelIdentity
    runs: tuple[RunResult, ...]
    device: str
    seed: int | None
    calibration: DataSource | None
    evaluation: DataSource | None
    timings: dict  # {"total_seconds": float, "runs": {config name: seconds}, ...}
    quantlab_version: str = __version__
    created: str = ""  # ISO 8601, UTC; set on creation
    extra: dict = field(default_factory=dict)  # anything else the writer wants to keep (JSON values)

    def __post_init__(self) -> None:
        if self.kind not in RECORD_KINDS:
            raise DataError(f"record kind must be one of {RECORD_KINDS}, got {self.kind!r}")
        if not self.created:
            object.__setattr__(self, "created", datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return {
            "format": RECORD_FORMAT, "version": RECORD_VERSION, "quantlab_version": self.quantlab_version,
            "created": self.created, "kind": self.kind, "model": asdict(self.model), "device": self.device,
            "seed": self.seed,
            "calibration": asdict(self.calibration) if self.calibration else None,
            "evaluation": asdict(self.evaluation) if self.evaluation else None,
            "timings": jsonable(self.timings), "runs": [run.to_dict() for run in self.runs],
            "extra": jsonable(self.extra),
        }

    def run(self, name: str) -> RunResult:
        """The run of configuration ``name``."""
        for run in self.runs:
            if run.config.name == name:
                return run
        raise DataError(f"no run named {name!r} in this record; it has {[r.config.name for r in self.runs]}")


def hash_weights(files: list[Path]) -> tuple[str, dict[str, str]]:
    """sha256 of each file, and one over the sorted ``name:sha256`` lines (independent of file order)."""
    per_file = {}
    for path in sorted(files, key=lambda p: p.name):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
        per_file[path.name] = digest.hexdigest()
    combined = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in per_file.items()).encode()).hexdigest()
    return combined, per_file


def identify_model(loaded) -> ModelIdentity:
    """A ``LoadedModel``'s identity; weights are hashed when its files are on this machine."""
    from quantlab.models.loading import is_bundled, weight_files

    n_params = sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())
    # A bundled model is recorded by name, not by this machine's path to it: the file stays
    # meaningful on the next machine, and the hash still pins the exact weights.
    source = loaded.name if is_bundled(loaded.source) else loaded.source
    folder = _local_folder(loaded.source)
    if folder is None:
        return ModelIdentity(loaded.name, source, n_params=n_params)
    try:
        combined, per_file = hash_weights(weight_files(folder))
    except ModelLoadError:
        return ModelIdentity(loaded.name, source, n_params=n_params)
    return ModelIdentity(loaded.name, source, combined, per_file, n_params)


def _local_folder(source: str) -> Path | None:
    """The folder holding a source's weights: itself, or a hub id's snapshot in the local cache."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json")
    except ValueError:  # not a valid hub id either: nothing to hash
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def build_record(runs, model, *, kind: str = "sweep", device: str | None = None, seed: int | None = None,
                 calibration: DataSource | None = None, evaluation: DataSource | str = "heldout",
                 timings: dict | None = None, extra: dict | None = None) -> RunRecord:
    """A record of ``runs`` (RunResults) on ``model`` (a LoadedModel or ModelIdentity).

    Unset fields come from the runs: the seed and calibration set of the first calibrated run
    (the sweep uses one for all), the evaluation sizes from the first run's quality (``evaluation``
    given as a name: the text it was measured on, the pipeline's held-out text by default), the
    loaded model's device, and the runs' own seconds.
    """
    runs = (runs,) if isinstance(runs, RunResult) else tuple(runs)
    identity = model if isinstance(model, ModelIdentity) else identify_model(model)
    calibrated = [r.config for r in runs if r.config.needs_calibration]
    if calibration is None and calibrated:
        calibration = DataSource.from_calib(calibrated[0].calib)
    if isinstance(evaluation, str):
        evaluation = next((s for r in runs if (s := DataSource.from_quality(evaluation, r.quality))), None)
    if seed is None:
        seed = (calibrated[0] if calibrated else runs[0].config).calib.seed if runs else None
    if device is None:
        device = _device_of(model)
    if timings is None:
        timings = {"total_seconds": sum(r.seconds for r in runs), "runs": {r.config.name: r.seconds for r in runs}}
    return RunRecord(kind, identity, runs, device, seed, calibration, evaluation, timings, extra=extra or {})


def _device_of(model) -> str:
    """Where the runs ran: the loaded model's device, else the one QuantLab would pick."""
    parameter = next(model.model.parameters(), None) if hasattr(model, "model") else None
    if parameter is not None:
        return str(parameter.device.type)
    from quantlab.device import default_device

    return str(default_device())


def check_record_path(path: str | Path, overwrite: bool = False) -> Path:
    """Whether a record can be written to ``path``, checked before any work: DataError saying why not.

    A new file in a writable folder (created if missing), or an existing file with ``overwrite``;
    never a folder.
    """
    path = Path(path)
    shown = str(path).encode("ascii", "backslashreplace").decode("ascii")[:200]
    try:
        if path.is_dir():
            raise DataError(f"{shown} is a folder; give a file name for the record, e.g. {shown}/sweep.json")
        if path.exists() and not overwrite:
            raise DataError(f"{shown} exists; add --force to overwrite it, or choose a new name (nothing was written)")
        folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise DataError(f"cannot write {shown}: {folder} is not a writable folder; choose another place")
    except OSError as exc:  # a name too long, a loop in the path's links
        raise DataError(f"cannot write {shown} ({exc.strerror or exc}); choose another name") from None
    return path


def write_record(path: str | Path, runs, model, **fields) -> RunRecord:
    """Build a record (``build_record``'s arguments) and write it to ``path`` as JSON; returns it.

    The file is written to a temporary name first and renamed, so a crash never leaves half a record,
    and the temporary file is removed when the write or the rename fails.
    """
    record = runs if isinstance(runs, RunRecord) else build_record(runs, model, **fields)
    path = Path(path)
    text = json.dumps(record.to_dict(), indent=1, allow_nan=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise DataError(f"cannot write {path} ({exc.strerror or exc})") from None
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temp, path)
    except OSError as exc:
        raise DataError(f"cannot write {path} ({exc.strerror or exc}); nothing was written") from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return record


def read_record(path: str | Path) -> RunRecord:
    """Open a record written by ``write_record`` (or a bare list of run results); DataError if unusable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"no such record file: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read the record {path.name} ({exc.strerror or exc})") from None
    return record_from_bytes(raw, path.name)


def record_from_bytes(raw: bytes, name: str = "record") -> RunRecord:
    """A record from a file's bytes (an upload): not JSON, nested too deeply, NaN or Infinity: DataError."""
    def no_constants(constant: str):
        raise ValueError(f"{constant} is not a number a record may hold")

    try:
        data = json.loads(raw, parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:120]
        raise DataError(f"{name} is not a JSON run record ({detail}); pick a file written by "
                        "`quantlab sweep --out` or `quantlab quantize --record`") from None
    return record_from_dict(data, name)


def bundled_sweeps() -> dict[str, Path]:
    """The shipped sweep records by file stem, e.g. ``pystdlib-llama-4m-default``; empty if none ship."""
    return {path.stem: path for path in sorted(BUNDLED_SWEEPS.glob("*.json"))}


def record_from_dict(data, name: str = "record") -> RunRecord:
    """Validate and convert a record's JSON document (``read_record`` without the file)."""
    if isinstance(data, list) or (isinstance(data, dict) and "format" not in data and "runs" in data):
        return _bare_runs(data, name)
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise DataError(f"{name} is not a QuantLab run record (no \"format\": \"{RECORD_FORMAT}\")")
    version = data.get("version")
    if not isinstance(version, int) or version > RECORD_VERSION:
        raise DataError(f"{name} is record version {version!r}; this QuantLab ({__version__}) reads up to "
                        f"{RECORD_VERSION}: upgrade QuantLab to open it")
    try:
        model = ModelIdentity(**_require(data, "model", dict, name))
        calibration, evaluation = (DataSource(**data[k]) if data.get(k) else None
                                   for k in ("calibration", "evaluation"))
        return RunRecord(
            kind=data.get("kind", "sweep"), model=model, runs=_runs(_require(data, "runs", list, name), name),
            device=str(data.get("device", "unknown")), seed=data.get("seed"), calibration=calibration,
            evaluation=evaluation, timings=data.get("timings") or {},
            quantlab_version=str(data.get("quantlab_version", "unknown")), created=str(data.get("created", "")),
            extra=data.get("extra") or {},
        )
    except TypeError as exc:
        raise DataError(f"{name}: a field has the wrong shape ({exc}); the file is damaged or hand-edited") from None


def _require(data: dict, key: str, kind: type, name: str):
    value = data.get(key)
    if not isinstance(value, kind):
        raise DataError(f"{name}: field {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _runs(items: list, name: str) -> tuple[RunResult, ...]:
    runs = []
    for index, item in enumerate(items):
        try:
            runs.append(RunResult.from_dict(item))
        except KeyError as exc:
            raise DataError(f"{name}: run {index} lacks the field {exc}; the file is damaged or hand-edited") from None
        except (TypeError, AttributeError, ValueError, QuantLabError) as exc:
            message = str(exc) if isinstance(exc, FormatError) else f"{type(exc).__name__}: {exc}"
            raise DataError(f"{name}: run {index} cannot be read ({message})") from None
        _check_numbers(item, index, name)
    return tuple(runs)


_NUMBER_FIELDS = ("bits_per_weight", "total_bytes", "seconds")
# The figures the pages chart; null (not measured) is allowed, a string or NaN is not.
_QUALITY_NUMBERS = ("perplexity", "word_perplexity", "bits_per_byte", "fidelity", "min_cosine", "kl_divergence",
                    "top1_agreement", "tokens")


def _check_numbers(item, index: int, name: str) -> None:
    """A run's figures are finite JSON numbers: "4.1" (a string) or a huge exponent would only fail in a chart."""
    quality = item.get("quality") or {}
    if not isinstance(quality, dict):
        raise DataError(f"{name}: run {index}'s quality must be an object, got {type(quality).__name__}")
    figures = [(key, item.get(key)) for key in _NUMBER_FIELDS]
    figures += [(f"quality.{key}", quality[key]) for key in _QUALITY_NUMBERS if key in quality]
    for key, value in figures:
        if value is None and key.startswith("quality."):
            continue  # a quality that could not be measured is written as null (jsonable)
        if type(value) not in (int, float) or not math.isfinite(value):
            shown = repr(value).encode("ascii", "backslashreplace").decode("ascii")[:40]
            raise DataError(f"{name}: run {index}'s {key} must be a finite number, got {shown}; "
                            "the file is damaged or hand-edited")


def _bare_runs(data, name: str) -> RunRecord:
    """Run results without a record around them: what is not said is recorded as unknown."""
    items = data if isinstance(data, list) else data["runs"]
    if not isinstance(items, list):
        raise DataError(f"{name}: field 'runs' must be a list, got {type(items).__name__}")
    runs = _runs(items, name)
    model = ModelIdentity(name="unknown", source="unknown")
    if isinstance(data, dict) and isinstance(data.get("model"), str):
        model = ModelIdentity(name=data["model"], source=data["model"])
    return build_record(runs, model, kind="sweep", device="unknown", evaluation="unknown")
