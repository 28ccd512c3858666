"""Calling a model's tokenizer on user text: its failures become one DataError, panics included.

A tokenizer comes with the model (its ``tokenizer.json`` is user input too): a pre-tokenizer regex that
hits the regex engine's backtracking limit makes the Rust library panic, and pyo3 raises that as a
``BaseException`` that ``except Exception`` would let through as a traceback.
"""

from __future__ import annotations

from quantlab.errors import DataError, is_library_panic

_TOKENIZER_ERRORS = (ValueError, TypeError, KeyError, IndexError, RuntimeError, OverflowError, RecursionError)


def tokenize(tokenizer, text, **kwargs):
    """``tokenizer(text, **kwargs)``; DataError when the tokenizer fails on it."""
    try:
        return tokenizer(text, **kwargs)
    except BaseException as exc:  # noqa: BLE001  see the module docstring: panics are BaseExceptions
        if not isinstance(exc, _TOKENIZER_ERRORS) and not is_library_panic(exc):
            raise
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        detail = detail.encode("ascii", "backslashreplace").decode("ascii")
        raise DataError(f"the model's tokenizer failed on the text ({type(exc).__name__}: {detail}); "
                        "its tokenizer files may be damaged, or try another text") from None
