"""A full or read-only disk pauses the daemon instead of killing it.

Any write of the run (the ledger, ``metrics.jsonl``, ``status.json``, a checkpoint) can
fail with ``ENOSPC``/``EDQUOT`` (full, over quota) or ``EROFS`` (remounted read-only after
an I/O error). Retrying the one write that failed would leave the others of the same step
half done (a metrics line without its ledger update, a checkpoint without its file row), so
the daemon instead drops everything it holds in memory and waits until a probe write
succeeds, then starts again from the newest committed checkpoint, exactly as after a
``kill -9`` (the path :mod:`evertrain.daemon.reconcile` repairs and the crash tests check
bit for bit). Nothing committed is touched meanwhile: checkpoint writes remove their own
partial ``step-N.tmp`` (:mod:`evertrain.checkpoint.commit`), SQLite rolls back its
transaction, and ``metrics.jsonl`` is rewound to the checkpoint on resume.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from pathlib import Path

# full, over quota, read-only: the disk, not the data, and they pass when someone frees
# space or remounts; EIO and out-of-descriptors do not pass by waiting
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_SQLITE_DISK_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY})
PROBE_NAME = ".evertrain-disk-probe"
PROBE_BYTES = 1 << 16


def disk_error(e: BaseException) -> BaseException | None:
    """The full-disk or read-only error behind ``e`` (``e`` itself or one of its causes or
    contexts: a :class:`~evertrain.checkpoint.errors.CheckpointWriteError` wraps the
    ``OSError``), else None."""
    from evertrain.checkpoint.errors import InsufficientDiskSpaceError
    from evertrain.runlock import RunDirNotWritableError

    if isinstance(e, InsufficientDiskSpaceError):  # too little space to try a save at all
        return e
    if isinstance(e, RunDirNotWritableError):
        # a run dir that cannot be created or locked is bad input (exit 2), not a pause:
        # nothing ran, so waiting for space would wait for ever (its cause may be EROFS)
        return None
    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err
        if isinstance(err, sqlite3.Error) and (
            getattr(err, "sqlite_errorcode", None) in _SQLITE_DISK_CODES
            or "disk is full" in str(err)
            or "readonly database" in str(err)
        ):
            return err
        err = err.__cause__ or err.__context__
    return None


def describe(err: BaseException) -> str:
    """One line for ``status.json`` and the log: what failed, on which file."""
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror or err}{where}"
    return str(err)


def probe_write(root: Path, min_free_bytes: int = 0) -> str | None:
    """Whether ``root`` takes writes again: None if a :data:`PROBE_BYTES` file can be
    written, fsynced and removed there and at least ``min_free_bytes`` stay free, else
    the reason (one line)."""
    try:
        st = os.statvfs(root)
        free = st.f_bavail * st.f_frsize
        if free < min_free_bytes + PROBE_BYTES:
            return f"{free} bytes free under {root}, need {min_free_bytes + PROBE_BYTES}"
        path = root / PROBE_NAME
        try:
            with open(path, "wb") as f:
                f.write(b"\0" * PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    except OSError as e:
        return describe(e)
    return None
