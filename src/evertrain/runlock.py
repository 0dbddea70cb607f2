"""One writer per run directory: an exclusive ``fcntl.flock`` on ``RUN/daemon.lock``.

Every command that writes a run directory holds it: ``evertrain watch`` (the daemon), and
through the :class:`~evertrain.Checkpointer` ``evertrain train``, ``import-hf`` and a user's
own loop. Two writers would mark each other's good checkpoints damaged and interleave the
metrics. The operating system releases the lock when the holder exits or dies (even by
SIGKILL), so a crash never leaves a stale lock behind. The file holds the holder's pid,
host and start time as JSON, for the error message of the process that is refused.

Within one process the lock is shared: a second :class:`RunLock` on a path this process
already holds (the daemon's trainer) takes a reference instead of a second ``flock``, which
the operating system would refuse (flock locks belong to the open file description).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any


class RunLockedError(RuntimeError):
    """Another process holds the run directory; the message names it (pid, host, since)."""


class RunDirNotWritableError(RuntimeError):
    """The run directory cannot be created or written (read-only file system, no
    permission, a file in its place); the message names it, the reason and what to do."""


def not_writable(run_dir: Path, e: OSError) -> RunDirNotWritableError:
    """The one-line error for ``e``, raised while creating or writing ``run_dir``."""
    return RunDirNotWritableError(
        f"run directory {run_dir} is not writable ({e.strerror or e}"
        f"{': ' + str(e.filename) if e.filename else ''}); give a writable --run-dir "
        "(or fix its permissions or mount)"
    )


LOCK_NAME = "daemon.lock"  # RUN/daemon.lock (named when only the daemon took it)

# resolved lock path -> [fd, references]: the locks this process holds
_HELD: dict[Path, list[int]] = {}


def describe_holder(path: Path) -> str:
    """``PID N on HOST (since T)`` from the lock file (T local time), or ``unknown holder``."""
    try:
        info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"PID {info['pid']} on {info['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown holder (the lock file is empty or unreadable)"


class RunLock:
    """The exclusive lock of one run directory (use as a context manager).

    Shared within a process (see the module docstring); :meth:`release` gives back this
    object's reference, and the ``flock`` goes with the last one. Not thread-safe.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._held = False

    def acquire(self) -> None:
        """Take the lock without waiting and record this process as the holder.

        Raises:
            RunLockedError: another process holds it.
            RunDirNotWritableError: the directory or the lock file cannot be created.
        """
        if self._held:
            return
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            self._held = True
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise not_writable(self.path.parent, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by {describe_holder(self.path)}: another "
                f"`evertrain watch`, `train` or import; stop it first (SIGTERM or Ctrl-C in "
                f"its terminal), or use another run directory"
            ) from None
        # written only once the lock is ours: a refused process never truncates the
        # holder's record
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[key] = [fd, 1]
        self._held = True

    def release(self) -> None:
        """Give this object's reference back (idempotent); the last one unlocks."""
        if not self._held:
            return
        self._held = False
        key = self.path.resolve()
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
