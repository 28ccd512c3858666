"""The command line: ``python -m quantlab COMMAND ...``.

Each command lives in its own module in this package with two functions, ``add_parser(sub)`` and
``run(args) -> int``. Bad input (any ``QuantLabError``) becomes one line on stderr and exit code 2,
never a traceback; results go to stdout, as JSON with ``--json``.

stderr carries one line when a command fails: the libraries' own reports (transformers' load
reports, torch's warnings) and QuantLab's warnings are held back, and shown with ``-v``. A command
that succeeds prints QuantLab's warnings after its work, one line each. Every numeric option has
bounds (``int_option``), checked by the parser. A reader that closes the pipe early (``| head``)
ends the command quietly with 141, as for any Unix tool killed by SIGPIPE; an output that cannot be
written (closed stdout, a full disk) is an error line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import sys
import tempfile
import traceback

from quantlab.errors import QuantLabError, is_library_panic
from quantlab.models.paths import printable  # noqa: F401  (re-exported: the commands escape names with it)

# Command name -> module in this package. Add a command by adding a module and a line here.
COMMANDS = {
    "inspect": "inspect_cmd",
    "size": "size_cmd",
    "speed": "speed_cmd",
    "quantize": "quantize_cmd",
    "sweep": "sweep_cmd",
    "eval": "eval_cmd",
    "plan": "plan_cmd",
}

log = logging.getLogger("quantlab")
EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        self.exit(EXIT_BAD_INPUT, f"quantlab: error: {printable(message)} (see --help)\n")


def _bounded_option(cast, low, high, what: str, finite_only: bool):
    """An argparse ``type``: ``cast(text)`` within [low, high]; anything else is argparse's one-line error."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{printable(text)[:40]!r} is not a {what}") from None
        if (finite_only and not math.isfinite(value)) or not low <= value <= high:
            bounds = f"{low:,}..{high:,}" if cast is int else f"{low}..{high}"
            raise argparse.ArgumentTypeError(f"{printable(text)[:40]} is outside {bounds}")
        return value

    parse.__name__ = what  # what argparse names in its own messages
    return parse


def int_option(low: int, high: int):
    """An argparse ``type``: a whole number in [low, high]."""
    return _bounded_option(int, low, high, "whole number", finite_only=False)


def float_option(low: float, high: float):
    """An argparse ``type``: a finite number in [low, high] (NaN and Inf are refused)."""
    return _bounded_option(float, low, high, "number", finite_only=True)


class _HeldWarnings(logging.Handler):
    """Keeps QuantLab's warnings until the command ends: printed after success, dropped on an error."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(printable(record.getMessage()))
        except Exception:  # noqa: BLE001  a malformed log call must not hide the command's own result
            self.messages.append(printable(str(record.msg)))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m quantlab", description="Real post-training quantization of language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"quantlab.cli.{module_name}")
        module.add_parser(sub.add_parser(name, help=module.__doc__.splitlines()[0] if module.__doc__ else None))
    return parser




def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    """``--dtype``: what the weights are loaded in (the fp32 numerics of each layer are not affected)."""
    from quantlab.device import LOAD_DTYPES
    parser.add_argument("--dtype", default="auto", type=str.lower,
                        choices=LOAD_DTYPES + ("bfloat16", "float16", "float32"),
                        help="load the weights in this dtype (default auto: the checkpoint's own, e.g. bf16)")


def emit(result: dict, as_json: bool, text: str) -> None:
    """Print ``result`` as JSON with --json (ASCII: names are escaped), else the human-readable ``text`` (rank 0 only under torchrun).

    ``text`` must be built from ``printable`` names: a tensor name may hold escape sequences. JSON has
    no Infinity or NaN: such figures (a word perplexity past float range) are written as null.
    """
    from quantlab.calibrate.distributed import is_source_process
    from quantlab.recipe import jsonable

    if not is_source_process():  # under torchrun rank 0 alone prints
        return
    document = json.dumps(jsonable(result), indent=2, default=str, allow_nan=False) if as_json else text
    sys.stdout.write(document + "\n")


def _quiet_libraries() -> None:
    """transformers' warnings and load reports (17 lines for one size mismatch) only with -v."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _setup_logging(verbose: bool) -> _HeldWarnings | None:
    """-v: everything to stderr as it happens. Otherwise QuantLab's warnings are held, the rest dropped."""
    logging.captureWarnings(True)  # Python warnings (torch's, ...) go through logging: shown with -v only
    for handler in [h for h in log.handlers if isinstance(h, _HeldWarnings)]:
        log.removeHandler(handler)  # main() may run more than once in one process (the tests do)
    root = logging.getLogger()
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        log.setLevel(logging.INFO)
        log.propagate = True
        return None
    if not root.handlers:  # without a handler, logging's last resort would print warnings to stderr
        root.addHandler(logging.NullHandler())
    held = _HeldWarnings()
    log.setLevel(logging.WARNING)
    log.addHandler(held)
    log.propagate = False
    return held


