"""Quantize a model larger than memory one block at a time, straight into a compressed-tensors export.

    >>> lazy = open_lazy("bench/.scale/llama-3-8b")                                  # doctest: +SKIP
    >>> done = quantize_sequential(lazy, parse_config_name("gptq-int4-g128"), "out/llama-gptq")  # doctest: +SKIP

The in-memory path (:func:`quantlab.runs.pipeline.quantize_model`) holds the whole model. Here the
model is a :class:`quantlab.models.lazy.LazyModel`: only the embeddings are in memory, and each
block is read from the checkpoint's memory maps (``load_block``), calibrated and quantized by the
same runner pieces and method functions as in memory (so the codes are the same), written to its
own shard of the export, run once more to give the next block its inputs, and dropped. Peak
memory is about: the embeddings + one block in the load dtype + its fp32 working copies and
Hessians (GPTQ: a few (in, in) fp32/fp64 matrices of the widest linear) + the calibration
activations; the tensors outside the blocks are copied into the export last, one shard at a time.

Stopping and resuming: the export is built in ``.OUT.partial`` beside ``OUT``. After each block,
its shard, the hidden states it produced (the next block's inputs) and its layer results are
written there, then ``sequential_state.json`` says how many blocks are done. The same command
started again (same model, configuration and dtype) skips the finished blocks; another
configuration is refused until the folder is deleted. No evaluation runs here: evaluate the
finished export (``quantlab eval OUT``), which opens as any compressed-tensors checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from quantlab.calibrate.runner import BlockContext, BlockInputs, calibration_set, capture_block_inputs, convert_block
from quantlab.device import release_memory
from quantlab.errors import FormatError, QuantizationError
from quantlab.models.lazy import LazyModel, load_block, read_tensors
from quantlab.models.quantized import QuantizedLinear
from quantlab.models.sizing import model_size
from quantlab.models.weightfiles import read_header
from quantlab.numerics.primitives import check_format_fits
from quantlab.recipe import LayerResult, QuantConfig, RunResult
from quantlab.runs.blockexport import block_layer_tensors, block_quantization_config, check_exportable
from quantlab.runs.export import _write_config, check_output_folder, layer_tensors
from quantlab.runs.exportconfig import int_quantization_config
from quantlab.runs.pipeline import _processor
from quantlab.runs.progress import BlockClock

log = logging.getLogger(__name__)

SEQUENTIAL_METHODS = ("rtn", "gptq")  # block-local methods whose results need no input scales in the export
STATE_FILE = "sequential_state.json"
HIDDEN_FILE = "sequential_hidden.safetensors"
LAYERS_FILE = "sequential_layers.jsonl"
REST_SHARD_BYTES = 2**30  # the tensors outside the blocks are copied in shards of at most this (one big tensor each)

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class BlockReport:
    """One block's turn, for the progress line and the benchmark log."""

    index: int
    n_blocks: int
    seconds: float  # read, calibrate, quantize, write and run the block
    rss_bytes: int  # resident memory after the block was released
    peak_rss_bytes: int  # the process's peak so far

    def describe(self) -> str:
        return (f"block {self.index + 1} of {self.n_blocks}: {self.seconds:.1f} s, RSS {self.rss_bytes / 2**30:.2f} GiB "
                f"(peak {self.peak_rss_bytes / 2**30:.2f} GiB)")


@dataclass(frozen=True)
class SequentialResult:
    run: RunResult  # quality is empty: nothing was evaluated
    export: Path
    resumed_from: int  # blocks already done in the partial folder when this call started
    blocks: tuple[BlockReport, ...]  # the blocks this call processed


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def rss_bytes() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes of this process); Linux's /proc, else the peak twice."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak, peak
    return pages * os.sysconf("SC_PAGE_SIZE"), peak


def check_sequential(lazy: LazyModel, config: QuantConfig) -> None:
    """Fail before any block is read when ``config`` cannot run block by block into an export."""
    if config.method not in SEQUENTIAL_METHODS:
        raise FormatError(f"{config.name}: sequential onloading runs {' or '.join(SEQUENTIAL_METHODS)}; "
                          f"{config.method} needs the model in memory")
    fmt = config.weight_format
    if fmt is None or config.act is not None or config.kv is not None or config.rotate or config.rotate_down:
        raise FormatError(f"{config.name}: sequential onloading exports weight-only quantization; drop the "
                          "activation, KV-cache and rotation options")
    if config.layer_formats:
        raise FormatError(f"{config.name}: a mixed-precision plan runs with the model in memory; sequential "
                          "onloading takes one weight format")
    if fmt.is_block_scaled:
        check_exportable(config.name, fmt)
    elif fmt.kind != "int":
        raise FormatError(f"{config.name}: {fmt.name} cannot be exported; sequential runs export integer formats, "
                          "NVFP4 and MXFP4")
    for info in lazy.structure.linears:
        try:
            check_format_fits((info.out_features, info.in_features), fmt)
        except FormatError as exc:
            raise FormatError(f"{config.name}: {info.name} ({info.out_features}x{info.in_features}): {exc}") from None


