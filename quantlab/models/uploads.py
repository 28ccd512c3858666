"""Where a server keeps uploaded checkpoints: a folder per session, removed when the session ends.

A workshop server runs for hours while browsers come and go. Each session's uploads live in
``<root>/session-<id>.<random>``; the folder is removed when the session ends (the app calls ``remove``),
and, for sessions that vanish without ending (a closed laptop, a dropped network), by ``sweep``:
a folder whose session is known to be gone and that has not been touched for ``grace_s``, or any
folder untouched for ``idle_s``, is deleted. The app touches its session's folder on every page run,
and writes an upload again from the browser's copy when it finds it gone, so a sweep never breaks a
live page. The whole space holds at most ``max_bytes``: an upload that would pass it is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import ModelLoadError

log = logging.getLogger(__name__)

SESSION_PREFIX = "session-"
_SAFE_ID = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class UploadSpace:
    """A server's upload folder and its limits."""

    root: Path
    max_bytes: int = 2 * 2**30  # all sessions together; a room of 30 uploading 60 MB checkpoints fits
    idle_s: float = 3600.0  # a folder untouched this long goes, whoever it belongs to
    grace_s: float = 120.0  # a session known to be gone keeps its folder this long (Streamlit may resume it)

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.idle_s <= 0 or self.grace_s < 0:
            raise ValueError("UploadSpace needs max_bytes >= 1, idle_s > 0 and grace_s >= 0")

    def folder(self, session_id: str) -> Path:
        """A new folder for the session: ``session-<id>.<random>`` (the id tells the sweep whose it is).

        The random part keeps two holders of one id apart (every AppTest session is "test_session_id").
        """
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{SESSION_PREFIX}{_SAFE_ID.sub('_', session_id)[:64]}.", dir=self.root))

    def save(self, folder: Path, data: bytes, suffix: str, label: str = "the file") -> Path:
        """``data`` into ``folder`` under its content hash (never the uploader's name), within the byte cap.

        ``label``: how messages name the file, the name it was uploaded under (``display_name``).
        """
        path = folder / f"upload-{hashlib.sha256(data).hexdigest()[:20]}{suffix}"
        if path.is_file():
            return path
        used = self.used_bytes()
        if used + len(data) > self.max_bytes:
            raise ModelLoadError(
                f"{label} ({len(data) / 2**20:.1f} MB) does not fit: this server's upload space is full ({used / 2**20:.0f} of {self.max_bytes / 2**20:.0f} MB in use "
                "by open sessions); try again when other sessions end, or inspect the file with the command line")
        handle, temp = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
        return path

    def used_bytes(self) -> int:
        total = 0
        for folder, _, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except OSError:  # removed by a sweep in another thread meanwhile
                    continue
        return total

    def sweep(self, is_live: Callable[[str], bool | None] | None = None, now: float | None = None) -> list[Path]:
        """Remove abandoned session folders; returns them. ``is_live(id)``: True, False, or None (unknown)."""
        now = time.time() if now is None else now
        removed = []
        for folder in self._session_folders():
            idle = now - _mtime(folder)
            live = is_live(session_of(folder)) if is_live else None
            if idle > self.idle_s or (live is False and idle > self.grace_s):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        if removed:
            log.info("removed %d abandoned upload folder(s) under %s", len(removed), self.root)
        return removed

    def _session_folders(self) -> list[Path]:
        try:
            return [p for p in self.root.iterdir() if p.name.startswith(SESSION_PREFIX) and p.is_dir()]
        except FileNotFoundError:
            return []


MAX_NAME_CHARS = 120  # a browser sends any name; a message shows at most this much of it


def display_name(name: str) -> str:
    """The name a file was uploaded under, as a message may show it: printable, bounded, never a path."""
    shown = "".join(c if c.isprintable() else "?" for c in Path(name.replace("\\", "/")).name) or "the uploaded file"
    return shown if len(shown) <= MAX_NAME_CHARS else shown[:MAX_NAME_CHARS - 1] + "…"


def in_user_terms(message: str, stored: Path, uploaded_as: str) -> str:
    """A message about a stored upload that names the file as the user knows it, not by its content hash.

    The readers' messages name the file they opened (``upload-<hash>.safetensors``, or its whole path);
    the user uploaded ``model.safetensors`` and looks for that name.
    """
    return message.replace(str(stored), uploaded_as).replace(stored.name, uploaded_as)


def session_of(folder: Path) -> str:
    """The session id a folder was made for (``session-<id>.<random>``)."""
    return folder.name.removeprefix(SESSION_PREFIX).split(".")[0]


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def touch(folder: Path) -> None:
    """Mark a session folder as in use now (its modification time is the sweep's clock)."""
    try:
        os.utime(folder)
    except OSError:  # swept meanwhile: the next save creates it again
        pass


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def remove_stale_roots(parent: Path, prefix: str) -> list[Path]:
    """Upload roots ``<parent>/<prefix><pid>`` of server processes that are no longer running."""
    removed = []
    for root in parent.glob(f"{prefix}*"):
        pid = root.name.removeprefix(prefix)
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or a pid no system has: leave it
        return True
    return True
