"""lm-eval on QuantLab's own model objects: a cross-check of the perplexity, and lm-eval's standard tasks.

**Why the numbers agree.** lm-eval's ``loglikelihood_rolling`` with ``max_length = L`` puts a
prefix token (BOS, else EOS) in front of the document, then feeds windows of L tokens that each
predict the next L tokens, every window starting where the previous one's predictions ended, the
last one aligned to the end of the text. In QuantLab's terms (windows that include the token they
predict last) that is ``ctx = L + 1``, ``stride = L``, ``prepend_bos=True``: every text token
scored exactly once, with the same context as lm-eval gives it. :func:`matching_config` returns
those settings. Word perplexity and bits per byte then divide the same total NLL by the same word
and byte counts (lm-eval's wikitext ``process_results`` is used as is), so the two agree to
float rounding. GPTQ-style settings (``stride == ctx``) differ slightly by design: they leave the
first token of every window unscored.

The local task needs no download: its single document is the given text, served by a
``custom_dataset`` callable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from quantlab.errors import DataError, FormatError
from quantlab.evaluation.config import EvalConfig
from quantlab.evaluation.scoring import model_device

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("wikitext", "hellaswag", "arc_easy")
_LOCAL_TASK = "quantlab_local_text"
_ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
# lm-eval's own defaults for these metrics, spelled out so that it does not warn about each one.
_AGGREGATIONS = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                 "bits_per_byte": "bits_per_byte"}


@dataclass(frozen=True)
class LmEvalRolling:
    """lm-eval's wikitext metrics for one local text."""

    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    max_length: int

    def to_dict(self) -> dict:
        return {"word_perplexity": self.word_perplexity, "byte_perplexity": self.byte_perplexity,
                "bits_per_byte": self.bits_per_byte, "max_length": self.max_length}


def matching_config(max_length: int, batch_size: int | None = None, dtype: str | None = None) -> EvalConfig:
    """QuantLab settings that score exactly the tokens, with exactly the context, that lm-eval does."""
    return EvalConfig(ctx=max_length + 1, stride=max_length, prepend_bos=True, batch_size=batch_size, dtype=dtype)


def _hflm(model, tokenizer, max_length: int | None, batch_size: int):
    """lm-eval's HF wrapper around an already loaded model, with our tokenizer passed explicitly."""
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise DataError("this model has no tokenizer, so lm-eval cannot run on it")
    return HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                device=str(model_device(model)))


def _one_document(text: str, **_metadata):
    """The local task's dataset: one test document holding the whole text (lm-eval passes metadata in)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"page": text}])})


def _page(doc: dict) -> str:
    return doc["page"]


def lm_eval_rolling(model, tokenizer, text: str, max_length: int, batch_size: int = 8) -> LmEvalRolling:
    """lm-eval's rolling log-likelihood of ``model`` on ``text``, through a local wikitext-like task."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    metrics = [{"metric": name, "aggregation": _AGGREGATIONS[name], "higher_is_better": False}
               for name in _ROLLING_METRICS]
    task = {
        "task": _LOCAL_TASK, "custom_dataset": partial(_one_document, text), "test_split": "test",
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": _page,
        "process_results": process_results, "metric_list": metrics,
    }
    lm = _hflm(model, tokenizer, max_length, batch_size)
    # A manager without lm-eval's built-in tasks: indexing their 14k configs would take ~10 s.
    output = lm_eval.simple_evaluate(model=lm, tasks=[task], bootstrap_iters=0, log_samples=False,
                                     task_manager=TaskManager(include_defaults=False))
    scores = output["results"][_LOCAL_TASK]
    return LmEvalRolling(*(float(scores[f"{name},none"]) for name in _ROLLING_METRICS), max_length=max_length)


def run_lm_eval_tasks(model, tokenizer, tasks=DEFAULT_TASKS, limit: int | float | None = None,
                      batch_size: int = 8, max_length: int | None = None) -> dict[str, dict[str, float]]:
    """lm-eval's standard tasks (they download their data, so the hub must be reachable).

    Returns ``{task: {metric: value}}`` with lm-eval's metric names (``acc,none``, ``word_perplexity,none``, ...).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from quantlab.texts.sources import hub_unreachable_reason
    from quantlab.models.loading import hub_offline

    reason = "HF_HUB_OFFLINE is set" if hub_offline() else hub_unreachable_reason()
    if reason is not None:
        raise DataError(f"lm-eval's tasks ({', '.join(tasks)}) download their data from the Hugging Face hub, "
                        f"which cannot be reached ({reason}); offline, use QuantLab's perplexity on the "
                        "held-out text or a local .txt file")
    # Indexing lm-eval's task folders takes seconds, so it comes after the (fast) offline check.
    manager = TaskManager()
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise FormatError(f"lm-eval has no task {', '.join(unknown)}; `lm_eval ls tasks` lists them "
                          f"(try {', '.join(DEFAULT_TASKS)})")
    lm = _hflm(model, tokenizer, max_length, batch_size)
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, bootstrap_iters=0,
                                         log_samples=False, task_manager=manager)
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise DataError(f"lm-eval could not fetch its task data: {exc}") from None
    return {task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for task, metrics in output["results"].items()}
