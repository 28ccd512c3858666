"""llm-compressor's GPTQModifier on a folder, with QuantLab's calibration token ids (run by bench_scale.py).

Runs in the peer virtual environment (llm-compressor pins its own transformers), not QuantLab's:

    PEER_PYTHON bench/peer_gptq.py MODEL_FOLDER CALIB_IDS.pt

W4A16 is symmetric INT4 with groups of 128, the same format as QuantLab's ``gptq int4 g128``.
Prints ``oneshot_s SECONDS`` (calibration and quantization, no saving) on stderr, and
``block_start I SECONDS`` when decoder block I first runs: its sequential pipeline calibrates,
quantizes and propagates one block before the next starts, so the gaps are its time per block.
"""

import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def mark_block_starts(model, started: float) -> None:
    seen: set[int] = set()

    def marker(index: int):
        def hook(module, args, kwargs):
            values = (*args, *kwargs.values())
            # its graph tracing first calls the blocks with proxies and meta tensors
            traced = any(isinstance(v, torch.fx.Proxy) or (isinstance(v, torch.Tensor) and v.is_meta) for v in values)
            if index not in seen and not traced:
                seen.add(index)
                print(f"block_start {index} {time.perf_counter() - started:.2f}", file=sys.stderr, flush=True)
        return hook

    for index, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(marker(index), with_kwargs=True)


def main() -> None:
    folder, ids_path = sys.argv[1], sys.argv[2]
    ids = torch.load(ids_path, weights_only=True)  # (N, L) int64, QuantLab's calibration windows
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    started = time.perf_counter()
    mark_block_starts(model, started)
    oneshot(model=model, dataset=dataset, recipe=recipe, tokenizer=tokenizer,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    print(f"oneshot_s {time.perf_counter() - started:.2f}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
