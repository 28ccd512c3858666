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
