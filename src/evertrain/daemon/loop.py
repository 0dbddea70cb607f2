"""The watch daemon: takes files from the inbox and trains on each, cumulatively, once.

One :class:`Daemon` owns a run directory while it runs (``RUN/daemon.lock``). Its loop:

1. **intake**: complete inbox entries are renamed to ``queue/<id>-<name>`` (or to
   ``rejected/`` when refused at the door) and then recorded in the ledger
   (:mod:`evertrain.daemon.intake`);
2. the oldest pending file is checked for being a **duplicate** of a trained file (content
   hash), **validated** in full (every record, then tokenised), and **trained** for
   ``watch.epochs_per_file`` epochs, continuing global_step, optimizer, LR schedule and RNG
   from the previous file; held-out loss is measured before and after, and on the most
   recent earlier files after (forgetting);
3. at the end of a file a checkpoint is committed, *then* the row becomes ``done`` and the
   file moves to ``processed/``; snapshots follow.

Checkpoints are also taken every ``checkpoint.every_steps`` / ``every_seconds``, and on
SIGTERM/SIGINT (after the optimizer step in flight). A ``kill -9`` anywhere is repaired on
the next start by :mod:`evertrain.daemon.reconcile`, which makes the ledger agree with the
newest valid checkpoint; training then resumes at the exact micro-batch, bit-identical to a
run that never stopped.

Fault points (``EVERTRAIN_FAULT``, :mod:`evertrain.faults`), ``N`` the file id:
``intake@N`` (file moved out of the inbox, no ledger row yet), ``validate@N`` (status
validating, verdict not reached), ``filedone@N`` (end-of-file checkpoint committed, row not
yet done), ``processed@N`` (row done, file still in ``queue/``), ``reject@N`` (row rejected,
file still in ``queue/``); plus the trainer's ``micro@S:M`` and the checkpoint writer's
``save@S`` / ``commit@S``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from evertrain.config import RunConfig
from evertrain.daemon.control import Control, ControlReader
from evertrain.daemon.filedata import FileData
from evertrain.daemon.intake import InboxScanner, InboxWatcher
from evertrain.daemon.layout import RunLayout, reason_path, stored_name
from evertrain.daemon.ledger import FileRow, Ledger
from evertrain.daemon.lock import RunLock
from evertrain.daemon.ranks import Follower, RankLink, env_rank, file_ref
from evertrain.daemon.reconcile import hash_file, move, reconcile, write_reason
from evertrain.daemon.replay import ReplaySampler
from evertrain.daemon.schedule import StreamScheduler
from evertrain.daemon.settings import replay_rows
from evertrain.daemon.snapshots import Snapshots
from evertrain.daemon.status import StatusWriter, StepMeter
from evertrain.daemon.stream import (
    FilePlan,
    FileTooSmallError,
    StreamState,
    file_batches,
    plan_file,
)
from evertrain.data import DataCursor, DataError, TokenizedDataset, validate_file
from evertrain.faults import maybe_crash
from evertrain.signals import on_stop_signals

log = logging.getLogger("evertrain.daemon")

Listener = Callable[[str, dict[str, Any]], None]
PROGRESS_LOG_SECONDS = 30.0


class DaemonError(RuntimeError):
    """The daemon cannot go on safely (the message says why and what to do)."""


class Daemon:
    """Trains on every file dropped into ``RUN/inbox``; see the module docstring.

    Args:
        run_dir: the run directory (created with its folders on first use).
        cfg: the run config, already through
            :func:`~evertrain.daemon.settings.prepare_watch_config`.
        once: process what is in the inbox (waiting for files still settling) and the
            queue, then return.
        allow_config_change: resume although the config changed in a way that breaks
            exactness (passed to the trainer).

    Attributes:
        listeners: called as ``listener(event, payload)`` for ``file_start``, ``step``,
            ``file_end``, ``rejected``, ``duplicate``, ``state`` (progress displays).
        trainer: the :class:`~evertrain.trainer.Trainer` once started.
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: RunConfig,
        *,
        once: bool = False,
        allow_config_change: bool = False,
    ) -> None:
        self.layout = RunLayout(Path(run_dir))
        self.cfg, self.w = cfg, cfg.watch
        self.once, self.allow_config_change = once, allow_config_change
        self.listeners: list[Listener] = []
        self.stop_reason: str | None = None
        self.state = "starting"
        self.warning: str | None = None
        self.trainer: Any = None
        self.wake = threading.Event()
        self.meter = StepMeter()
        self._plan: FilePlan | None = None
        self._control = Control()
        self._save_pending = False
        self._last_scan = -math.inf
        self._last_progress_log = -math.inf
        self._last_checkpoint: dict[str, Any] | None = None
        self._last_snapshot_request: float | None = None
        self._intake_failed: set[str] = set()
        self.ledger: Ledger | None = None
        self.scanner: InboxScanner | None = None
        self.watcher: InboxWatcher | None = None
        self.link = RankLink(None)  # replaced once the trainer has joined the process group

    # ------------------------------------------------------------------ public

    def request_stop(self, reason: str = "request") -> None:
        """Stop after the optimizer step in flight (checkpoint first); safe from a signal
        handler or another thread."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.wake.set()

    def run(self) -> int:
        """Run until stopped (or, with ``once``, until the inbox and queue are empty).

        Returns:
            0, or 1 when the final checkpoint could not be written (no disk space).

        Raises:
            evertrain.daemon.lock.RunLockedError: another daemon runs on this directory.
            DaemonError, evertrain.daemon.reconcile.ReconcileError: the run cannot be
                continued safely.
            evertrain.trainer.ResumeError, evertrain.state.StateError: see the trainer.

        Under torchrun only rank 0 runs the daemon; the other ranks follow it
        (:mod:`evertrain.daemon.ranks`).
        """
        if env_rank() != 0:
            follower = Follower(
                self.layout.root, self.cfg, allow_config_change=self.allow_config_change
            )
            return follower.run()
        self.layout.create()
        lock = RunLock(self.layout.lock)
        lock.acquire()
        handler = logging.FileHandler(self.layout.log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("evertrain")
        root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        try:
            with self._signals():
                self._start()
                self._loop()
                code = self._shutdown()
                self.link.send("stop")
                return code
        finally:
            if getattr(self, "status", None) is not None:
                self.status.stop_heartbeat()
            if self.watcher is not None:
                self.watcher.stop()
            if self.trainer is not None:
                self.trainer.close()
            if self.ledger is not None:
                self.ledger.close()
            root.removeHandler(handler)
            handler.close()
            lock.release()

    # ------------------------------------------------------------------ start

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        def handle(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self.stop_reason is not None:
                log.warning(
                    "%s received: already stopping after the current optimizer step and a "
                    "checkpoint (kill -9 aborts at once; the next start then resumes from "
                    "the last checkpoint)",
                    name,
                )
                return
            log.warning("%s received: stopping after the current optimizer step", name)
            self.request_stop(name)

        with on_stop_signals(handle):
            yield

    def _start(self) -> None:
        from evertrain.trainer import Trainer

        new_ledger = not self.layout.ledger.exists()
        self._check_checkpoints_are_ours(new_ledger)
        self.ledger = Ledger(self.layout.ledger)
        self.ledger.meta_set("config", self.cfg.to_json())
        self.status = StatusWriter(self.layout.status, self.w.status_every_seconds)
        self._write_status(force=True)
        self.status.start_heartbeat()
        log.info(
            "evertrain watch %s: model %s, %s, schedule %s, %d epoch(s) per file",
            self.layout.root,
            self.cfg.model.source,
            "LoRA" if self.cfg.lora else "full fine-tuning",
            self.cfg.train.schedule.name,
            self.w.epochs_per_file,
        )
        self.stream = StreamState()
        trainer = Trainer(
            self.cfg,
            self.layout.root,
            allow_config_change=self.allow_config_change,
            build_data=False,
            extra_owners={"stream": self.stream},
        )
        self.trainer = trainer
        self.link = RankLink(trainer.dist)
        # The open-ended schedule replaces the trainer's (same checkpointed definition; the
        # trainer already reported any change of it while resuming).
        sched = StreamScheduler(trainer.optimizer, self.cfg.train.schedule, self.cfg.train.lr)
        sched.loaded_definition = trainer.scheduler.loaded_definition
        trainer.scheduler = sched
        trainer.owners["scheduler"] = sched
        trainer.summary_fields = self._summary_fields
        trainer.save_policy.mark_saved(trainer.progress.global_step, time.monotonic())
        committed = trainer.checkpoints.committed()
        if committed:
            c = committed[-1]
            self._last_checkpoint = {
                "global_step": c.global_step,
                "path": self.layout.rel(c.path),
                "time": c.summary.get("time"),
            }
        self.sched = sched
        last = self.stream.last_file
        if self.stream.current is not None:
            cur = self.stream.current
            sched.window = (cur.global_step_start, cur.global_step_end)
        elif last is not None:
            sched.window = (int(last["global_step_start"]), int(last["global_step_end"]))
        self.data = FileData(
            self.cfg, trainer.tokenizer, capacity=max(8, self.w.eval_earlier_files)
        )
        reconcile(self.layout, self.ledger, self.stream)
        self.snapshots = Snapshots(self.layout, self.ledger, self.cfg)
        self.snapshots.recover()
        self.scanner = InboxScanner(
            self.layout.inbox,
            self.w.settle_seconds,
            self.w.settle_timeout_seconds,
            self.w.max_file_bytes,
        )
        self.watcher = InboxWatcher(self.layout.inbox, self.wake)
        self.watcher.start()
        self.controls = ControlReader(self.layout.control)
        snap = self.snapshots.last()
        self._last_snapshot_request = snap.time if snap else None
        if self.stream.current is None:
            self._maybe_snapshot_after_file()
        p = trainer.progress
        log.info(
            "ready: global_step %d, %d file(s) done, %s",
            p.global_step,
            len(self.stream.completed),
            f"resuming file {self.stream.current.id} ({self.stream.current.name})"
            if self.stream.current
            else "between files",
        )

    def _check_checkpoints_are_ours(self, new_ledger: bool) -> None:
        import json

        steps = sorted(self.layout.checkpoints.glob("step-*/manifest.json"))
        if not steps:
            return
        try:
            files = json.loads(steps[-1].read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError):
            return  # damaged: the checkpoint manager reports and skips it
        if "stream.json" not in files:
            raise DaemonError(
                f"{self.layout.root} holds checkpoints of `evertrain train`, not of a watch "
                "daemon; give `evertrain watch` a new run directory"
            )
        if new_ledger:
            raise DaemonError(
                f"{self.layout.root} has watch checkpoints but no {self.layout.ledger.name}; "
                "the ledger is what says which files were trained: restore it from a backup, "
                "or start a new run directory"
            )

    def _summary_fields(self) -> dict[str, Any]:
        cur = self.stream.current
        return {
            "stream": {
                "files_done": len(self.stream.completed),
                "file_id": None if cur is None else cur.id,
                "file_name": None if cur is None else cur.name,
                "file_steps_done": None if cur is None else cur.steps_done,
                "file_steps_total": None if cur is None else cur.steps_total,
            }
        }

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        assert self.ledger is not None and self.scanner is not None
        while self.stop_reason is None:
            self._tick(scan=True)
            if self.stop_reason is not None:
                break
            if self._control.paused:
                self._set_state("paused")
                self._sleep()
                continue
            row = self.ledger.next_pending()
            if row is not None:
                self._process(row)
                continue
            if self.once and not self.scanner.settling:
                log.info("--once: inbox and queue are empty; stopping")
                break
            self._set_state("idle")
            self._sleep()

    def _sleep(self, seconds: float | None = None) -> None:
        self.wake.wait(self.w.poll_seconds if seconds is None else seconds)
        self.wake.clear()

    def _tick(self, scan: bool = False) -> None:
        """Between optimizer steps: intake, control requests, daily snapshot, status."""
        now = time.monotonic()
        if scan or now - self._last_scan >= self.w.poll_seconds:
            self._last_scan = now
            self._intake()
        self._control = self.controls.read()
        req = self._control.snapshot_requested
        if req is not None and (
            self._last_snapshot_request is None or req > self._last_snapshot_request
        ):
            self._last_snapshot_request = req
            self._snapshot("request")
        if self.snapshots.due_daily(time.time(), self.trainer.progress.global_step):
            self._snapshot("daily")
        self._write_status()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._emit("state", {"state": state})
            self._write_status(force=True)

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(event, payload)

    # ------------------------------------------------------------------ intake

    def _intake(self) -> None:
        assert self.ledger is not None and self.scanner is not None
        for arrival in self.scanner.scan():
            file_id = self.ledger.max_id() + 1
            src = self.layout.inbox / arrival.name
            stored = stored_name(file_id, arrival.name)
            if arrival.reject is None:
                dest = self.layout.queue / stored
            else:
                dest = self.layout.rejected / stored
                write_reason(dest, arrival.name, f"{arrival.name}: {arrival.reject}")
            try:
                move(src, dest)
            except FileNotFoundError:  # taken away by its writer since the scan
                reason_path(dest).unlink(missing_ok=True)
                continue
            except OSError as e:  # e.g. a name too long for the <id>- prefix
                if arrival.name not in self._intake_failed:
                    self._intake_failed.add(arrival.name)
                    log.error(
                        "cannot take %s out of the inbox (%s); rename it, it stays there",
                        arrival.name,
                        e,
                    )
                continue
            maybe_crash("intake", file_id)
            now = time.time()
            error = None if arrival.reject is None else f"{arrival.name}: {arrival.reject}"
            if arrival.reject is None:
                # unreadable: recorded without a hash; validation rejects it with the reason
                size, digest = hash_file(dest)
                status, finished = "queued", None
            else:
                size, digest = os.lstat(dest).st_size, None
                status, finished = "rejected", now
            self.ledger.insert(
                FileRow(
                    id=file_id,
                    name=arrival.name,
                    path=self.layout.rel(dest),
                    content_hash=digest,
                    size=size,
                    status=status,
                    arrived_at=now,
                    finished_at=finished,
                    error=error,
                )
            )
            if arrival.reject is None:
                log.info("took %s as file %d (%d bytes)", arrival.name, file_id, size)
            else:
                log.warning("REJECTED file %d: %s", file_id, error)
                self._emit("rejected", {"id": file_id, "name": arrival.name, "reason": error})

    # ------------------------------------------------------------------ one file

    def _process(self, row: FileRow) -> None:
        cur = self.stream.current
        loaded: tuple[FilePlan, TokenizedDataset, TokenizedDataset] | None
        if row.status == "training" and cur is not None and cur.id == row.id:
            loaded = self._resume_file(row, cur)
        else:
            loaded = self._start_file(row)
        if loaded is None:
            return
        plan, train, val = loaded
        self._train_file(row, plan, train, val)

    def _start_file(
        self, row: FileRow
    ) -> tuple[FilePlan, TokenizedDataset, TokenizedDataset] | None:
        assert self.ledger is not None
        path = self.layout.abs(row.path)
        if row.content_hash is not None and not self.w.retrain_duplicates:
            original = self.ledger.find_done(row.content_hash, row.id)
            if original is not None:
                self._duplicate(row, original)
                return None
        self._set_state("validating")
        self.ledger.update(row.id, status="validating")
        maybe_crash("validate", row.id)
        p = self.trainer.progress
        try:
            validate_file(path, self.cfg.data)
            train, val, report = self.data.build(row.id, path, row.content_hash)
            pool = self._replay_pool()
            plan = plan_file(
                file_id=row.id,
                name=row.name,
                content_hash=report.files[0].content_hash,
                seed=self.cfg.seed,
                train=train,
                micro_batch_size=self.cfg.train.micro_batch_size,
                replay_rows=replay_rows(self.cfg),
                replay_pool=pool,
                epochs=self.w.epochs_per_file,
                grad_accum_steps=self.trainer.grad_accum_steps,
                global_step=p.global_step,
                world_size=self.trainer.world_size,
            )
        except DataError as e:
            self._reject(row, str(e).replace(str(path), row.name))
            return None
        except FileTooSmallError as e:
            self._reject(row, f"{row.name}: {e}")
            return None
        val_before = self._eval(val, row.id, "file")
        plan.val_loss_before = val_before
        self.ledger.update(
            row.id,
            status="training",
            started_at=time.time(),
            global_step_start=p.global_step,
            val_loss_before=val_before,
        )
        cursor = DataCursor(
            plan.seed,
            len(train),
            plan.rows_per_micro * self.trainer.world_size,
            train.fingerprint,
        )
        self.stream.begin(plan, cursor)
        log.info(
            "file %d (%s): %d training rows (%d held out), %d epoch(s) = %d optimizer steps "
            "from global_step %d%s",
            row.id,
            row.name,
            len(train),
            len(val),
            plan.epochs,
            plan.steps_total,
            plan.global_step_start,
            f", {plan.replay_rows} replay row(s) per micro-batch" if plan.replay_rows else "",
        )
        return plan, train, val

    def _resume_file(
        self, row: FileRow, plan: FilePlan
    ) -> tuple[FilePlan, TokenizedDataset, TokenizedDataset]:
        path = self.layout.abs(row.path)
        try:
            train, val, _ = self.data.build(row.id, path, plan.content_hash)
        except DataError as e:
            raise DaemonError(
                f"cannot resume file {row.id} ({row.name}) in the middle: {e}; the checkpoint "
                f"needs {path} as it was when its training began"
            ) from None
        if train.fingerprint != plan.train_fingerprint or len(train) != plan.train_rows:
            raise DaemonError(
                f"cannot resume file {row.id} ({row.name}): its training rows differ from "
                "those the checkpoint was trained on (tokenizer or data settings changed?)"
            )
        cursor = DataCursor(
            plan.seed,
            len(train),
            plan.rows_per_micro * self.trainer.world_size,
            train.fingerprint,
        )
        self.stream.attach(cursor)
        log.info(
            "file %d (%s): resuming at step %d of %d (epoch %d, row %d of the epoch)",
            row.id,
            row.name,
            plan.steps_done,
            plan.steps_total,
            cursor.epoch,
            cursor.offset,
        )
        return plan, train, val

    def _replay_pool(self) -> list[list[int]]:
        if self.w.replay_fraction <= 0 or not self.stream.completed:
            return []
        ids = self.stream.completed
        if self.w.replay_window_files is not None:
            ids = ids[-self.w.replay_window_files :]
        pool = []
        for file_id in ids:
            train, _ = self._datasets(file_id)
            pool.append([file_id, len(train)])
        return pool

    def _checkpointed_row(self, file_id: int) -> FileRow:
        """The ledger row of a file the checkpoint names (replay pool, completed files).

        Raises:
            DaemonError: the ledger has no such file.
        """
        assert self.ledger is not None
        row = self.ledger.get(file_id)
        if row is None:
            raise DaemonError(f"file {file_id} is in the checkpoint but not in the ledger")
        return row

    def _file_ref(self, file_id: int) -> dict[str, Any]:
        """How the other ranks find file ``file_id`` (:func:`evertrain.daemon.ranks.file_ref`)."""
        row = self._checkpointed_row(file_id)
        return file_ref(file_id, self.layout.abs(row.path), row.content_hash)

    def _datasets(self, file_id: int) -> tuple[TokenizedDataset, TokenizedDataset]:
        row = self._checkpointed_row(file_id)
        try:
            return self.data.get(file_id, self.layout.abs(row.path), row.content_hash)
        except DataError as e:
            raise DaemonError(
                f"earlier file {file_id} ({row.name}) is needed for replay/evaluation but "
                f"cannot be read as it was trained: {e}"
            ) from None

    def _val_dataset(self, file_id: int) -> TokenizedDataset:
        row = self._checkpointed_row(file_id)
        try:
            return self.data.get_val(file_id, self.layout.abs(row.path), row.content_hash)
        except DataError as e:
            raise DaemonError(f"earlier file {file_id} ({row.name}) cannot be read: {e}") from None

    def _train_file(
        self, row: FileRow, plan: FilePlan, train: TokenizedDataset, val: TokenizedDataset
    ) -> None:
        tr, cursor = self.trainer, self.stream.cursor
        assert cursor is not None
        self._plan = plan
        self.sched.window = (plan.global_step_start, plan.global_step_end)
        replay = None
        if plan.replay_rows:
            pool = []
            for file_id, rows in plan.replay_pool:
                ds, _ = self._datasets(file_id)
                if len(ds) != rows:
                    raise DaemonError(
                        f"replay file {file_id} now has {len(ds)} training rows, the "
                        f"checkpoint planned with {rows}: data settings changed?"
                    )
                pool.append(ds)
            replay = ReplaySampler(self.cfg.seed, pool, plan.replay_rows)
        self._set_state("training")
        self._emit("file_start", {"id": row.id, "name": row.name, "plan": plan})
        self.link.send(
            "file",
            file=self._file_ref(row.id),
            plan=plan.to_json(),
            cursor=cursor.state_dict(),
            pool=[self._file_ref(file_id) for file_id, _ in plan.replay_pool],
        )
        batches = file_batches(
            plan,
            cursor,
            train,
            grad_accum_steps=tr.grad_accum_steps,
            num_workers=self.cfg.data.num_workers,
            replay=replay,
            rank=tr.rank,
            world_size=tr.world_size,
        )
        every = self.cfg.train.eval_every_steps
        try:
            while plan.steps_done < plan.steps_total:
                self._hold_while_paused()
                if self.stop_reason is not None:
                    return
                n = min(tr.grad_accum_steps, plan.micro_total - plan.micro_done)
                self.link.send("step", n=n, epoch=cursor.epoch)
                stats = tr.train_step(batches, epoch=cursor.epoch, micro_batches=n)
                if self.link.any_stop(self.stop_reason is not None) and self.stop_reason is None:
                    self.request_stop("a stop on another rank")
                plan.steps_done += 1
                if plan.loss_start is None:
                    plan.loss_start = stats.loss
                plan.loss_end = stats.loss
                self.meter.add(stats.tokens, stats.seconds)
                self._emit("step", {"stats": stats, "plan": plan})
                self._log_progress(plan, stats)
                if plan.steps_done == plan.steps_total:
                    break
                if every and stats.global_step % every == 0:
                    tr.last_eval = {}
                    loss = self._eval(val, plan.id, "file")
                    if loss is not None:
                        tr.last_eval = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
                self._maybe_save()
                self._tick()
        finally:
            batches.close()
        # not in the finally: after an error here the other ranks may be inside a
        # collective, and torchrun takes the group down when this rank exits
        self.link.send("end")
        self._finish_file(row, plan, val)

    def _hold_while_paused(self) -> None:
        self._control = self.controls.read()
        while self._control.paused and self.stop_reason is None:
            self._set_state("paused")
            self._sleep()
            self._tick()
        if self.stop_reason is None:
            self._set_state("training")

    def _maybe_save(self) -> None:
        tr = self.trainer
        if self._save_pending or tr.save_policy.should_save(
            tr.progress.global_step, time.monotonic()
        ):
            self._save_pending = self._save() is None

    def _save(self) -> Path | None:
        self.link.send("save")
        path: Path | None = self.trainer.save()
        if path is None:
            self.warning = (
                f"checkpoint at global_step {self.trainer.progress.global_step} skipped: not "
                "enough disk space (see the log); retrying, nothing is deleted"
            )
        else:
            self.warning = None
            self._last_checkpoint = {
                "global_step": self.trainer.progress.global_step,
                "path": self.layout.rel(path),
                "time": time.time(),
            }
        self._write_status(force=True)
        return path

    def _save_until_committed(self) -> bool:
        """Save; while the save is skipped for disk space, warn and retry every
        ``watch.disk_retry_seconds``. False if a stop was requested before it succeeded.
        Returns only once the checkpoint is committed (an asynchronous save is waited
        for): a file is done only when the checkpoint holding its last step is on disk."""
        while self._save() is None:
            log.warning(
                "CHECKPOINT NOT WRITTEN: the file cannot be marked done until it is; "
                "retrying in %g s (free disk space in %s)",
                self.w.disk_retry_seconds,
                self.layout.checkpoints,
            )
            deadline = time.monotonic() + self.w.disk_retry_seconds
            while self.stop_reason is None and time.monotonic() < deadline:
                self._sleep(min(self.w.poll_seconds, max(deadline - time.monotonic(), 0.01)))
                self._write_status()
            if self.stop_reason is not None:
                return False
        wait = getattr(self.trainer, "wait_for_checkpoint", None)
        if wait is not None:
            wait()
        return True

    def _finish_file(self, row: FileRow, plan: FilePlan, val: TokenizedDataset) -> None:
        assert self.ledger is not None
        tr = self.trainer
        val_after = self._eval(val, row.id, "file")
        tr.last_eval = (
            {}
            if val_after is None
            else {"val_loss": val_after, "val_ppl": math.exp(min(val_after, 50.0))}
        )
        self._eval_earlier()
        tr.metrics.write(
            {
                "kind": "file_end",
                "global_step": tr.progress.global_step,
                "file_id": row.id,
                "name": row.name,
            }
        )
        stats = {
            "id": row.id,
            "examples": plan.examples,
            "tokens": plan.tokens,
            "steps": plan.steps_done,
            "global_step_start": plan.global_step_start,
            "global_step_end": tr.progress.global_step,
            "loss_start": plan.loss_start,
            "loss_end": plan.loss_end,
            "val_loss_before": plan.val_loss_before,
            "val_loss_after": val_after,
        }
        self.stream.complete(stats)
        if self.w.replay_fraction <= 0:
            self.data.release_train(row.id)
        self._plan = None  # the scheduler keeps this file's window: the summary's lr needs it
        self._save_pending = False
        if not self._save_until_committed():
            return
        maybe_crash("filedone", row.id)
        values = {k: v for k, v in stats.items() if k != "id"}
        self._settle(row, "done", "processed", **values)
        log.info(
            "file %d (%s) done: %d examples, %d steps (global_step %d -> %d), loss %.4f -> "
            "%.4f, held-out %s -> %s",
            row.id,
            row.name,
            plan.examples,
            plan.steps_done,
            plan.global_step_start,
            tr.progress.global_step,
            plan.loss_start if plan.loss_start is not None else float("nan"),
            plan.loss_end if plan.loss_end is not None else float("nan"),
            _fmt(plan.val_loss_before),
            _fmt(val_after),
        )
        self._emit("file_end", {"id": row.id, "name": row.name, "stats": stats})
        self._maybe_snapshot_after_file()
        self._write_status(force=True)

    def _eval(self, val: TokenizedDataset, file_id: int, scope: str) -> float | None:
        if len(val) == 0:
            return None
        self.link.send("eval", file=self._file_ref(file_id))
        result = self.trainer.evaluate(val)
        self.trainer.metrics.write(
            {
                "kind": "eval",
                "global_step": self.trainer.progress.global_step,
                **result,
                "file_id": file_id,
                "scope": scope,
            }
        )
        return float(result["val_loss"])

    def _eval_earlier(self) -> None:
        n = self.w.eval_earlier_files
        earlier = self.stream.completed[-n:] if n else []
        for file_id in earlier:
            try:
                val = self._val_dataset(file_id)
            except DaemonError as e:
                log.warning("forgetting check skipped for file %d: %s", file_id, e)
                continue
            self._eval(val, file_id, "earlier")

    def _settle(self, row: FileRow, status: str, crash_point: str, **values: Any) -> None:
        """Give ``row`` its final ledger ``status`` (``done``, ``duplicate`` or ``rejected``;
        ``values``: further ledger columns, ``error`` required for ``rejected``), then move
        its file to that status's folder (a rejected one with its reason file). The ledger
        row comes first and already names the destination, so :func:`reconcile` can finish
        a move that a crash interrupted (``crash_point``: the fault-injection point between
        the two)."""
        assert self.ledger is not None
        dest = self.layout.folder(status) / stored_name(row.id, row.name)
        self.ledger.update(
            row.id, status=status, path=self.layout.rel(dest), finished_at=time.time(), **values
        )
        maybe_crash(crash_point, row.id)
        if status == "rejected":
            write_reason(dest, row.name, values["error"])
        move(self.layout.abs(row.path), dest)

    def _reject(self, row: FileRow, reason: str) -> None:
        self._settle(row, "rejected", "reject", error=reason)
        log.warning("REJECTED %s (file %d): %s", row.name, row.id, reason)
        self._emit("rejected", {"id": row.id, "name": row.name, "reason": reason})

    def _duplicate(self, row: FileRow, original: FileRow) -> None:
        note = (
            f"identical to file {original.id} ({original.name}), already trained; not "
            "trained again (set watch.retrain_duplicates: true to train duplicates)"
        )
        self._settle(row, "duplicate", "processed", error=note)
        log.info("file %d (%s): %s", row.id, row.name, note)
        self._emit("duplicate", {"id": row.id, "name": row.name, "original": original.id})

    # ------------------------------------------------------------------ snapshots

    def _maybe_snapshot_after_file(self) -> None:
        if self.snapshots.due_files(len(self.stream.completed)):
            self._snapshot("files")

    def _snapshot(self, reason: str) -> None:
        if self.trainer.progress.global_step == 0:
            log.info("snapshot (%s) skipped: nothing trained yet", reason)
            return
        try:
            self.snapshots.take(
                self.trainer.model,
                self.trainer.tokenizer,
                global_step=self.trainer.progress.global_step,
                files=list(self.stream.completed),
                reason=reason,
            )
        except OSError as e:
            # A snapshot is an export; failing one must not stop training or lose state.
            log.error("SNAPSHOT FAILED (%s): %s; training goes on", reason, e)
            self.warning = f"snapshot failed: {e}"
        self._write_status(force=True)

    # ------------------------------------------------------------------ status

    def _log_progress(self, plan: FilePlan, stats: Any) -> None:
        now = time.monotonic()
        if now - self._last_progress_log < PROGRESS_LOG_SECONDS and plan.steps_done not in (
            1,
            plan.steps_total,
        ):
            return
        self._last_progress_log = now
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

    def status_dict(self) -> dict[str, Any]:
        """The status record (see :mod:`evertrain.daemon.status`)."""
        tr = self.trainer
        p = tr.progress if tr is not None else None
        losses = p.recent_losses[-20:] if p is not None else []
        current = None
        plan = self._plan
        if plan is not None:
            sps = self.meter.seconds_per_step()
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
        ledger = self.ledger
        queue = (
            [
                r.name
                for r in ledger.rows("queued", "validating", "training")
                if plan is None or r.id != plan.id
            ]
            if ledger is not None
            else []
        )
        last_snap = None
        if ledger is not None:
            snaps = ledger.snapshots()
            if snaps:
                s = snaps[-1]
                last_snap = {"path": s.path, "global_step": s.global_step, "time": s.time}
        lr = None
        if tr is not None and p is not None and p.global_step > 0:
            with contextlib.suppress(ValueError):
                lr = tr.scheduler.lr_at(p.global_step - 1)
        return {
            "state": self.state,
            "pid": os.getpid(),
            "updated": time.time(),
            "global_step": p.global_step if p is not None else None,
            "loss": sum(losses) / len(losses) if losses else None,
            "lr": lr,
            "tokens_per_second": self.meter.tokens_per_second(),
            "current_file": current,
            "queue": queue,
            "inbox": list(self.scanner.settling) if self.scanner is not None else [],
            "last_checkpoint": self._last_checkpoint,
            "last_snapshot": last_snap,
            "counts": ledger.counts() if ledger is not None else {},
            "warning": self.warning,
            "watcher": self.watcher.mode if self.watcher is not None else None,
        }

    def _write_status(self, force: bool = False) -> None:
        if force or self.status.due():
            try:
                self.status.write(self.status_dict())
            except OSError as e:
                log.warning("cannot write %s: %s", self.layout.status, e)

    # ------------------------------------------------------------------ stop

    def _shutdown(self) -> int:
        self._set_state("stopping")
        code = 0
        tr = self.trainer
        if tr is not None and tr.save_policy_last_step() != tr.progress.global_step:
            if self._save() is None:
                log.error(
                    "FINAL CHECKPOINT NOT WRITTEN (no disk space): the next start resumes from "
                    "global_step %s and repeats the steps after it",
                    tr.save_policy_last_step(),
                )
                code = 1
        if self.stop_reason is not None:
            log.warning(
                "stopped by %s at global_step %d; checkpoint saved. Resume with: evertrain "
                "watch %s",
                self.stop_reason,
                tr.progress.global_step,
                self.layout.root,
            )
        self._plan = None
        self.status.stop_heartbeat()  # it must not rewrite an older state over "stopped"
        self._set_state("stopped")
        return code


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
