"""Will a model fit? Checked before it is loaded, so a model too large is one line, not the OOM killer.

Loading a whole model holds every parameter in the load dtype (transformers reads the checkpoint
on the CPU, then it moves to the device). A Llama-3-8B in bf16 is 16 GB: on a 24 GiB workshop server
with other sessions, or a user's 16 GB laptop, the kernel kills the process mid-read, taking every
visitor's session with it. So ``load_model`` asks first: parameters x dtype bytes against the memory
the system says it can give (``MemAvailable``, capped by a cgroup's limit; the GPU's free memory when
the model goes there), and refuses with the way out: the ``--sequential`` commands, which hold one
block at a time.

The parameter count comes from the architecture built on ``meta`` (no memory, ~1 s at 8B), so a
pre-quantized checkpoint is counted at its dequantized size, which is what it loads as. A checkpoint
whose files, expanded 8x (packed INT4 -> fp32, the largest growth), still fit is not counted at all.
``QUANTLAB_NO_MEMORY_CHECK=1`` (an operator's setting) skips the check, e.g. with ample swap.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from quantlab.errors import ModelLoadError, QuantizationError
from quantlab.models.paths import printable
from quantlab.models.weightfiles import weight_files

log = logging.getLogger(__name__)

MAX_GROWTH = 8  # bytes in memory per byte on disk at most: packed INT4 (half a byte) dequantized to fp32
MARGIN = 1.05  # buffers, the tokenizer and transformers' own copies while loading
SKIP_ENV = "QUANTLAB_NO_MEMORY_CHECK"


def check_fits(resolved: str, config, kind: str, torch_dtype: torch.dtype, device: torch.device,
               trust_remote_code: bool = False) -> None:
    """ModelLoadError when loading the model of ``config`` (``kind`` "causal" or "encoder") in
    ``torch_dtype`` would not fit in memory."""
    if _skipped():
        return
    cpu = torch.device("cpu")
    free = {cpu: available_bytes(cpu)}
    if device.type == "cpu" and free[cpu] is not None and Path(resolved).is_dir():
        on_disk = sum(path.stat().st_size for path in weight_files(Path(resolved)))
        if on_disk * MAX_GROWTH * MARGIN < free[cpu]:
            return  # fits whatever the checkpoint holds: not worth building the architecture
    needed = parameter_bytes(config, torch_dtype, kind, trust_remote_code)
    if needed is None:
        return
    if device != cpu:
        free[device] = available_bytes(device)
    for where, left in free.items():
        if left is not None and needed * MARGIN > left:
            raise ModelLoadError(_refusal(resolved, needed, left, torch_dtype, where))


def _skipped() -> bool:
    return os.environ.get(SKIP_ENV, "") not in ("", "0")


def check_run_fits(name: str, linears, device: torch.device) -> None:
    """QuantizationError when quantizing a loaded model in memory clearly cannot fit in what is left.

    A lower bound of what a run adds to the loaded model: 1 byte a weight for the codes of every
    linear (int8/uint8/float8 storage) and the largest block's linears in fp32 (its working copy).
    Calibration activations, Hessians and the evaluation come on top, so passing this check does
    not promise the run fits; failing it means it cannot (an 8B bf16 model on a 24 GB GPU: 16 GB
    loaded, 7.5 GB of codes still to come). On the CPU a bf16 checkpoint loads as pages of its
    memory-mapped files, which the system counts as reclaimable, so there the check passes
    and the run competes with the page cache: the 8B shape on this 24 GiB machine passed it and
    ran at 23.7 GB peak RSS, most of it the mapped checkpoint (README, "Real checkpoints").
    """
    if _skipped():
        return
    per_block: dict[int | None, int] = {}
    for info in linears:
        per_block[info.block] = per_block.get(info.block, 0) + info.in_features * info.out_features
    needed = sum(per_block.values()) + 4 * max(per_block.values(), default=0)
    free = available_bytes(device)
    if free is not None and needed * MARGIN > free:
        raise QuantizationError(
            f"quantizing {printable(name)} in memory needs at least {needed / 2**30:.1f} GiB more (the codes of its "
            f"linears and one block in fp32) but {device.type} has {free / 2**30:.1f} GiB free: quantize it one "
            "block at a time (`quantlab quantize FOLDER --sequential --out DIR`) or use a machine with more memory")


def _refusal(resolved: str, needed: int, free: int, torch_dtype: torch.dtype, where: torch.device) -> str:
    dtype = str(torch_dtype).removeprefix("torch.")
    smaller = " or load it in bf16 (--dtype bf16)," if torch_dtype == torch.float32 else ""
    return (f"{printable(Path(resolved).name or resolved)} needs about {needed / 2**30:.1f} GiB in {dtype} but "
            f"{where.type} has {free / 2**30:.1f} GiB free: evaluate or quantize it one block at a time "
            f"(`quantlab eval FOLDER --sequential`, `quantlab quantize FOLDER --sequential --out DIR`),{smaller} "
            "or use a machine with more memory")


def parameter_bytes(config, torch_dtype: torch.dtype, kind: str = "causal",
                    trust_remote_code: bool = False) -> int | None:
    """Bytes of the model's parameters and buffers in ``torch_dtype`` (floating ones; the others as
    they are); None when the architecture cannot be built here (the load itself will say why)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "causal" else AutoModel
    try:
        with init_empty_weights(include_buffers=True):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001  an estimate only: the real load reports the problem
        log.debug("no memory estimate for %s: %s", type(config).__name__, exc)
        return None
    size = torch.empty(0, dtype=torch_dtype).element_size()
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()  # tied weights once
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in tensors)


def available_bytes(device: torch.device) -> int | None:
    """Memory ``device`` can still give; None when this system does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    free = _meminfo_available()
    limit = _cgroup_headroom()
    candidates = [value for value in (free, limit) if value is not None]
    return min(candidates) if candidates else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """A container's memory limit minus its use (cgroup v2, then v1): MemAvailable shows the host's."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit == "max" or not limit.isdigit() or not usage.isdigit() or int(limit) >= 2**60:
            return None
        stat_file = str(Path(usage_file).with_name("memory.stat"))
        return max(int(limit) - int(usage) + _reclaimable(stat_file), 0)
    return None


def _reclaimable(stat_file: str) -> int:
    """Page cache the kernel drops before it kills (a checkpoint just read counts in the usage)."""
    try:
        for line in Path(stat_file).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
