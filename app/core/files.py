"""Files on disk: their sha256, writing them atomically, and folders this process may write to
(the compiled-model cache, feature caches, matplotlib's config)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 1 MB pieces (an export is tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(dest: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `dest` through a temporary file in the same folder, renamed into place once
    complete: a crash never leaves a half-written file under the real name."""
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        # mkstemp's 0600 would hide the file from a server running as another user than the one
        # that wrote it (the Dockerfile compiles as root and serves as an unprivileged user).
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def writable(folder: Path) -> bool:
    """Whether `folder` exists (created if need be) and this process may create files in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def user_cache_dir() -> Path:
    """This project's folder in the user's cache (`$XDG_CACHE_HOME/cuddle-or-not`, by default
    `~/.cache/cuddle-or-not`), or a private temporary folder where that cannot be written."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cuddle-or-not"
    return base if writable(base) else private_temp_dir() or base


def private_temp_dir(name: str = "cuddle-or-not") -> Path | None:
    """A folder of this user's own in the temporary directory (0700, so that no other local user
    can plant files there), or None if there is none to be had."""
    folder = Path(tempfile.gettempdir()) / f"{name}-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.stat()
    except OSError:
        return None
    return folder if info.st_uid == os.getuid() and not info.st_mode & 0o077 else None


def ensure_matplotlib_config_dir() -> None:
    """fastai imports matplotlib, which wants ~/.config/matplotlib and ~/.cache/matplotlib. A
    container's user often has no home (the Dockerfile's has none): matplotlib would then log a
    permission error, a warning and a font-cache rebuild at every start. Point it at a private
    temporary folder instead, unless MPLCONFIGDIR is set."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    home = Path(os.path.expanduser("~"))
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "matplotlib"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "matplotlib"
    if writable(config) and writable(cache):
        return
    temp = private_temp_dir()
    if temp is not None:
        os.environ["MPLCONFIGDIR"] = str(temp / "matplotlib")
