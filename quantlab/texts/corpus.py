"""The offline text corpus: the Python standard library of the running interpreter.

Every machine that runs QuantLab has this text, so the bundled model can be trained, calibrated
and evaluated without a network. Files are split deterministically into a training part and a
held-out part by a hash of their path relative to the stdlib root, so the split is the same on
every machine with the same Python version.

    >>> split_of("json/decoder.py")   # doctest: +SKIP
    'train'
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Folders that hold test suites or vendored third-party code rather than library source.
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "pydoc_data"})
# Generated files: codec tables written by gencodec.py, sysconfig data written at build time.
_GENERATED_PREFIXES = ("cp", "mac_", "iso8859", "koi8", "hp_", "ptcp", "tis_", "kz1048", "palmos")
HELDOUT_BUCKETS = 20  # one bucket of twenty (about 5% of files) is held out


@dataclass(frozen=True)
class CorpusFile:
    """One stdlib source file and which side of the split it is on."""

    relative_path: str  # posix path relative to the stdlib root, the key of the split
    path: Path
    split: str  # "train" or "heldout"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """Hash-based split: stable across machines, independent of file order or count."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return "heldout" if digest[0] % HELDOUT_BUCKETS == 0 else "train"


def _is_library_source(relative_path: str) -> bool:
    parts = relative_path.split("/")
    if any(part in _EXCLUDED_DIRS for part in parts[:-1]):
        return False
    name = parts[-1]
    if name.startswith("_sysconfigdata") or name.startswith("test_"):
        return False
    return not (parts[0] == "encodings" and name.startswith(_GENERATED_PREFIXES))


def list_files(root: Path | None = None) -> list[CorpusFile]:
    """All library source files under the stdlib root, sorted by relative path."""
    root = root or stdlib_root()
    files = []
    # os.walk with pruning, not rglob: site-packages may be large and change while we read.
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if _is_library_source(rel):
                files.append(CorpusFile(rel, path, split_of(rel)))
    return sorted(files, key=lambda f: f.relative_path)


def read_split(split: str, root: Path | None = None, max_chars: int | None = None) -> str:
    """Concatenate the files of one split ("train" or "heldout"), each ended by a blank line.

    ``max_chars`` caps the text so that quick evaluations stay quick; files are taken in sorted
    order, so a cap always yields the same prefix.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    chunks: list[str] = []
    total = 0
    for corpus_file in list_files(root):
        if corpus_file.split != split:
            continue
        text = corpus_file.path.read_text(encoding="utf-8", errors="replace")
        chunks.append(text.rstrip() + "\n\n")
        total += len(chunks[-1])
        if max_chars is not None and total >= max_chars:
            break
    joined = "".join(chunks)
    if not joined:
        raise FileNotFoundError(f"no Python standard library source found under {root or stdlib_root()}")
    return joined[:max_chars] if max_chars is not None else joined
