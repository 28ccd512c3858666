"""Errors that mean "the input is wrong", each with a message that says how to fix it.

The CLI turns any ``QuantLabError`` into one line on stderr and exit code 2; the app shows the
message in the page. Anything else is a bug and keeps its traceback.
"""


class QuantLabError(Exception):
    """Base class: bad input or an unavailable resource, never a bug."""


class FormatError(QuantLabError, ValueError):
    """A format or setting that cannot be used (bits, group size, percentile, ...)."""


class QuantizationError(QuantLabError, ValueError):
    """Values that cannot be quantized (NaN or Inf)."""


class ModelLoadError(QuantLabError):
    """A model or weights file that cannot be loaded: unreachable hub, unknown id, corrupt file."""


class DataError(QuantLabError):
    """A text or calibration source that cannot be used (missing, empty, unreachable)."""


def is_library_panic(exc: BaseException) -> bool:
    """A Rust library's panic (tokenizers, safetensors) raised through pyo3.

    pyo3's ``PanicException`` derives from ``BaseException``, not ``Exception``, and is not importable
    by name, so ``except Exception`` misses it: a tokenizer whose regex hits its backtracking limit
    would otherwise end the command with a traceback.
    """
    return type(exc).__name__ == "PanicException"
