"""The checkpoints of one run: save (synchronously or in the background) with retention,
find the newest valid one, load."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertrain.checkpoint.commit import commit_checkpoint, fsync_dir
from evertrain.checkpoint.errors import CheckpointError, InsufficientDiskSpaceError
from evertrain.checkpoint.format import (
    MANIFEST,
    STEP_DIR_RE,
    LoadedCheckpoint,
    PreparedCheckpoint,
    prepare_checkpoint,
    step_dir_name,
)
from evertrain.checkpoint.policy import RetentionPolicy
from evertrain.checkpoint.staging import StagingBuffer
from evertrain.checkpoint.verify import read_checkpoint, verify_checkpoint
from evertrain.checkpoint.writer import BackgroundWriter, SaveStats

if TYPE_CHECKING:
    from evertrain.checkpoint.ranks import PeerFiles

_LEFTOVER_RE = re.compile(r"step-\d{8,}\.(tmp|deleting)")
_logger = logging.getLogger("evertrain.checkpoint")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint (a ``step-N`` directory holding a ``manifest.json``).

    ``summary`` is the manifest's summary, ``{}`` if the manifest is unreadable; being
    listed says nothing about validity (see :meth:`CheckpointManager.latest_valid`).
    """

    path: Path
    global_step: int
    summary: dict[str, Any] = field(default_factory=dict, compare=False)


