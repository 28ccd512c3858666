"""Device choice: CUDA when present, else CPU. Never a hard-coded ``cuda:0``. And the dtypes a model may load in."""

from __future__ import annotations

import ctypes
import gc
import logging

import torch

LOAD_DTYPES = ("auto", "bf16", "fp16", "fp32")  # what a user may ask a model to load in (CLI --dtype, the app)

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_devices() -> list[str]:
    """Device names a user may choose from, best first."""
    return (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]


def resolve_device(name: str | None) -> torch.device:
    """``None`` or ``"auto"`` picks the default; a device that cannot run the model is an error, not a crash.

    Only ``cpu`` and ``cuda[:N]`` (an index this machine has) run models here: ``meta`` holds no
    values, and torch's other names (``xla``, ``hpu``, ...) need backends QuantLab does not drive.
    """
    from quantlab.errors import FormatError

    if name in (None, "", "auto"):
        return default_device()
    choices = ", ".join(["auto", *available_devices()])
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        shown = str(name).encode("ascii", "backslashreplace").decode("ascii")[:40]
        raise FormatError(f"unknown device {shown!r}; use one of {choices}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FormatError("CUDA was requested but no GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise FormatError(f"device {device.type!r} cannot run a model here; use one of {choices}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FormatError(f"there is no {name}: this machine has {torch.cuda.device_count()} GPU(s); use cuda or cuda:0")
    return device


def release_memory(device: torch.device | str | None = None) -> None:
    """Hand memory freed by finished work back to the system.

    After a run the quantized copy and its activations are garbage, but allocators keep the pages:
    CUDA's caching allocator, and glibc's malloc, whose arenas hold freed heap mapped and, fragmented
    by thousands of tensors of different sizes, let a long session's resident memory drift upward
    run after run. A workshop server runs sweeps for hours, so every run ends with this.
    """
    gc.collect()
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    trim_c_heap()


def trim_c_heap() -> bool:
    """glibc's ``malloc_trim``: give freed heap back to the system; False where there is none."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to hand back this way
        log.debug("malloc_trim is not available here")
        return False
    return True
