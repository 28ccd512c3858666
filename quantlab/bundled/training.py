"""Train the bundled causal LM on the Python standard library (CPU, seeded, resumable).

    python -m quantlab.bundled.training --out assets/models/pystdlib-llama-4m --total-tokens 20e6

The run checkpoints to ``--work`` every ``--ckpt-every`` steps and resumes from there when started
again with the same arguments, so a long CPU run can span several sessions. Batches are drawn
from a generator seeded with (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quantlab.texts import corpus

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 4096  # small BPE: Python code compresses well and the embedding stays cheap
    hidden_size: int = 256
    intermediate_size: int = 768  # divisible by 128 so per-channel, g32, g64, g128 all differ
    n_layers: int = 4
    n_heads: int = 4  # head_dim 64
    seq_len: int = 256
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.1
    total_tokens: int = 20_000_000
    warmup_frac: float = 0.05
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / (self.batch_size * self.seq_len))


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2): every byte is representable, so no text is ever <unk>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(text), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def _chunks(text: str, size: int = 1 << 16):
    for start in range(0, len(text), size):
        yield text[start : start + size]


def build_model(cfg: TrainConfig) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.seq_len,  # the trained context: RoPE beyond it degrades fast
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    ids: list[int] = []
    for chunk in _chunks(text, 1 << 20):
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.int32)


def batch_at(tokens: torch.Tensor, step: int, cfg: TrainConfig) -> torch.Tensor:
    """The batch for ``step``: random windows from a generator seeded by (seed, step)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - cfg.seq_len, (cfg.batch_size,), generator=gen)
    # transformers shifts labels inside the model, so inputs and labels are the same window
    return torch.stack([tokens[s : s + cfg.seq_len] for s in starts.tolist()]).long()  # (B, T)


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, tokens: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    model.eval()
    n = min(max_windows, len(tokens) // seq_len)
    windows = tokens[: n * seq_len].long().view(n, seq_len)
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    model.train()
    return sum(losses) / len(losses)


def _lr_lambda(cfg: TrainConfig):
    warmup = max(1, int(cfg.warmup_frac * cfg.total_steps))

    def factor(step: int) -> float:  # linear warm-up, cosine decay to 1% (one-cycle)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.total_steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def prepare(cfg: TrainConfig, work: Path) -> tuple[PreTrainedTokenizerFast, torch.Tensor, torch.Tensor]:
    """Tokenizer and token tensors, built once and cached in ``work``."""
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        tokenizer = train_tokenizer(corpus.read_split("train"), cfg.vocab_size)
        tokenizer.save_pretrained(tok_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    cache = work / "tokens.pt"
    if not cache.exists():
        torch.save({"train": encode(tokenizer, corpus.read_split("train")),
                    "heldout": encode(tokenizer, corpus.read_split("heldout"))}, cache)
    data = torch.load(cache, weights_only=True)
    return tokenizer, data["train"], data["heldout"]


def train(cfg: TrainConfig, out: Path, work: Path, ckpt_every: int) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer, train_tokens, heldout_tokens = prepare(cfg, work)
    log.info("train tokens %d, held-out tokens %d, steps %d", len(train_tokens), len(heldout_tokens), cfg.total_steps)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    state = {"step": 0, "seconds": 0.0, "history": []}
    ckpt = work / "checkpoint.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = saved["state"]
        log.info("resumed at step %d", state["step"])
    model.train()
    t0 = time.perf_counter() - state["seconds"]
    while state["step"] < cfg.total_steps:
        batch = batch_at(train_tokens, state["step"], cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        step = state["step"]
        if step % 50 == 0:
            tps = step * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)
            log.info("step %d/%d loss %.3f lr %.2e %.0f tok/s", step, cfg.total_steps, loss.item(), sched.get_last_lr()[0], tps)
        if step % ckpt_every == 0 or step == cfg.total_steps:
            state["seconds"] = time.perf_counter() - t0
            val = heldout_loss(model, heldout_tokens, cfg.seq_len)
            state["history"].append({"step": step, "tokens": step * cfg.batch_size * cfg.seq_len, "heldout_loss": val})
            log.info("step %d held-out loss %.3f ppl %.2f", step, val, math.exp(val))
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "state": state}, ckpt)
            save_hf(model, tokenizer, out, cfg, state)


def save_hf(model: LlamaForCausalLM, tokenizer, out: Path, cfg: TrainConfig, state: dict) -> None:
    """Write the Hugging Face folder (config, safetensors weights, tokenizer, training log)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps({"config": asdict(cfg), **state}, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("assets/models/pystdlib-llama-4m"))
    parser.add_argument("--work", type=Path, default=Path(".cache/train"))
    parser.add_argument("--total-tokens", type=float, default=20e6)
    parser.add_argument("--ckpt-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(total_tokens=int(args.total_tokens), seed=args.seed)
    train(cfg, args.out, args.work, args.ckpt_every)


if __name__ == "__main__":
    main()
