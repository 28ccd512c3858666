"""Uploads on a shared server: a folder per browser session, removed when the session ends, within a cap.

The engine's ``quantlab.models.uploads.UploadSpace`` holds the rules (content-hash names, the byte cap,
the sweep of abandoned folders); this module ties them to Streamlit's sessions. Also the server's
``AccessPolicy``: which local paths and whether remote code, as the operator started the server.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import time
import uuid
import weakref
from pathlib import Path

import streamlit as st

from quantlab.errors import ModelLoadError
from quantlab.models import uploads
from quantlab.models.paths import AccessPolicy
from quantlab.models.weightfiles import read_header

_SESSION_FOLDER_KEY = "_quantlab_session_folder"
UPLOAD_ROOT_PREFIX = "quantlab-uploads-"
MAX_UPLOAD_TENSORS = 10_000  # every page walks an upload's matrices; real checkpoints hold < 3,000 per file
SWEEP_EVERY_S = 30.0  # how often a page run looks for abandoned upload folders


# --- what visitors may open: the operator's decision ----------------------------------------------
def server_policy() -> AccessPolicy:
    """Local roots and remote code as the operator started the server (README "Security model")."""
    return AccessPolicy.for_server(st.get_option("server.address"))


# --- per-session upload folder ---------------------------------------------------------------------
@functools.cache
def upload_space() -> uploads.UploadSpace:
    """This server process's upload folder (removed at exit); limits from the environment (README)."""
    parent = Path(tempfile.gettempdir())
    uploads.remove_stale_roots(parent, UPLOAD_ROOT_PREFIX)  # left by servers that were killed
    root = parent / f"{UPLOAD_ROOT_PREFIX}{os.getpid()}"
    atexit.register(shutil.rmtree, str(root), True)
    return uploads.UploadSpace(root, max_bytes=_env_number("QUANTLAB_UPLOAD_SPACE_MB", 2048) * 2**20,
                               idle_s=_env_number("QUANTLAB_UPLOAD_IDLE_S", 3600),
                               grace_s=_env_number("QUANTLAB_UPLOAD_GRACE_S", 120))


def _env_number(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else default


class SessionFolder:
    """A session's upload folder, removed when the browser session that holds it ends.

    Streamlit drops a session's state when the session closes; the finalizer then removes the
    folder (and at interpreter exit for sessions still open). Sessions that vanish without their
    state being collected are removed by ``sweep_uploads``.
    """

    def __init__(self, session_id: str | None = None) -> None:
        self.path = upload_space().folder(session_id or uuid.uuid4().hex)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def remove(self) -> None:
        self._finalizer()


def _session_id() -> str | None:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else None


def _session_is_live(session_id: str) -> bool | None:
    """Whether Streamlit still has this session connected; None where no server runtime runs (AppTest)."""
    from streamlit.runtime import Runtime

    return Runtime.instance().is_active_session(session_id) if Runtime.exists() else None


_last_sweep = [0.0]


def sweep_uploads(force: bool = False) -> None:
    """Remove upload folders of sessions that are gone; at most every SWEEP_EVERY_S seconds."""
    if force or time.monotonic() - _last_sweep[0] > SWEEP_EVERY_S:
        _last_sweep[0] = time.monotonic()
        upload_space().sweep(_session_is_live)


def touch_session() -> None:
    """Mark this session's folder as in use (called on every page run)."""
    if _SESSION_FOLDER_KEY in st.session_state:
        uploads.touch(st.session_state[_SESSION_FOLDER_KEY].path)


def session_folder() -> Path:
    held = st.session_state.get(_SESSION_FOLDER_KEY)
    if held is None or not held.path.is_dir():  # a sweep may have removed an idle session's folder
        st.session_state[_SESSION_FOLDER_KEY] = held = SessionFolder(_session_id())
    uploads.touch(held.path)
    return held.path


def save_upload(data: bytes, name: str = "the file", suffix: str = ".safetensors") -> Path:
    """Write uploaded bytes into the session folder under a content hash: the user's name is never a path.

    ``name``, the name the file was uploaded under, is what the messages call it. The browser enforces the
    upload limit (``server.maxUploadSize``, MiB); checked again for other callers. The server's whole upload
    space is capped too (``QUANTLAB_UPLOAD_SPACE_MB``).
    """
    shown = uploads.display_name(name)
    if len(data) > (limit := st.get_option("server.maxUploadSize")) * 2**20:
        raise ModelLoadError(f"{shown} has {len(data) / 2**20:.1f} MB, over this server's upload limit of {limit} MB "
                             "(server.maxUploadSize); inspect large checkpoints with the command line")
    sweep_uploads(force=True)  # before counting the space: abandoned sessions' files do not count
    path = upload_space().save(session_folder(), data, suffix, label=shown)
    try:
        n_tensors = len(read_header(path)) if suffix == ".safetensors" else 0
    except ModelLoadError:
        return path  # a corrupt file: the page that reads it says what is wrong (under the user's name)
    if n_tensors > MAX_UPLOAD_TENSORS:
        path.unlink()
        raise ModelLoadError(f"{shown} holds more than {MAX_UPLOAD_TENSORS:,} tensors, more than this server "
                             "reads from one upload; inspect it with the command line")
    return path
