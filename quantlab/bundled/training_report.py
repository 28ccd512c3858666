"""Measure the bundled LM and write its model card (README.md in the model folder).

    python -m quantlab.bundled.training_report            # about 3 minutes on a 2-core CPU

Everything in the card is measured here, on the held-out half of the split in ``quantlab.texts.corpus``:
full-precision perplexity, a unigram baseline on the same tokens, the rise in perplexity under RTN
and calibrated quantization (the "do the blocks matter" check), and a greedy generation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from pathlib import Path

import torch

from quantlab.texts import corpus
from quantlab.evaluation import EvalConfig
from quantlab.models.loading import BUNDLED_LM, load_model, resolve_source
from quantlab.runs.pipeline import QuantSession, quantize_model, sweep_configs

log = logging.getLogger(__name__)
CARD_CONFIGS = ("fp", "rtn-int8", "rtn-int4", "rtn-int4-g128", "rtn-int3-g128", "gptq-int4-g128",
                "awq-int4-g128", "gptq-int3-g128")
PROMPT = "def read_config(path):\n    "


def unigram_perplexity(train_ids: list[int], heldout_ids: list[int], vocab_size: int) -> float:
    """Perplexity of add-one-smoothed unigram frequencies from the training tokens on held-out tokens."""
    counts = Counter(train_ids)
    total = len(train_ids) + vocab_size
    nll = -sum(math.log((counts[t] + 1) / total) for t in heldout_ids) / len(heldout_ids)
    return math.exp(nll)


def greedy_sample(loaded, prompt: str, new_tokens: int = 64) -> str:
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=loaded.tokenizer.eos_token_id)
    return loaded.tokenizer.decode(out[0], skip_special_tokens=True)


def measure(source: str | None) -> dict:
    loaded = load_model(source)
    session = QuantSession(loaded, corpus.read_split("heldout"), EvalConfig(ctx=256))
    rows = []
    for config in sweep_configs(list(CARD_CONFIGS)):
        _, result = quantize_model(loaded, config, session=session)
        rows.append({"config": config.name, "bits_per_weight": result.bits_per_weight,
                     "perplexity": result.quality["perplexity"], "kl_divergence": result.quality.get("kl_divergence"),
                     "seconds": result.seconds})
        log.info("%s: %.3f", config.name, rows[-1]["perplexity"])
    tok = loaded.tokenizer
    train_ids = tok(corpus.read_split("train"), add_special_tokens=False).input_ids
    heldout_ids = tok(corpus.read_split("heldout"), add_special_tokens=False).input_ids
    return {
        "rows": rows,
        "unigram_perplexity": unigram_perplexity(train_ids, heldout_ids, len(tok)),
        "heldout_tokens": len(heldout_ids),
        "train_tokens": len(train_ids),
        "n_params": sum(p.numel() for p in loaded.model.parameters()),
        "sample": greedy_sample(loaded, PROMPT),
    }


def render_card(figures: dict, training: dict) -> str:
    fp = figures["rows"][0]["perplexity"]
    table = "\n".join(
        f"| {r['config']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / fp - 1):+.2f}% "
        f"| {r['kl_divergence'] or 0:.4f} |" for r in figures["rows"])
    cfg = training["config"]
    tokens = training["step"] * cfg["batch_size"] * cfg["seq_len"]
    return CARD_TEMPLATE.format(
        n_params=figures["n_params"], params_m=figures["n_params"] / 1e6, tokens_m=tokens / 1e6,
        hours=training["seconds"] / 3600, fp=fp, unigram=figures["unigram_perplexity"],
        heldout_tokens=figures["heldout_tokens"], train_tokens=figures["train_tokens"], table=table,
        sample=figures["sample"], epochs=tokens / figures["train_tokens"], **cfg,
    )


CARD_TEMPLATE = """---
license: mit
language: code
library_name: transformers
pipeline_tag: text-generation
---
# pystdlib-llama-4m

QuantLab's bundled causal LM: a small Llama-style model (`LlamaForCausalLM`) trained by this project
on the Python standard library, so that quantization can be studied on a real trained model with
no network. Trained with `python -m quantlab.bundled.training` (seeded, resumable); this card is written by
`python -m quantlab.bundled.training_report`, which measures every figure below.

## Model
- {n_params:,} parameters ({params_m:.1f}M): hidden {hidden_size}, {n_layers} blocks, {n_heads} heads,
  MLP {intermediate_size} (divisible by 128, so per-channel, g32, g64 and g128 are distinct), tied embeddings.
- Byte-level BPE tokenizer with {vocab_size} tokens, trained with `tokenizers` on the training split.

## Data
The Python standard library source of the interpreter (CPython 3.11 here), without test suites,
`site-packages` and generated files (codec tables, `pydoc_data`, `_sysconfigdata`), split by a
SHA-256 hash of each file's path: 1 file in 20 is held out. {train_tokens:,} training tokens,
{heldout_tokens:,} held-out tokens. The held-out text is QuantLab's default evaluation source
offline, the training text its default calibration source.

## Training
{tokens_m:.1f}M tokens ({epochs:.1f} passes over the training split) in batches of {batch_size} x {seq_len},
AdamW (lr {lr}, betas 0.9/0.95, weight decay {weight_decay}), linear warm-up then cosine decay
(one cycle), bf16 autocast, gradient clipping at 1.0, seed {seed}; {hours:.2f} hours on a 2-core CPU
shared with other work.

## Evaluation (held-out split, windows of 256 tokens, non-overlapping)
- Perplexity **{fp:.2f}**; a unigram model of the training tokens (add-one smoothing) scores
  **{unigram:.1f}** on the same tokens.
- What quantization does to it (KL: mean KL divergence of the next-token distribution against full
  precision, same windows):

| configuration | bits / weight | perplexity | vs full precision | KL |
|---|---|---|---|---|
{table}

RTN INT4 per-channel and RTN INT3 g128 raise perplexity clearly: the blocks matter, and calibrated
methods (GPTQ, AWQ) have room to recover.

## Greedy generation
```python
{sample}
```
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUNDLED_LM)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    folder = Path(resolve_source(args.model))
    training = json.loads((folder / "training_log.json").read_text())
    figures = measure(str(folder))
    (folder / "README.md").write_text(render_card(figures, training))
    (folder / "evaluation.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
