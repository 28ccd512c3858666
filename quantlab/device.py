"""Device choice: CUDA when present, else CPU. Never a hard-coded ``cuda:0``."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_devices() -> list[str]:
    """Device names a user may choose from, best first."""
    return (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]


def resolve_device(name: str | None) -> torch.device:
    """``None`` or ``"auto"`` picks the default; asking for CUDA without one is an error, not a crash."""
    from quantlab.errors import FormatError

    if name in (None, "", "auto"):
        return default_device()
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FormatError("CUDA was requested but no GPU is available here; use --device cpu")
    return torch.device(name)
