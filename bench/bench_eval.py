"""Throughput of QuantLab's perplexity evaluator against lm-eval's, on the same model and text, in one run.

    python bench/bench_eval.py [--max-chars 60000] [--max-length 256] [--batch-size 8] [--repeats 3]

Both score the same tokens with the same context (``matching_config``: lm-eval's rolling windows),
so their word perplexities must agree; the ratio compares tokens per second end to end (tokenizing,
windowing, forward passes, log-softmax; for lm-eval also its task setup). Runs alternate and the
best of ``--repeats`` counts, so a busy machine penalises both alike. Target: ratio >= 1.0.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from quantlab.evaluation import (  # noqa: E402  (after the path setup)
    lm_eval_rolling, load_text, matching_config, perplexity,
)
from quantlab.models.loading import load_model  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="model (default: the bundled LM)")
    parser.add_argument("--max-chars", type=int, default=60_000, help="held-out text to score")
    parser.add_argument("--max-length", type=int, default=256, help="lm-eval's max_length (QuantLab ctx = +1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    loaded = load_model(args.source, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    text = load_text("heldout", max_chars=args.max_chars)
    config = matching_config(args.max_length, batch_size=args.batch_size)

    def ours():
        return perplexity(model, tokenizer, text, config)

    def theirs():
        return lm_eval_rolling(model, tokenizer, text, args.max_length, batch_size=args.batch_size)

    ours(), theirs()  # warm-up: first calls pay for imports and allocator growth
    timings = {"quantlab": [], "lm-eval": []}
    results = {}
    for _ in range(args.repeats):  # alternate, so background load hits both evaluators alike
        for name, fn in (("quantlab", ours), ("lm-eval", theirs)):
            seconds, results[name] = _timed(fn)
            timings[name].append(seconds)
    tokens = results["quantlab"].tokens  # lm-eval scores the same tokens (checked by the cross-check test)
    rate = {name: tokens / min(seconds) for name, seconds in timings.items()}
    word_ppl = {"quantlab": results["quantlab"].word_perplexity, "lm-eval": results["lm-eval"].word_perplexity}

    print(f"model {loaded.name} on {model.device}, {tokens:,} tokens of held-out text, "
          f"max_length {args.max_length}, batch {args.batch_size}, best of {args.repeats}")
    print(f"{'evaluator':<10} {'best s':>8} {'tokens/s':>10} {'word ppl':>12} {'token ppl':>10}")
    for name in ("quantlab", "lm-eval"):
        token_ppl = f"{results[name].perplexity:10.4f}" if name == "quantlab" else f"{'-':>10}"
        print(f"{name:<10} {min(timings[name]):8.2f} {rate[name]:10.0f} {word_ppl[name]:12.4f} {token_ppl}")
    print(f"throughput ratio quantlab / lm-eval: {rate['quantlab'] / rate['lm-eval']:.2f}x (target >= 1.0x)")
    print(f"word perplexity relative difference: {word_ppl['quantlab'] / word_ppl['lm-eval'] - 1:+.2e}")


if __name__ == "__main__":
    main()
