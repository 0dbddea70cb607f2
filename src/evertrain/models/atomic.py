"""Publish a directory atomically: write it under a temporary name, then rename.

A reader therefore sees either no directory or a complete one, even if the writer is
SIGKILLed halfway (the half-written temporary directory is hidden, ``.<name>.tmp-*``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which races with threads.
_UMASK = _read_umask()


def make_tmp_dir(final: Path) -> Path:
    """Create an empty hidden directory beside ``final`` (parents created), with the
    permissions a plain ``mkdir`` would give (``mkdtemp`` makes it owner-only, which
    would hide exports and caches from the user's group)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(final), dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def tmp_prefix(final: Path) -> str:
    """Name prefix of the temporary directories for ``final`` (same parent directory)."""
    return f".{final.name}.tmp-"


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on normal exit rename it to
    ``final``, on an exception remove it.

    ``final`` must not exist or be an empty directory: output the caller did not write is
    never replaced.

    Raises:
        FileExistsError: ``final`` exists and is a file or a non-empty directory (checked
            before and after writing).
    """
    final = Path(final)
    _check_free(final)
    tmp = make_tmp_dir(final)
    try:
        yield tmp
        _check_free(final)
        if final.is_dir():
            final.rmdir()  # empty (checked); rename() cannot replace it on every OS
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)


def _check_free(final: Path) -> None:
    if final.is_dir() and not any(final.iterdir()):
        return
    if final.exists() or final.is_symlink():
        raise FileExistsError(
            f"{final}: already exists and is not an empty directory; choose a new output "
            f"directory or remove this one first"
        )


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable across a power loss; without it the directory entry may
    # vanish after a crash even though the files inside were written.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
