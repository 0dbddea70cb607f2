"""Write a file atomically: a temporary file beside it, fsynced, then renamed over it.

A reader (or a process restarted after SIGKILL) sees the old file or the complete new one,
never a torn one. The temporary file is hidden (``.<name>.<random>.tmp``) and removed on error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which races with threads.
_UMASK = _read_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (parent directory must exist).

    The file gets the permissions a plain ``open(path, "w")`` would give (``mkstemp`` makes
    it owner-only, which would hide shared data files and caches from the user's group).

    Raises:
        OSError: the directory is not writable or the disk is full.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Makes the rename durable across a power loss.
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