def _say(line: str) -> None:
    """One line on stderr; nothing when stderr itself is gone."""
    try:
        sys.stderr.write(printable(line) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None or sys.stdout.closed:
        _say("quantlab: error: stdout is closed, so no result could be written; run it with an output")
        return EXIT_BAD_INPUT
    args = build_parser().parse_args(argv)
    state = (log.level, log.propagate)
    held = _setup_logging(args.verbose)
    try:
        return _run(args, held)
    finally:  # main() may run again in this process (the tests): the logger is as it found it
        if held is not None:
            log.removeHandler(held)
        log.setLevel(state[0])
        log.propagate = state[1]


def _run(args: argparse.Namespace, held: _HeldWarnings | None) -> int:
    """The command, with every way it can end turned into an exit code and at most one stderr line."""
    module = importlib.import_module(f"quantlab.cli.{COMMANDS[args.command]}")
    name = f"quantlab {args.command}"
    from quantlab.calibrate import distributed

    try:
        if not args.verbose:
            _quiet_libraries()
        with _native_stderr_held(args.verbose):
            distributed.init_from_env()  # under torchrun: join the job (quantize and sweep share their work)
            code = module.run(args) or 0
        sys.stdout.flush()  # here, not at exit: a full disk or a closed pipe is reported like any error
    except QuantLabError as exc:
        _say(f"{name}: error: {exc}")
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:  # Ctrl-C: one line (after any progress bar), no traceback; exports are atomic
        newline = "\n" if sys.stderr.isatty() else ""
        _say(f"{newline}{name}: interrupted (Ctrl-C); stopped, no partial export left")
        return 130
    except OSError as exc:
        if not _is_output_error(exc):
            return _internal_error(name, exc, args.verbose)
        _say(f"{name}: error: cannot write the output ({exc.strerror or exc}); nothing more was written")
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001  a bug: one line, the traceback with -v
        return _internal_error(name, exc, args.verbose)
    except BaseException as exc:  # a Rust library's panic (see quantlab.errors.is_library_panic)
        if not is_library_panic(exc):
            raise
        return _internal_error(name, exc, args.verbose)
    finally:
        distributed.shutdown()
    for message in held.messages if held else ():
        _say(f"{name}: warning: {message}")
    return code


@contextlib.contextmanager
def _native_stderr_held(verbose: bool):
    """Native code's own stderr (a Rust panic's report and backtrace, C warnings) held back unless -v.

    Python's ``sys.stderr`` keeps the real stream (progress bars, QuantLab's lines); file descriptor 2,
    which native libraries write to directly, points at a discarded temporary file meanwhile. Only
    when ``sys.stderr`` is descriptor 2 itself (not under a test's capture).
    """
    try:
        redirect = not verbose and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        redirect = False
    if not redirect:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    previous = sys.stderr
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        sys.stderr = open(saved, "w", buffering=1, encoding=previous.encoding, errors="backslashreplace",
                          closefd=False)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sys.stderr = previous


def _is_output_error(exc: OSError) -> bool:
    """Whether ``exc`` came from writing stdout (ENOSPC on /dev/full, EBADF on a closed descriptor)."""
    return any(frame.name in ("emit", "main") and frame.filename == __file__
               for frame in traceback.extract_tb(exc.__traceback__)[-2:])


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so that the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _internal_error(name: str, exc: BaseException, verbose: bool) -> int:
    """Not bad input but a bug in QuantLab or a library: say so in one line; -v prints the traceback."""
    if verbose:
        traceback.print_exception(exc)
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    _say(f"{name}: internal error: {type(exc).__name__}{': ' + detail if detail else ''} "
         "(a bug; rerun with -v for the traceback and report it)")
    return 1
