"""llm-compressor's GPTQModifier on a folder, with QuantLab's calibration token ids (run by bench_scale.py).

Runs in the peer virtual environment (llm-compressor pins its own transformers), not QuantLab's:

    PEER_PYTHON bench/peer_gptq.py MODEL_FOLDER CALIB_IDS.pt

W4A16 is symmetric INT4 with groups of 128, the same format as QuantLab's ``gptq int4 g128``.
Prints ``oneshot_s SECONDS`` (calibration and quantization, no saving) on stderr.
"""

import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    folder, ids_path = sys.argv[1], sys.argv[2]
    ids = torch.load(ids_path, weights_only=True)  # (N, L) int64, QuantLab's calibration windows
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, tokenizer=tokenizer,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    print(f"oneshot_s {time.perf_counter() - started:.2f}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
