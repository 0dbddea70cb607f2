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

import contextlib
import errno
import json
import logging
import math
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertrain.daemon.layout import atomic_write

if TYPE_CHECKING:
    from evertrain.daemon.intake import InboxScanner, InboxWatcher
    from evertrain.daemon.ledger import Ledger
    from evertrain.daemon.stream import FilePlan

log = logging.getLogger("evertrain.daemon")

PROGRESS_LOG_SECONDS = 30.0
QUEUE_NAMES = 50  # waiting files named in status.json (queue_length counts them all)
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


class ProgressLog:
    """Logs a training file's progress: its first and last step, and a step at most every
    :data:`PROGRESS_LOG_SECONDS` in between."""

    def __init__(self, meter: StepMeter) -> None:
        self.meter = meter
        self._last = -math.inf

    def step(self, plan: FilePlan, stats: Any) -> None:
        """After an optimizer step of ``plan``'s file (``stats``: its
        :class:`~evertrain.trainer.StepStats`)."""
        now = time.monotonic()
        if now - self._last < PROGRESS_LOG_SECONDS and plan.steps_done not in (
            1,
            plan.steps_total,
        ):
            return
        self._last = now
        sps = self.meter.seconds_per_step()
        eta = (plan.steps_total - plan.steps_done) * sps if sps else None
        log.info(
            "file %d (%s): step %d/%d (global_step %d) loss %.4f lr %.2e %.0f tok/s eta %s",
            plan.id,
            plan.name,
            plan.steps_done,
            plan.steps_total,
            stats.global_step,
            stats.loss,
            stats.lr,
            self.meter.tokens_per_second() or 0.0,
            "?" if eta is None else f"{eta:.0f}s",
        )


def status_record(
    *,
    state: str,
    trainer: Any,
    plan: FilePlan | None,
    meter: StepMeter,
    ledger: Ledger | None,
    scanner: InboxScanner | None,
    watcher: InboxWatcher | None,
    last_checkpoint: dict[str, Any] | None,
    warning: str | None,
) -> dict[str, Any]:
    """The status record (the fields in the module docstring) of a daemon in ``state``,
    training with ``trainer`` (None before it exists) the file of ``plan`` (None between
    files). Reads the ledger; raises nothing of its own."""
    p = trainer.progress if trainer is not None else None
    losses = p.recent_losses[-20:] if p is not None else []
    current = None
    if plan is not None:
        sps = meter.seconds_per_step()
        current = {
            "id": plan.id,
            "name": plan.name,
            "examples_done": plan.examples,
            "examples_total": plan.examples_total,
            "steps_done": plan.steps_done,
            "steps_total": plan.steps_total,
            "percent": round(100.0 * plan.steps_done / max(plan.steps_total, 1), 2),
            "eta_seconds": None
            if sps is None
            else round((plan.steps_total - plan.steps_done) * sps, 1),
        }
    # the first QUEUE_NAMES waiting files by name, all of them by count: status.json is
    # rewritten every few seconds, and must not grow (or cost) with a long queue
    queue: list[str] = []
    counts: dict[str, int] = {}
    last_snap = None
    if ledger is not None:
        waiting = ledger.pending_names(QUEUE_NAMES + 1)
        queue = [n for i, n in waiting if plan is None or i != plan.id][:QUEUE_NAMES]
        counts = ledger.counts()
        s = ledger.last_snapshot()
        if s is not None:
            last_snap = {"path": s.path, "global_step": s.global_step, "time": s.time}
    pending = sum(counts.get(k, 0) for k in ("queued", "validating", "training"))
    queue_length = pending - (1 if plan is not None else 0)  # the file in training
    lr = None
    if trainer is not None and p is not None and p.global_step > 0:
        with contextlib.suppress(ValueError):
            lr = trainer.scheduler.lr_at(p.global_step - 1)
    return {
        "state": state,
        "pid": os.getpid(),
        "updated": time.time(),
        "global_step": p.global_step if p is not None else None,
        "loss": sum(losses) / len(losses) if losses else None,
        "lr": lr,
        "tokens_per_second": meter.tokens_per_second(),
        "current_file": current,
        "queue": queue,
        "queue_length": max(queue_length, len(queue)),
        "inbox": list(scanner.settling) if scanner is not None else [],
        "last_checkpoint": last_checkpoint,
        "last_snapshot": last_snap,
        "counts": counts,
        "warning": warning,
        "watcher": watcher.mode if watcher is not None else None,
    }


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
        # Two clocks: the heartbeat only refreshes ``updated`` on the last record, so its
        # writes must not count as the daemon's own; with one shared clock the heartbeat
        # kept :meth:`due` false and step progress reached the file only at file ends.
        self._last_own = -float("inf")
        self._last_any = -float("inf")
        self._status: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def due(self) -> bool:
        """Whether the daemon's own last :meth:`write` is ``every_seconds`` or more old
        (heartbeat rewrites do not count: they carry no new progress)."""
        return time.monotonic() - self._last_own >= self.every

    def write(self, status: dict[str, Any]) -> None:
        """Replace the file with ``status`` (JSON) now.

        Raises:
            OSError: the run directory is not writable.
        """
        with self._lock:
            self._status = dict(status)
            self._write_locked(self._status)
            self._last_own = self._last_any

    def _write_locked(self, status: dict[str, Any]) -> None:
        data = (json.dumps(status, indent=1) + "\n").encode()
        try:
            atomic_write(self.path, data)
        except OSError as e:
            # A full disk is exactly when the status must say so: the atomic way needs a
            # new file, so overwrite the old one's blocks instead (readers retry a torn read)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not _overwrite(self.path, data):
                raise
        self._last_any = time.monotonic()

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
                if self._status is None or time.monotonic() - self._last_any < self.every:
                    continue
                try:
                    self._write_locked({**self._status, "updated": time.time()})
                except OSError:
                    pass  # the daemon's own next write reports it


def _overwrite(path: Path, data: bytes) -> bool:
    """Write ``data`` over ``path``'s bytes without allocating (within the blocks the file
    already has), padding a shorter record with spaces (still valid JSON); False if the
    file is missing or its blocks are too few."""
    try:
        with open(path, "r+b") as f:
            old = f.seek(0, os.SEEK_END)
            if len(data) > max(old, os.fstat(f.fileno()).st_blocks * 512):
                return False
            old = max(old, len(data))
            f.seek(0)
            f.write(data[:-1] + b" " * (old - len(data)) + b"\n")
            f.flush()
    except OSError:
        return False
    return True


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The last status the daemon of ``run_dir`` wrote, or None if there is none.

    Raises:
        ValueError: the file is not valid JSON (it is only ever replaced whole, so this
            means it was edited or damaged).
    """
    path = Path(run_dir) / "status.json"
    for attempt in range(3):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            out: dict[str, Any] = json.loads(text)
            return out
        except json.JSONDecodeError as e:
            if attempt == 2:  # not a torn in-place write (see StatusWriter): damaged
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            time.sleep(0.05)
    raise AssertionError("unreachable")
