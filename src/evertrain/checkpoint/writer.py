"""The background thread of asynchronous saves, and what each save cost (:class:`SaveStats`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class SaveStats:
    """What one checkpoint save cost. Times in seconds (``time.perf_counter``), sizes in bytes.

    Attributes:
        global_step: the checkpoint's global_step.
        path: the committed checkpoint directory.
        mode: ``"sync"`` (:meth:`CheckpointManager.save`) or ``"async"``
            (:meth:`CheckpointManager.save_async`).
        stall_s: how long the caller was blocked in the save call: waiting for the previous
            save, checks, and for ``async`` the staging copy, for ``sync`` the whole save.
        wait_s: the part of ``stall_s`` spent waiting for the previous in-flight save.
        stage_s: the part of ``stall_s`` spent copying tensors into the staging buffer
            (0 for ``sync``).
        write_s: serialising, hashing, writing, fsyncing and committing (rename and
            directory fsync); for ``async`` done in the background.
        retention_s: applying the retention policy after the commit.
        bytes: size of every file of the checkpoint, ``manifest.json`` included.
    """

    global_step: int
    path: str
    mode: Literal["sync", "async"]
    stall_s: float
    wait_s: float
    stage_s: float
    write_s: float
    retention_s: float
    bytes: int

    @property
    def bytes_per_s(self) -> float:
        """Write throughput: ``bytes / write_s`` (bytes per second)."""
        return self.bytes / self.write_s if self.write_s > 0 else float("inf")

    def as_metrics(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` record: ``{"kind": "checkpoint", **fields, "bytes_per_s"}``."""
        return {"kind": "checkpoint", **asdict(self), "bytes_per_s": self.bytes_per_s}


class BackgroundWriter:
    """Runs one job at a time on its own thread and keeps the job's exception until the
    owner collects it with :meth:`take_error`, so no error is lost.

    The thread is created at the first job and kept (starting a thread costs about a
    millisecond on a small VM, which would count as stall). It belongs to a
    ``ThreadPoolExecutor``: an interpreter that exits normally with a job in flight first
    lets it finish (a checkpoint is completed, not cut off). ``SIGKILL`` ends it like the rest
    of the process, leaving a ``.tmp`` directory that is never a checkpoint.

    Thread-safety: :meth:`submit`, :meth:`wait`, :meth:`done`, :meth:`take_error` and
    :meth:`close` must be called from one thread (the owner's); the job runs on the writer
    thread.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future[None] | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """A job was submitted and has not been waited for (it may have finished)."""
        return self._job is not None

    def done(self) -> bool:
        """No job, or the job has finished (its error, if any, is ready to take)."""
        return self._job is None or self._job.done()

    def submit(self, job: Callable[[], None]) -> None:
        """Start ``job`` on the writer thread.

        Raises:
            RuntimeError: a job is still in flight (call :meth:`wait` first).
        """
        if self._job is not None:
            raise RuntimeError(f"{self.name}: a job is in flight; wait() for it first")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self.name)
        self._job = self._pool.submit(job)

    def wait(self) -> float:
        """Block until the job (if any) has finished; return the seconds waited."""
        if self._job is None:
            return 0.0
        t0 = time.perf_counter()
        self._error = self._job.exception()  # waits; BaseException included
        self._job = None
        return time.perf_counter() - t0

    def take_error(self) -> BaseException | None:
        """The finished job's exception (once), or None. Call after :meth:`wait`."""
        error, self._error = self._error, None
        return error

    def close(self) -> None:
        """:meth:`wait`, then end the writer thread (a later :meth:`submit` starts another)."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