def _fingerprint(lazy: LazyModel, config: QuantConfig, batch_size: int | None) -> dict:
    document = {"source": str(Path(lazy.source).resolve()), "config": config.to_dict(), "dtype": str(lazy.dtype),
                "n_blocks": lazy.structure.n_blocks, "batch_size": batch_size}
    return json.loads(json.dumps(document, sort_keys=True))  # tuples as lists, as read back from the file


def _write_json(path: Path, document) -> None:
    """Write-then-rename: a run stopped mid-write leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def _open_state(staging: Path, fingerprint: dict) -> int:
    """Blocks already done in ``staging`` (0 for a new run, which creates it)."""
    state_path = staging / STATE_FILE
    if not state_path.is_file():
        if staging.exists():
            shutil.rmtree(staging)  # ours (the name is derived from OUT) but stopped before its first state: start over
        staging.mkdir(parents=True)
        _write_json(state_path, {"fingerprint": fingerprint, "done": 0})
        return 0
    state = json.loads(state_path.read_text())
    if state.get("fingerprint") != fingerprint:
        raise FormatError(f"{staging} holds a stopped run of another model, configuration or dtype; delete that "
                          "folder to start this one, or run the original command again to resume it")
    return int(state["done"])


def _resume_inputs(staging: Path, inputs: BlockInputs, done: int) -> BlockInputs:
    if done == 0:
        return inputs
    from safetensors.torch import load_file

    saved = load_file(staging / HIDDEN_FILE)
    hidden = [saved[str(i)].to(inputs.hidden[0].device) for i in range(len(saved))]
    if [h.shape for h in hidden] != [h.shape for h in inputs.hidden]:
        raise FormatError(f"{staging}: the saved block inputs do not match this calibration set; delete the folder")
    return replace(inputs, hidden=hidden)


def _block_tensors(ctx: BlockContext) -> dict[str, torch.Tensor]:
    """The finished block as the export stores it: packed quantized linears, everything else as it is."""
    quantized = {local: m for local, m in ctx.block.named_modules() if isinstance(m, QuantizedLinear)}
    tensors = {}
    for local, module in quantized.items():
        name = f"{ctx.prefix}.{local}"
        tensors.update(block_layer_tensors(name, module) if module.fmt.is_block_scaled else layer_tensors(name, module))
    owned = tuple(f"{local}." for local in quantized)
    for key, tensor in ctx.block.state_dict().items():
        if not key.startswith(owned):
            tensors[f"{ctx.prefix}.{key}"] = tensor
    return tensors


def _check_finite(ctx: BlockContext) -> None:
    for local_name, info in ctx.linears.items():
        n_bad = (~torch.isfinite(ctx.block.get_submodule(local_name).weight)).sum().item()
        if n_bad:
            raise QuantizationError(f"{info.name} has {n_bad} NaN or Inf weights, which no format can store; "
                                    "fix or replace the checkpoint before quantizing")


def _run_block(lazy: LazyModel, config: QuantConfig, index: int, inputs: BlockInputs, staging: Path,
               process) -> tuple[list[LayerResult], BlockInputs]:
    """Read, quantize, write block ``index``; the next block's inputs come back (unchanged after the last)."""
    structure = lazy.structure
    ctx = BlockContext(index, f"{structure.block_path}.{index}", load_block(lazy, index), inputs, structure.spec,
                       structure.block_linears(index), config, errors_from_inputs=True)
    _check_finite(ctx)
    layers = process(ctx)
    convert_block(ctx)
    _save_tensors(_block_tensors(ctx), staging / f"model-block-{index:05d}.safetensors")
    if index + 1 < structure.n_blocks:
        inputs = replace(inputs, hidden=ctx.run_block())  # the quantized block feeds the next one
        _save_tensors({str(i): h for i, h in enumerate(inputs.hidden)}, staging / HIDDEN_FILE)
    with (staging / LAYERS_FILE).open("a") as handle:
        handle.writelines(json.dumps(layer.to_dict()) + "\n" for layer in layers)
    return layers, inputs


