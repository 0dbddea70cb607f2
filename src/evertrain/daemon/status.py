"""``RUN/status.json``: what the daemon is doing, replaced atomically every few seconds.

Fields (see ``docs/run-directory.md``): ``state`` (starting, idle, validating, training,
paused, stopping, stopped), ``pid``, ``updated`` (unix seconds), ``global_step``, ``loss``
(mean of the last 20 step losses, nats), ``lr``, ``tokens_per_second`` (over the last 20
steps), ``current_file`` (id, name, examples/steps done and total, percent, eta_seconds),
``queue`` (names waiting), ``inbox`` (names still settling), ``last_checkpoint``,
``last_snapshot``, ``counts`` (ledger rows per status), ``warning`` (a problem the daemon
is waiting out, e.g. no disk space for a checkpoint; else null), ``watcher`` (``events`` or
``polling``).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from evertrain.daemon.layout import atomic_write

STATES = ("starting", "idle", "validating", "training", "paused", "stopping", "stopped")


class StepMeter:
    """Recent step timings: tokens per second and seconds per step over the last ``n``."""

    def __init__(self, n: int = 20) -> None:
        self._steps: deque[tuple[int, float]] = deque(maxlen=n)

    def add(self, tokens: int, seconds: float) -> None:
        self._steps.append((tokens, seconds))

    def tokens_per_second(self) -> float | None:
        secs = sum(s for _, s in self._steps)
        return sum(t for t, _ in self._steps) / secs if secs > 0 else None

    def seconds_per_step(self) -> float | None:
        return sum(s for _, s in self._steps) / len(self._steps) if self._steps else None


class StatusWriter:
    """Writes status dicts to ``path`` atomically, at most every ``every_seconds`` unless
    forced (state changes are forced so readers see them at once).

    A heartbeat thread (:meth:`start_heartbeat`) rewrites the last status with a fresh
    ``updated`` time when the daemon itself has not written for ``every_seconds`` (an
    optimizer step of a real model on a CPU can take minutes), so readers can tell a busy
    daemon from a dead one. Writes are serialised by a lock.
    """

    def __init__(self, path: Path, every_seconds: float) -> None:
        self.path, self.every = path, every_seconds
        self._last = -float("inf")
        self._status: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every

    def write(self, status: dict[str, Any]) -> None:
        """Replace the file with ``status`` (JSON) now.

        Raises:
            OSError: the run directory is not writable.
        """
        with self._lock:
            self._status = dict(status)
            self._write_locked(self._status)

    def _write_locked(self, status: dict[str, Any]) -> None:
        atomic_write(self.path, (json.dumps(status, indent=1) + "\n").encode())
        self._last = time.monotonic()

    def start_heartbeat(self) -> None:
        """Start the heartbeat thread (a daemon thread; see :meth:`stop_heartbeat`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="evertrain-status", daemon=True)
            self._thread.start()

    def stop_heartbeat(self) -> None:
        """Stop the heartbeat; later writes are the daemon's own only."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                if self._status is None or not self.due():
                    continue
                try:
                    self._write_locked({**self._status, "updated": time.time()})
                except OSError:
                    pass  # the daemon's own next write reports it


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The last status the daemon of ``run_dir`` wrote, or None if there is none.

    Raises:
        ValueError: the file is not valid JSON (it is only ever replaced whole, so this
            means it was edited or damaged).
    """
    path = Path(run_dir) / "status.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        out: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return out
