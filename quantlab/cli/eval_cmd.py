"""Evaluate a model: token and word perplexity, bits per byte (causal LM) or embedding fidelity (encoder)."""

from __future__ import annotations

import argparse
import sys

from quantlab.cli import add_dtype_option, emit, int_option, printable
from quantlab.evaluation import SOURCES, EvalConfig, FidelityResult, PerplexityResult, evaluate, load_text
from quantlab.cli.size_cmd import BUNDLED_LM

MAX_CTX = 2**20  # tokens per window: beyond any model's context
MAX_TOKENS = 2**26  # 67M tokens: WikiText-103's training split is 100M, nobody evaluates more on one machine
CHARS_PER_TOKEN_READ = 64  # text read per wanted token: a generous bound for any tokenizer


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", default=None,
                        help=f"hub id, model folder or bundled name (default: {BUNDLED_LM})")
    parser.add_argument("--text", default="heldout", metavar="FILE|" + "|".join(SOURCES),
                        help="text to evaluate on: a .txt file, heldout (default, offline), train, or wikitext2 "
                             "(needs the Hugging Face hub)")
    parser.add_argument("--ctx", type=int_option(1, MAX_CTX), default=None,
                        help="tokens per window (default: the model's context, at most 2048)")
    parser.add_argument("--stride", type=int_option(1, MAX_CTX), default=None,
                        help="tokens between window starts; less than --ctx gives sliding windows (default: ctx)")
    parser.add_argument("--max-tokens", type=int_option(1, MAX_TOKENS), default=None,
                        help="evaluate only the first N tokens of the text (only as much text is read)")
    parser.add_argument("--batch-size", type=int_option(1, 4096), default=None,
                        help="windows per forward pass (default: automatic)")
    parser.add_argument("--sentences", type=int_option(1, 100_000), default=128,
                        help="sentences for an encoder's fidelity")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    add_dtype_option(parser)
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    parser.add_argument("--sequential", action="store_true",
                        help="one block in memory at a time, for a causal LM larger than memory (a local "
                             "safetensors folder, full precision or a compressed-tensors / GPTQ / AWQ export)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from quantlab.models.loading import load_model  # here, not at the top: --help need not import transformers

    config = EvalConfig(ctx=args.ctx, stride=args.stride, max_tokens=args.max_tokens, batch_size=args.batch_size,
                        n_sentences=args.sentences)
    # Before the model, so that a bad text fails at once; only as much as --max-tokens can use.
    text = load_text(args.text, max_chars=args.max_tokens * CHARS_PER_TOKEN_READ if args.max_tokens else None)
    if args.sequential:
        return run_sequential(args, config, text)
    loaded = load_model(args.source, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    result = evaluate(loaded.model, loaded.tokenizer, loaded.kind, text, config)
    payload = {"model": loaded.name, "kind": loaded.kind, "text": str(args.text)} | result.to_dict()
    emit(payload, args.json, describe(printable(loaded.name), printable(str(args.text)), result))
    return 0


def run_sequential(args: argparse.Namespace, config: EvalConfig, text: str) -> int:
    """``--sequential``: the windows go through one block at a time (``runs.sequential_eval``)."""
    from quantlab.cli.quantize_cmd import line_progress, stderr_progress
    from quantlab.device import resolve_device
    from quantlab.errors import FormatError
    from quantlab.models.lazy import open_lazy
    from quantlab.models.loading import model_kind
    from quantlab.runs.sequential_eval import perplexity_sequential

    resolve_device(args.device)  # a bogus --device fails before the model opens
    lazy = open_lazy(args.source, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                     prequantized_ok=True)
    if model_kind(lazy.model.config) != "causal":
        raise FormatError(f"--sequential evaluates causal LMs; {printable(lazy.name)} is an encoder (evaluate it "
                          "in memory: it is small enough)")

    def block_line(report) -> None:
        print(f"quantlab: {report.describe()}", file=sys.stderr, flush=True)

    progress = stderr_progress if sys.stderr.isatty() else line_progress
    result = perplexity_sequential(lazy, text, config, progress, on_block=block_line)
    payload = {"model": lazy.name, "kind": "causal", "text": str(args.text), "sequential": True} | result.to_dict()
    emit(payload, args.json, describe(printable(lazy.name), printable(str(args.text)), result))
    return 0


def describe(name: str, text: str, result: PerplexityResult | FidelityResult) -> str:
    """Each number with its definition: users compare them across tools."""
    definitions = result.definitions()
    if isinstance(result, FidelityResult):
        lines = [f"{name} on {text}: fidelity {result.fidelity:.6f} (min {result.min_cosine:.6f})",
                 "  (a model against itself; quantize it to see fidelity drop)"]
    else:
        lines = [f"{name} on {text}:",
                 f"  perplexity       {result.perplexity:12.4f}",
                 f"  word perplexity  {result.word_perplexity:12.4f}",
                 f"  bits per byte    {result.bits_per_byte:12.4f}"]
    return "\n".join(lines + [f"  {key}: {text}" for key, text in definitions.items()])
