"""Where evaluation text comes from: the bundled held-out corpus, a local or uploaded file, or WikiText-2.

    >>> text = load_text("heldout")          # doctest: +SKIP  (Python stdlib source, offline)
    >>> text = load_text("notes.txt")        # doctest: +SKIP  (any local text file)
    >>> text = load_text("wikitext2")        # doctest: +SKIP  (needs the Hugging Face hub)

Every failure (missing file, empty text, no network) is a ``DataError`` that names a source that
works instead. WikiText-2 is joined with blank lines between its rows, as GPTQ's evaluation does,
so perplexities are comparable with the numbers in the papers.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from quantlab.texts import corpus
from quantlab.errors import DataError

log = logging.getLogger(__name__)

CORPUS_SOURCES = ("heldout", "train")
WIKITEXT2 = "wikitext2"
SOURCES = (*CORPUS_SOURCES, WIKITEXT2)
WIKITEXT2_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
MAX_TEXT_BYTES = 32 * 2**20  # a whole text evaluated at once: WikiText-2's test split is 1.3 MB, its train 11 MB
MIN_CHARS = 200  # below this no window of any useful context fits; say so rather than print a noisy number
HUB_PROBE_TIMEOUT_S = 5.0  # one short request decides "offline" before datasets starts its retries
_WORKS_OFFLINE = "use --text heldout (the bundled held-out text) or a local .txt file"


def load_text(source: str | Path = "heldout", max_chars: int | None = None) -> str:
    """The text of ``source``: ``"heldout"``, ``"train"``, ``"wikitext2"`` or a path to a text file."""
    name = str(source)
    if name in CORPUS_SOURCES:
        text = corpus.read_split(name, max_chars=max_chars)
    elif name == WIKITEXT2:
        text = _wikitext2()
    elif Path(name).expanduser().is_file():  # False for a FIFO or a device: those are never opened
        text = decode_text(_read_bounded(Path(name).expanduser(), max_chars), name)
    elif Path(name).expanduser().exists():
        raise DataError(f"{name} is not a regular file; give a .txt file or one of {', '.join(SOURCES)}")
    else:
        raise DataError(f"no text source {name!r}: not a file, and not one of {', '.join(SOURCES)}")
    text = text[:max_chars] if max_chars is not None else text
    return check_text(text, name)


def _read_bounded(path: Path, max_chars: int | None) -> bytes:
    """The file's bytes: a prefix when only ``max_chars`` characters are wanted, else at most MAX_TEXT_BYTES."""
    limit = MAX_TEXT_BYTES if max_chars is None else 4 * max_chars  # UTF-8: at most 4 bytes a character
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit and max_chars is None:
        raise DataError(f"{path.name} has more than {MAX_TEXT_BYTES // 2**20} MiB of text; evaluate a part of it "
                        "(--max-tokens) or cut the file")
    return data[:limit]


def decode_text(data: bytes, name: str = "uploaded text") -> str:
    """Bytes of a file or an upload as text: UTF-8 (a BOM is dropped), undecodable bytes replaced."""
    text = data.decode("utf-8-sig", errors="replace")
    replaced = text.count("\ufffd")
    if replaced:
        # A Latin-1 or cp1252 file still evaluates; the few replaced characters barely move perplexity.
        log.warning("%s is not valid UTF-8: %d undecodable bytes were replaced by U+FFFD", name, replaced)
    return check_text(text, name)


def check_text(text: str, name: str) -> str:
    """``text`` unchanged, or a DataError when it is too short to evaluate on."""
    if not text.strip():
        raise DataError(f"{name} is empty; {_WORKS_OFFLINE}")
    if len(text) < MIN_CHARS:
        raise DataError(f"{name} has only {len(text)} characters; evaluation needs at least {MIN_CHARS}")
    return text


def hub_unreachable_reason() -> str | None:
    """None when the Hugging Face hub answers a short probe, else why not (no route, timeout, ...)."""
    from huggingface_hub import dataset_info

    try:
        dataset_info(WIKITEXT2_DATASET[0], timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001  any failure of the probe means the hub cannot serve data now
        return _describe(exc)
    return None


def _wikitext2() -> str:
    from quantlab.models.loading import hub_offline

    path, config, split = WIKITEXT2_DATASET
    # With HF_HUB_OFFLINE set, datasets reads its cache without touching the network. Without it, an
    # unreachable hub would cost datasets' retries (minutes), so one short probe decides first.
    reason = None if hub_offline() else hub_unreachable_reason()
    if reason is not None:
        raise DataError(f"WikiText-2 needs the Hugging Face hub, which cannot be reached ({reason}); "
                        f"{_WORKS_OFFLINE} (a cached copy is used with HF_HUB_OFFLINE=1)")
    import datasets  # a heavy import, so only once the hub is known to answer (or the cache is asked for)

    try:
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # noqa: BLE001  datasets raises many types for "not available"; all mean the same here
        raise DataError(f"WikiText-2 cannot be loaded ({_describe(exc)}); {_WORKS_OFFLINE}") from None
    return "\n\n".join(rows["text"])


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str, n: int = 128, min_chars: int = 24, max_chars: int = 300) -> list[str]:
    """``n`` sentences cut deterministically from ``text``, spread evenly over it.

    Lines are split at sentence ends; pieces of ``min_chars``..``max_chars`` characters are kept, so
    code yields its docstring and comment lines and statements, prose its sentences.
    """
    pieces = [p.strip() for line in text.splitlines() for p in _SENTENCE_END.split(line)]
    pieces = [p for p in pieces if min_chars <= len(p) <= max_chars]
    if len(pieces) < min(n, 8):
        raise DataError(f"the text yields only {len(pieces)} sentences of {min_chars}-{max_chars} characters; "
                        "give a longer text")
    if len(pieces) <= n:
        return pieces
    step = len(pieces) / n
    return [pieces[int(i * step)] for i in range(n)]