def quantize_sequential(lazy: LazyModel, config: QuantConfig, out_dir: str | Path, progress: Progress | None = None,
                        on_block: Callable[[BlockReport], None] | None = None,
                        batch_size: int | None = None) -> SequentialResult:
    """Quantize ``lazy`` block by block per ``config`` and export it to the new folder ``out_dir``.

    ``progress(fraction, message)`` gets the usual block fractions; ``on_block`` each block's report
    (time, RSS) once it is written. A stopped run resumes when called again with the same arguments.
    ``batch_size`` is calibration windows per forward pass (default: the in-memory runner's, so the
    codes are the same). Fewer, larger batches hold fewer fp64 partial sums of each Hessian at once
    (a 14336-wide down_proj's is 1.6 GB), at the price of larger transient activations.
    """
    check_sequential(lazy, config)
    out = Path(out_dir)
    check_output_folder(out)
    staging = partial_folder(out)
    done = _open_state(staging, _fingerprint(lazy, config, batch_size))
    report = progress or (lambda fraction, message: None)
    n_blocks = lazy.structure.n_blocks
    if done:
        log.info("%s: resuming at block %d of %d from %s", config.name, done + 1, n_blocks, staging)
    start = time.perf_counter()
    calib_ids = calibration_set(lazy.tokenizer, config.calib)
    calib_seconds = time.perf_counter() - start
    start = time.perf_counter()
    inputs = _resume_inputs(staging, capture_block_inputs(lazy.model, calib_ids, batch_size, lazy.structure), done)
    process, clock, reports = _processor(config.method), BlockClock(n_blocks - done), []
    for index in range(done, n_blocks):
        report(index / n_blocks, f"block {index + 1} of {n_blocks}{clock.note((index - done) / (n_blocks - done))}")
        block_start = time.perf_counter()
        _, inputs = _run_block(lazy, config, index, inputs, staging, process)
        _write_json(staging / STATE_FILE, {"fingerprint": _fingerprint(lazy, config, batch_size), "done": index + 1})
        release_memory(lazy.device)
        reports.append(BlockReport(index, n_blocks, time.perf_counter() - block_start, *rss_bytes()))
        log.info("%s: %s", config.name, reports[-1].describe())
        if on_block is not None:
            on_block(reports[-1])
    report(0.95, "copying the tensors outside the blocks")
    layers = [LayerResult(**json.loads(line)) for line in (staging / LAYERS_FILE).read_text().splitlines()]
    _finish_export(lazy, config, staging, out)
    seconds = time.perf_counter() - start
    size = model_size(lazy.model, config.weight_format)
    run = RunResult(config, tuple(layers), size.bits_per_weight, size.total_bytes, seconds, {}, {}, calib_seconds)
    report(1.0, f"{config.name}: exported to {out}")
    return SequentialResult(run, out, done, tuple(reports))


def _rest_shards(lazy: LazyModel) -> list[list[str]]:
    """The tensors outside the blocks in groups of at most ``REST_SHARD_BYTES`` (a larger tensor alone)."""
    groups, current, current_bytes = [], [], 0
    for name in lazy.outside_blocks():
        info = next(t for t in read_header(lazy.locations[name]) if t.name == name)
        if current and current_bytes + info.bytes > REST_SHARD_BYTES:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += info.bytes
    return groups + ([current] if current else [])


def _finish_export(lazy: LazyModel, config: QuantConfig, staging: Path, out: Path) -> None:
    """Copy the tensors outside the blocks, write the index, config and tokenizer, and move into place."""
    for k, names in enumerate(_rest_shards(lazy)):
        tensors = read_tensors(lazy, names)
        _save_tensors({n: t.to(lazy.dtype) if t.is_floating_point() else t for n, t in tensors.items()},
                      staging / f"model-rest-{k:05d}.safetensors")
        del tensors
    for name in (STATE_FILE, HIDDEN_FILE, LAYERS_FILE):
        (staging / name).unlink(missing_ok=True)
    shards = sorted(staging.glob("*.safetensors"))
    weight_map = {info.name: path.name for path in shards for info in read_header(path)}
    index = {"metadata": {"total_size": sum(p.stat().st_size for p in shards)}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    fmt = config.weight_format
    block_path = f"{lazy.structure.block_path}."
    ignored = tuple(name for name, m in lazy.model.named_modules()
                    if isinstance(m, nn.Linear) and not name.startswith(block_path))
    qconfig = block_quantization_config(fmt, ignored) if fmt.is_block_scaled else int_quantization_config(fmt, ignored)
    _write_config(lazy.model, qconfig, staging, [fmt])
    if lazy.tokenizer is not None:
        lazy.tokenizer.save_pretrained(staging)
    if out.exists():
        out.rmdir()  # empty, as checked: the finished export takes its place
    os.replace(staging, out)
