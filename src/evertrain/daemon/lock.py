"""One daemon per run directory: an exclusive ``fcntl.flock`` on ``RUN/daemon.lock``.

The operating system releases the lock when the holder exits or dies (even by SIGKILL), so a
crashed daemon never leaves a stale lock behind. The file holds the holder's pid, host and
start time as JSON, for the error message of the daemon that is refused.
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
    """Another daemon holds the run directory; the message names it (pid, host, since)."""


def describe_holder(path: Path) -> str:
    """``pid N on host H since T`` from the lock file, or ``unknown holder``."""
    try:
        info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {info['pid']} on host {info['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown holder (the lock file is empty or unreadable)"


class RunLock:
    """The exclusive lock of one run directory (use as a context manager).

    Not re-entrant: a second :class:`RunLock` on the same file, even in the same process,
    is refused (flock locks belong to the open file description).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting and record this process as the holder.

        Raises:
            RunLockedError: another process (or another RunLock here) holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent}: another `evertrain watch` is running on this run "
                f"directory ({describe_holder(self.path)}); stop it first (SIGTERM or Ctrl-C "
                f"in its terminal), or use another run directory"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
