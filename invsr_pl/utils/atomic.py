"""Atomic file writes: a reader sees the old file or the complete new one, never a half-written one.

The data goes to a temporary file in the *same folder* (so the final rename never crosses file systems,
which would turn it into a copy), is flushed and fsynced, then ``os.replace``d over the target, and the folder
is fsynced so the rename itself survives a power cut. A killed writer leaves only a hidden ``.<name>.*.tmp``
file, which no reader in this project picks up (docs/checkpoints.md). Finished files get the ordinary
permissions ``0666 & ~umask`` (typically 0644), not the 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["TEMP_SUFFIX", "atomic_path", "atomic_write", "is_temporary", "umask_permissions"]

TEMP_SUFFIX = ".tmp"


def umask_permissions() -> int:
    """``0o666`` minus the process umask: the mode ``open()`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def is_temporary(path: str | Path) -> bool:
    """True for the leftovers of an interrupted :func:`atomic_write` / :func:`atomic_path`."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems (and Windows) cannot open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (PIL, safetensors, ...);
    on success it is fsynced and renamed onto ``path``; on any error it is removed and ``path`` is untouched.

    The temporary name ends in ``.tmp``: writers that pick the format from the suffix need it passed in.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_permissions())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """``with atomic_write(p) as f: f.write(...)``: a binary file object whose content replaces ``p``
    atomically when the block ends without an error."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