class CheckpointManager:
    """The checkpoints under ``root`` (``RUN/checkpoints``), one ``step-NNNNNNNN`` dir each.

    Saves are synchronous (:meth:`save`) or asynchronous (:meth:`save_async`: the tensors
    are copied into a reused host buffer and a background thread writes, hashes, fsyncs,
    commits and applies retention). At most one save is in flight; every save first waits
    for the previous one. An exception of a background save is kept and raised in the
    caller by the next :meth:`check`, :meth:`wait`, :meth:`close`, :meth:`save`,
    :meth:`save_async`, :meth:`latest_valid` or :meth:`load`: never swallowed. Each save's
    costs are recorded as :class:`SaveStats` (:attr:`last_stats`, :meth:`take_stats`).

    Thread-safety: call every method from one thread (the training loop's). The background
    thread touches only its own snapshot (the staging buffer, the JSON bytes) and the
    checkpoint directories; methods that read or change the directories while it could be
    deleting or committing (:meth:`save`, :meth:`save_async`, :meth:`latest_valid`,
    :meth:`load`) wait for it first. :meth:`committed` does not wait: it may list the
    in-flight checkpoint or not, never a half-written one.

    Not process-safe: there must be a single writer per run directory. The caller (the
    trainer, or the daemon, which holds the run directory's lock) guarantees it; two
    managers saving into the same ``root`` can corrupt each other's retention.

    Args:
        root: directory holding the step directories; created on the first save.
        retention: which committed checkpoints to keep after each save.
        log: receives warnings (damaged checkpoints skipped, dirs set aside, deletions);
            default: the ``evertrain.checkpoint`` logger at WARNING level.
        min_free_bytes: bytes that must stay free on the file system after a save.
    """

    def __init__(
        self,
        root: Path,
        retention: RetentionPolicy,
        *,
        log: Callable[[str], None] | None = None,
        info: Callable[[str], None] | None = None,
        min_free_bytes: int = 0,
    ) -> None:
        self.root = Path(root)
        self.retention = retention
        self.min_free_bytes = min_free_bytes
        self._log = log or _logger.warning
        self._info = info or _logger.info  # routine events (retention) are not warnings
        self._verified: set[str] = set()  # dir names verified or written by this process
        self._writer = BackgroundWriter("evertrain-checkpoint-writer")
        self._staging = StagingBuffer()
        self._stats_lock = threading.Lock()  # _stats is appended to by the writer thread
        self._stats: list[SaveStats] = []
        self._last_stats: SaveStats | None = None

    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = STEP_DIR_RE.fullmatch(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def committed(self) -> list[CheckpointInfo]:
        """Step directories holding a ``manifest.json``, sorted by global_step (not verified)."""
        infos = []
        for step, path in self._step_dirs():
            if not (path / MANIFEST).is_file():
                continue
            try:
                summary = json.loads((path / MANIFEST).read_bytes()).get("summary")
            except (OSError, ValueError, AttributeError):
                summary = None
            infos.append(CheckpointInfo(path, step, summary if isinstance(summary, dict) else {}))
        return infos

    def latest_valid(self) -> CheckpointInfo | None:
        """The newest checkpoint that passes full verification, or None.

        Every newer step directory that fails (including one without a manifest) is reported
        through ``log`` with a loud warning naming the file and the problem; it is skipped,
        never deleted. Cost: reads every byte of each checkpoint it checks. Waits for an
        in-flight save first (raising its error, if any).
        """
        self.wait()
        for _step, path in reversed(self._step_dirs()):
            problems = verify_checkpoint(path)
            fatal = [p for p in problems if p.fatal]
            if fatal:
                self._log(
                    f"WARNING: checkpoint {path} is DAMAGED and will NOT be used: "
                    + "; ".join(str(p) for p in fatal)
                    + " -- falling back to an older checkpoint; the damaged directory "
                    "is left in place for inspection"
                )
                continue
            for p in problems:
                self._log(f"warning: checkpoint {path}: {p}")
            self._verified.add(path.name)
            return next(i for i in self.committed() if i.path == path)
        return None

    def load(
        self, info_or_path: CheckpointInfo | Path, owners: Callable[[str], bool] | None = None
    ) -> LoadedCheckpoint:
        """Verify and load a checkpoint (after waiting for an in-flight save); with
        ``owners``, only the owners it accepts (see :func:`read_checkpoint`).

        Raises:
            CorruptCheckpointError: the checkpoint is damaged.
        """
        self.wait()
        path = info_or_path.path if isinstance(info_or_path, CheckpointInfo) else info_or_path
        loaded = read_checkpoint(Path(path), owners)
        self._verified.add(loaded.path.name)
        return loaded

    def save(
        self,
        global_step: int,
        states: Mapping[str, Mapping[str, Any]],
        summary: Mapping[str, Any],
        protect: Iterable[int] = (),
        peers: PeerFiles | None = None,
    ) -> Path:
        """Commit ``states`` as ``root/step-<global_step>``, then apply retention.

        Steps: wait for an in-flight :meth:`save_async` (raising its error); remove
        leftovers of crashed saves/deletions (``step-*.tmp``, ``step-*.deleting``: ours,
        never checkpoints); check free space; set an existing ``step-N`` aside as
        ``step-N.damaged-<unix time>``; write and commit (see
        :func:`~evertrain.checkpoint.write_checkpoint`); delete what ``retention`` does not
        keep among the valid checkpoints, never the newest valid one, a step in
        ``protect`` (pass the step being resumed from) or a damaged one. Checkpoints not yet
        verified by this manager are fully verified once (one read each per process).

        Args:
            global_step: optimizer steps completed.
            states: owner name -> state dict.
            summary: JSON-able; ``summary["metrics"]`` feeds :class:`KeepBest`.
            protect: global_steps that retention must not delete.
            peers: the other ranks' part of a multi-process commit (see
                :func:`evertrain.checkpoint.ranks.save_ranked`); None for one process.

        Returns:
            The committed checkpoint directory.

        Raises:
            InsufficientDiskSpaceError: free bytes < estimated size + ``min_free_bytes``;
                nothing is written or deleted.
            CheckpointWriteError: an OS error while writing; the partial dir is removed.
            CheckpointError: invalid states (owner name, value types).
            Exception: whatever failed an earlier :meth:`save_async` (nothing is saved).
        """
        t0 = time.perf_counter()
        waited = self._finish_in_flight()
        final, prepared = self._begin(global_step, states, summary)
        nbytes, write_s, retention_s = self._write(final, prepared, set(protect), peers)
        self._record(
            SaveStats(
                global_step=global_step,
                path=str(final),
                mode="sync",
                stall_s=time.perf_counter() - t0,
                wait_s=waited,
                stage_s=0.0,
                write_s=write_s,
                retention_s=retention_s,
                bytes=nbytes,
            )
        )
        return final

    def save_async(
        self,
        global_step: int,
        states: Mapping[str, Mapping[str, Any]],
        summary: Mapping[str, Any],
        protect: Iterable[int] = (),
        peers: PeerFiles | None = None,
    ) -> Path:
        """Snapshot ``states`` and commit them as ``root/step-<global_step>`` in the background.

        In the caller: wait for the previous save (raising its error), remove leftovers,
        check free space, validate and lay out the states, set an existing ``step-N`` aside
        (as :meth:`save`), and copy every tensor into the staging buffer (pinned host memory
        when a tensor is on CUDA; reused across saves, as large as the state). Then a
        background thread writes, hashes, fsyncs, commits and applies retention, exactly as
        :meth:`save`. After this returns the caller may change the states freely.

        ``SIGKILL`` during the background write leaves ``step-N.tmp/``, never a
        checkpoint; the previous checkpoint stays the newest valid one.

        Args and errors raised here: as :meth:`save` (validation, disk space and the
        previous save's error are raised synchronously). Errors of the write itself are
        raised by the next :meth:`check`, :meth:`wait`, :meth:`close` or save. With
        ``peers`` (rank 0 of a multi-process run) the whole commit protocol runs in the
        background thread, and ``peers.fail``/``peers.committed`` tell the other ranks the
        outcome.

        Returns:
            The directory the checkpoint will be committed to (not yet committed: see
            :meth:`wait`).
        """
        t0 = time.perf_counter()
        waited = self._finish_in_flight()
        final, prepared = self._begin(global_step, states, summary)
        t1 = time.perf_counter()
        staged = prepared.staged(self._staging.stage(prepared.staging_groups()))
        stage_s = time.perf_counter() - t1
        protected = set(protect)

        def job() -> None:
            try:
                nbytes, write_s, retention_s = self._write(final, staged, protected, peers)
            except BaseException as e:
                if peers is not None:
                    peers.fail(e)
                raise
            if peers is not None:
                peers.committed()
            self._record(
                SaveStats(
                    global_step=global_step,
                    path=str(final),
                    mode="async",
                    stall_s=stall_s,
                    wait_s=waited,
                    stage_s=stage_s,
                    write_s=write_s,
                    retention_s=retention_s,
                    bytes=nbytes,
                )
            )

        stall_s = time.perf_counter() - t0  # read by job(), which starts only below
        self._writer.submit(job)
        return final

    def save_part_async(
        self,
        global_step: int,
        prepared: PreparedCheckpoint | None,
        write: Callable[[PreparedCheckpoint | None], int],
    ) -> None:
        """A non-zero rank's share of an asynchronous multi-process save
        (:func:`evertrain.checkpoint.ranks.save_ranked`): wait for this rank's previous
        save (raising its error), copy ``prepared``'s tensors into the staging buffer, then
        run ``write(staged)`` in the background thread; it returns the bytes it wrote.
        ``prepared`` None (this rank's states failed validation): ``write(None)`` still
        runs, to report the failure to rank 0. Errors of ``write`` are raised by the next
        :meth:`check`, :meth:`wait`, :meth:`close` or save, as for :meth:`save_async`.
        """
        t0 = time.perf_counter()
        waited = self._finish_in_flight()
        staged = None
        stage_s = 0.0
        if prepared is not None:
            t1 = time.perf_counter()
            staged = prepared.staged(self._staging.stage(prepared.staging_groups()))
            stage_s = time.perf_counter() - t1

        def job() -> None:
            t2 = time.perf_counter()
            nbytes = write(staged)
            self._record(
                SaveStats(
                    global_step=global_step,
                    path=str(self.root / step_dir_name(global_step)),
                    mode="async",
                    stall_s=stall_s,
                    wait_s=waited,
                    stage_s=stage_s,
                    write_s=time.perf_counter() - t2,
                    retention_s=0.0,
                    bytes=nbytes,
                )
            )

        stall_s = time.perf_counter() - t0
        self._writer.submit(job)

    @property
    def in_flight(self) -> bool:
        """An asynchronous save was started and not yet waited for or checked as done."""
        return self._writer.busy

    def check(self) -> None:
        """Raise the error of a finished background save, if any; never blocks.

        Call it once per training step so a failed save surfaces at the next step.
        """
        if self._writer.done():
            self._finish_in_flight()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is committed; raise its error if it failed."""
        self._finish_in_flight()

    def close(self) -> None:
        """:meth:`wait`, then free the staging buffer and end the writer thread (the manager
        stays usable: a later save starts them again)."""
        try:
            self.wait()
        finally:
            self._writer.close()
            self._staging.release()

    @property
    def last_stats(self) -> SaveStats | None:
        """The stats of the last save that completed (sync or async), or None."""
        with self._stats_lock:
            return self._last_stats

    def take_stats(self) -> list[SaveStats]:
        """Stats of the saves completed since the last call, oldest first (each returned
        once: the trainer writes them to ``metrics.jsonl``)."""
        with self._stats_lock:
            out, self._stats = self._stats, []
        return out

    # ------------------------------------------------------------------ internals

    def _finish_in_flight(self) -> float:
        waited = self._writer.wait()
        error = self._writer.take_error()
        if error is not None:
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note("(raised by the background checkpoint writer)")
            raise error
        return waited

    def _begin(
        self, global_step: int, states: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any]
    ) -> tuple[Path, PreparedCheckpoint]:
        """Everything before the write, in the caller: leftovers, validation, disk space,
        setting an existing step directory aside."""
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.iterdir():
            if _LEFTOVER_RE.fullmatch(p.name):
                self._info(f"removing {p}, left by an interrupted save or deletion")
                shutil.rmtree(p)
        final = self.root / step_dir_name(global_step)
        if not states:
            raise CheckpointError(f"{final}: no states to save")
        prepared = prepare_checkpoint(states, summary, global_step=global_step)
        # = estimate_size(states), from the layout: no second walk over every tensor
        need = prepared.estimated_size + self.min_free_bytes
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise InsufficientDiskSpaceError(
                self.root,
                free,
                need,
                f"{self.root}: {free} bytes free, a checkpoint of step {global_step} needs about "
                f"{need - self.min_free_bytes} bytes plus min_free_bytes={self.min_free_bytes}; "
                f"not saved, nothing deleted to make room. Free disk space, lower "
                f"checkpoint.min_free_bytes or keep fewer checkpoints",
            )
        if final.exists():
            aside = final.with_name(f"{final.name}.damaged-{int(time.time())}")
            while aside.exists():
                aside = aside.with_name(aside.name + "x")
            os.rename(final, aside)
            self._verified.discard(final.name)
            self._log(
                f"WARNING: {final} already existed (a checkpoint resumed past); "
                f"moved it aside to {aside.name}, not deleted"
            )
        return final, prepared

    def _write(
        self,
        final: Path,
        prepared: PreparedCheckpoint,
        protect: set[int],
        peers: PeerFiles | None = None,
    ) -> tuple[int, float, float]:
        """Commit and apply retention: (bytes, write seconds, retention seconds)."""
        t0 = time.perf_counter()
        nbytes = commit_checkpoint(final, prepared, peers)
        self._verified.add(final.name)
        t1 = time.perf_counter()
        self._apply_retention(prepared.global_step, protect)
        return nbytes, t1 - t0, time.perf_counter() - t1

    def _record(self, stats: SaveStats) -> None:
        with self._stats_lock:
            self._stats.append(stats)
            self._last_stats = stats

    def _apply_retention(self, new_step: int, protect: set[int]) -> None:
        valid = []
        for info in self.committed():
            if info.path.name not in self._verified:
                fatal = [p for p in verify_checkpoint(info.path) if p.fatal]
                if fatal:
                    self._log(f"retention: {info.path} is damaged ({fatal[0]}); left untouched")
                    continue
                self._verified.add(info.path.name)
            valid.append(info)
        if not valid:
            return
        keep = self.retention.keep(valid) | protect | {new_step, valid[-1].global_step}
        for info in valid:
            if info.global_step in keep:
                continue
            # Rename first: a crash mid-rmtree leaves a *.deleting dir (cleaned up on the next
            # save) instead of a step dir with a manifest and missing files.
            doomed = info.path.with_name(info.path.name + ".deleting")
            try:
                os.rename(info.path, doomed)
                fsync_dir(self.root)
                shutil.rmtree(doomed)
            except OSError as e:
                self._log(f"retention: could not delete {info.path}: {e}")
                continue
            self._verified.discard(info.path.name)
            self._info(f"retention: deleted {info.path.name}")
