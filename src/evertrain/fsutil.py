"""Crash-safe file system primitives: atomic file replacement, atomic directory publishing
and directory fsync.

Protocol (the usual POSIX one, see ``rename(2)``): write under a hidden temporary name in the
destination's own directory, fsync, then ``os.replace``/``os.rename`` it to the final name,
then fsync the directory so the new name itself survives a power loss. A reader, or a process
restarted after SIGKILL, sees the old state or the complete new one, never a torn file or a
half-filled directory. Temporary names are hidden: ``.<name>.<random>.tmp`` for files,
``.<name>.tmp-<random>`` for directories.

Standard library only, so light entry points (``evertrain status``) can import it cheaply.
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


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path`` so renames into or out of it are durable (without it a
    directory entry may vanish after a power loss although the file's data was written).

    Best effort: a directory that cannot be opened or fsynced (some file systems refuse)
    is skipped silently, since the rename itself has already happened.
    """
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


def atomic_write_bytes(
    path: Path, data: bytes, *, mode: int | None = None, sync_parent: bool = True
) -> None:
    """Replace ``path`` with ``data`` (bytes) atomically; the parent directory must exist.

    Args:
        path: the file to create or replace.
        data: its complete new content.
        mode: permission bits of the new file; None gives what a plain ``open(path, "w")``
            would (``0o666`` minus the umask; ``mkstemp`` alone makes it owner-only, which
            would hide shared data files and caches from the user's group).
        sync_parent: also fsync the parent directory so the rename survives a power loss;
            False for frequently rewritten files whose loss after a power cut is harmless.

    Raises:
        OSError: the directory is not writable or the disk is full (the temporary file is
            removed; ``path`` is unchanged).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_parent:
        fsync_dir(path.parent)


def tmp_prefix(final: Path) -> str:
    """Name prefix of the temporary directories for ``final`` (same parent directory)."""
    return f".{final.name}.tmp-"


def make_tmp_dir(final: Path) -> Path:
    """Create an empty hidden directory beside ``final`` (parents created), with the
    permissions a plain ``mkdir`` would give (``mkdtemp`` makes it owner-only, which
    would hide exports and caches from the user's group).

    Raises:
        OSError: the parent directory cannot be created or written.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(final), dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def _plain_modes(root: Path) -> None:
    # libraries write through mkstemp (safetensors, PEFT): their files come out 0600, which
    # would hide an export from the user's group; give what a plain open() would
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_UMASK)


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on normal exit rename it to
    ``final`` (and fsync the parent), on an exception remove it.

    ``final`` must not exist or be an empty directory: output the caller did not write is
    never replaced. Everything inside gets the permissions a plain ``open``/``mkdir`` gives
    (0666/0777 minus the umask), whatever the writing library chose.

    Raises:
        FileExistsError: ``final`` exists and is a file or a non-empty directory (checked
            before and after writing).
    """
    final = Path(final)
    _check_free(final)
    tmp = make_tmp_dir(final)
    try:
        yield tmp
        _plain_modes(tmp)
        _check_free(final)
        if final.is_dir():
            final.rmdir()  # empty (checked); rename() cannot replace it on every OS
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def _check_free(final: Path) -> None:
    if final.is_dir() and not any(final.iterdir()):
        return
    if final.exists() or final.is_symlink():
        raise FileExistsError(
            f"{final}: already exists and is not an empty directory; choose a new output "
            f"directory or remove this one first"
        )
