"""Encoder quality after quantization: how close the sentence embeddings stay to full precision.

Fidelity is the mean, over a fixed set of sentences, of the cosine similarity between the
quantized and the full-precision embedding of each sentence. Embeddings are mean-pooled over the
tokens the attention mask marks as real (padding excluded), as sentence-transformers pools
all-MiniLM-L6-v2. Cosine ignores the final L2 normalisation that model applies.

    >>> reference = embed(model_fp, tokenizer, sentences(load_text("heldout")))   # doctest: +SKIP
    >>> embedding_fidelity(model_q, tokenizer, sentence_list, reference).fidelity  # doctest: +SKIP
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantlab.texts.tokens import tokenize
from quantlab.errors import FormatError
from quantlab.evaluation.scoring import check_finite, compute_context, compute_dtype_name, model_device


@dataclass(frozen=True)
class FidelityResult:
    fidelity: float  # mean cosine similarity, 1.0 = unchanged
    min_cosine: float  # the sentence that moved most
    n_sentences: int
    max_sentence_tokens: int
    dtype: str
    fidelity_se: float = math.nan  # standard error of the mean cosine over the sentences

    metric = "fidelity"  # the headline metric, so sweeps can treat causal and encoder results alike

    @property
    def value(self) -> float:
        return self.fidelity

    def definitions(self) -> dict[str, str]:
        return {
            "fidelity": f"mean cosine similarity of quantized vs full-precision mean-pooled embeddings over "
                        f"{self.n_sentences} sentences (at most {self.max_sentence_tokens} tokens each); {self.dtype}",
            "min_cosine": "lowest cosine similarity over those sentences",
        }

    def to_dict(self) -> dict:
        return {"fidelity": self.fidelity, "min_cosine": self.min_cosine, "n_sentences": self.n_sentences,
                "max_sentence_tokens": self.max_sentence_tokens, "dtype": self.dtype, "fidelity_se": self.fidelity_se,
                "definitions": self.definitions()}


def embed(model, tokenizer, sentences: list[str], batch_size: int = 32, max_tokens: int = 128,
          dtype: str | None = None) -> torch.Tensor:
    """Mean-pooled embeddings (n, hidden) in fp32 on the CPU."""
    device = model_device(model)
    pooled = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenize(tokenizer, sentences[start : start + batch_size], padding=True, truncation=True,
                         max_length=max_tokens, return_tensors="pt").to(device)
        with torch.inference_mode(), compute_context(model, dtype):
            hidden = _last_hidden_state(model, batch)  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        # fp32 sums: bf16 would round the pooled mean before the cosine sees it.
        pooled.append(((hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).cpu())  # (B, H)
    return torch.cat(pooled)


def _last_hidden_state(model, batch) -> torch.Tensor:
    out = model(**batch)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:  # a model with a head (e.g. *ForMaskedLM) returns logits; ask for its hidden states
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    return hidden


def embedding_fidelity(model_q, tokenizer, sentences: list[str], reference, batch_size: int = 32,
                       max_tokens: int = 128, dtype: str | None = None) -> FidelityResult:
    """Fidelity of ``model_q`` to ``reference``: a full-precision model, or its :func:`embed` output."""
    if isinstance(reference, torch.nn.Module):
        reference = embed(reference, tokenizer, sentences, batch_size, max_tokens)
    if not isinstance(reference, torch.Tensor):
        raise FormatError(f"an encoder's reference must be its full-precision model or embeddings, "
                          f"not {type(reference).__name__}")
    if reference.shape[0] != len(sentences):
        raise FormatError(f"the reference has {reference.shape[0]} embeddings for {len(sentences)} sentences; "
                          "embed the same sentences")
    quantized = embed(model_q, tokenizer, sentences, batch_size, max_tokens, dtype)
    cosines = F.cosine_similarity(quantized.double(), reference.double(), dim=-1)  # (n,)
    fidelity = check_finite(model_q, float(cosines.mean()), "fidelity")
    # Sentences are independent draws: the SE of their mean cosine is std / sqrt(n) (NaN for one sentence).
    se = float(cosines.std(unbiased=True)) / math.sqrt(len(sentences)) if len(sentences) > 1 else math.nan
    return FidelityResult(fidelity, float(cosines.min()), len(sentences), max_tokens,
                          compute_dtype_name(model_q, dtype), se)
