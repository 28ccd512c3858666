"""The command line: ``python -m quantlab COMMAND ...``.

Each command lives in its own module in this package with two functions, ``add_parser(sub)`` and
``run(args) -> int``. Bad input (any ``QuantLabError``) becomes one line on stderr and exit code 2,
never a traceback; results go to stdout, as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from quantlab.errors import QuantLabError

# Command name -> module in this package. Add a command by adding a module and a line here.
COMMANDS = {
    "inspect": "inspect_cmd",
    "size": "size_cmd",
    "speed": "speed_cmd",
    "quantize": "quantize_cmd",
    "sweep": "sweep_cmd",
    "eval": "eval_cmd",
}

log = logging.getLogger("quantlab")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        self.exit(2, f"quantlab: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m quantlab", description="Real post-training quantization of language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"quantlab.cli.{module_name}")
        module.add_parser(sub.add_parser(name, help=module.__doc__.splitlines()[0] if module.__doc__ else None))
    return parser


LOAD_DTYPES = ("auto", "bf16", "fp16", "fp32")


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    """``--dtype``: what the weights are loaded in (the fp32 numerics of each layer are not affected)."""
    parser.add_argument("--dtype", default="auto", type=str.lower,
                        choices=LOAD_DTYPES + ("bfloat16", "float16", "float32"),
                        help="load the weights in this dtype (default auto: the checkpoint's own, e.g. bf16)")


def emit(result: dict, as_json: bool, text: str) -> None:
    """Print ``result`` as JSON with --json, else the human-readable ``text``."""
    print(json.dumps(result, indent=2, default=str) if as_json else text)


def _quiet_library_progress() -> None:
    """No transformers / hub progress bars when stderr is not a terminal: there, an error is one line."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not sys.stderr.isatty() and not args.verbose:
        _quiet_library_progress()
    module = importlib.import_module(f"quantlab.cli.{COMMANDS[args.command]}")
    try:
        return module.run(args) or 0
    except QuantLabError as exc:
        print(f"quantlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line (after any progress bar), no traceback; exports are atomic
        newline = "\n" if sys.stderr.isatty() else ""
        print(f"{newline}quantlab {args.command}: interrupted (Ctrl-C); stopped, no partial export left",
              file=sys.stderr)
        return 130
