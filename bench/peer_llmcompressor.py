"""The peer side of bench_peers.py: llm-compressor quantizes a model on given calibration windows.

Runs in llm-compressor's own virtual environment (it pins other transformers / compressed-tensors
versions than QuantLab), so it imports nothing from QuantLab. It reads the windows that
bench_peers.py drew and saved, runs ``oneshot`` with the tool's defaults for the method, saves the
compressed-tensors checkpoint and prints one JSON line: {"seconds": quantization wall time}.

    PEER_PYTHON bench/peer_llmcompressor.py --model DIR --calib FILE --method gptq --scheme W4A16 --out DIR [--encoder]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

METHODS = ("rtn", "gptq", "awq")
# The tool's INT4 presets, plus what it has no preset for: INT8 per-channel (its W8A16 preset is
# group 128 in compressed-tensors 0.19, not per-channel) and INT3 g128.
SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16_CHANNEL", "W3A16_G128", "W3A16_G128_ASYM")
CUSTOM = {"W8A16_CHANNEL": (8, "channel", None), "W3A16_G128": (3, "group", 128), "W3A16_G128_ASYM": (3, "group", 128)}


def scheme_kwargs(scheme: str) -> dict:
    """``scheme=...`` for a preset, or ``config_groups`` for the schemes it has no preset for."""
    if scheme not in CUSTOM:
        return {"scheme": scheme, "targets": ["Linear"]}
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits, strategy, group = CUSTOM[scheme]
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=not scheme.endswith("ASYM"), strategy=strategy,
                               group_size=group)
    return {"config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}}


def modifier(method: str, scheme: str, encoder: bool):
    # QuantLab quantizes the blocks' linears: not the LM head, nor BERT's pooler (unused by mean pooling).
    kwargs = scheme_kwargs(scheme) | {"ignore": ["re:.*pooler.*"] if encoder else ["lm_head"]}
    if method == "rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(**kwargs)
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(**kwargs)  # its defaults: actorder static, dampening 0.01, block 128
    import torch
    from llmcompressor.modifiers.awq import AWQModifier

    if not torch.cuda.is_available():
        # On CPU its intermediates cache pins memory, which fails without an accelerator (PEERS.md).
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return AWQModifier(**kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="safetensors file with input_ids (N, T)")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--scheme", required=True, choices=SCHEMES)
    parser.add_argument("--out", required=True)
    parser.add_argument("--encoder", action="store_true", help="load an encoder (AutoModel, e.g. BertModel)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    ids = load_file(args.calib)["input_ids"]  # (N, T): exactly the windows QuantLab calibrates on
    model = (AutoModel if args.encoder else AutoModelForCausalLM).from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = {}
    if args.method != "rtn":  # RTN is data-free in llm-compressor
        dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        data = {"dataset": dataset, "num_calibration_samples": ids.shape[0], "max_seq_length": ids.shape[1]}
    start = time.perf_counter()
    oneshot(model=model, recipe=modifier(args.method, args.scheme, args.encoder), **data)
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
