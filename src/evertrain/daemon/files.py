"""One file's way through the daemon: duplicate check, validation, training, end.

The per-file state machine of :class:`~evertrain.daemon.loop.Daemon` (a ledger row goes
``queued`` -> ``validating`` -> ``training`` -> ``done``, or to ``duplicate``/``rejected``),
with the saves and evaluations a file needs. :class:`FileWork` is mixed into the daemon,
which provides the state and the loop helpers declared at the top of the class.

A bad file never stops the daemon:

- any exception while a file is validated, tokenised or trained rejects the file, with
  the error as its reason, and the daemon goes on with the next one; not stop signals
  (``KeyboardInterrupt``, ``SystemExit``), and not errors of the run itself
  (:func:`~evertrain.daemon.errors.is_run_error`: a full disk, the ledger, a checkpoint),
  which would fail every later file the same way. A file rejected in the middle of its
  training leaves the stream there: its steps so far stay trained (the reason says how
  many), and the next file continues from that global_step;
- a file that kills the daemon outright (SIGKILL, a segfault, the OOM killer) cannot
  be caught, so it is counted instead: the ledger's ``attempts`` goes up *before* the
  work on a file begins and back down whenever the work ends with the process alive
  (done, rejected, stopped, or an error that stops the daemon). What is left after a
  restart is the number of deaths, counted since the file's training last advanced a
  checkpoint (``attempt_step``), so a file killed once mid-training resumes as before.
  A file with :data:`MAX_DEATHS` deaths is rejected ("the daemon died twice while
  processing it") instead of being tried again.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertrain.daemon.badfiles import BadFiles
from evertrain.daemon.errors import DaemonError
from evertrain.daemon.layout import stored_name
from evertrain.daemon.ledger import FileRow
from evertrain.daemon.ranks import file_ref
from evertrain.daemon.reconcile import move, write_reason
from evertrain.daemon.replay import ReplaySampler
from evertrain.daemon.settings import replay_rows
from evertrain.daemon.stream import FilePlan, FileTooSmallError, file_batches, plan_file
from evertrain.data import DataCursor, DataError, TokenizedDataset, validate_file
from evertrain.errors import DivergedError
from evertrain.faults import maybe_crash, maybe_raise

if TYPE_CHECKING:
    from evertrain.config import RunConfig, WatchConfig
    from evertrain.daemon.control import Control, ControlReader
    from evertrain.daemon.filedata import FileData
    from evertrain.daemon.layout import RunLayout
    from evertrain.daemon.ledger import Ledger
    from evertrain.daemon.ranks import RankLink
    from evertrain.daemon.schedule import StreamScheduler
    from evertrain.daemon.status import ProgressLog, StepMeter
    from evertrain.daemon.stream import StreamState
    from evertrain.trainer import StepStats

log = logging.getLogger("evertrain.daemon")


class FileWork(BadFiles):
    """Starts, resumes, trains and finishes one ledger row's file (see the module
    docstring). Not usable on its own: :class:`~evertrain.daemon.loop.Daemon` inherits it."""

    if TYPE_CHECKING:  # provided by the daemon
        layout: RunLayout
        cfg: RunConfig
        w: WatchConfig
        ledger: Ledger | None
        trainer: Any
        stream: StreamState
        data: FileData
        sched: StreamScheduler
        link: RankLink
        meter: StepMeter
        progress_log: ProgressLog
        controls: ControlReader
        stop_reason: str | None
        state: str
        warning: str | None
        _plan: FilePlan | None
        _control: Control
        _save_pending: bool
        _last_checkpoint: dict[str, Any] | None

        def request_stop(self, reason: str = "request") -> None: ...
        def _set_state(self, state: str) -> None: ...
        def _emit(self, event: str, payload: dict[str, Any]) -> None: ...
        def _sleep(self, seconds: float | None = None) -> None: ...
        def _tick(self, scan: bool = False) -> None: ...
        def _write_status(self, force: bool = False) -> None: ...
        def _maybe_snapshot_after_file(self) -> None: ...

    def _process(self, row: FileRow) -> None:
        """Take ``row``'s file through its next stage (see the module docstring): quarantine
        it, or start/resume, validate and train it, rejecting it on an error of its own."""
        if not self._begin_attempt(row):
            return
        died = False
        try:
            self._work(row)
        except Exception as e:
            died = self._stops_the_group(row, e)
            raise
        finally:
            if not died:
                self._end_attempt(row)

    def _work(self, row: FileRow) -> None:
        self._phase = "validating"
        try:
            cur = self.stream.current
            loaded: tuple[FilePlan, TokenizedDataset, TokenizedDataset] | None
            if row.status == "training" and cur is not None and cur.id == row.id:
                self._phase = "training"
                loaded = self._resume_file(row, cur)
            else:
                loaded = self._start_file(row)
            if loaded is None:
                return
            plan, train, val = loaded
            self._train_file(row, plan, train, val)
        except DivergedError as e:
            # the model diverged, not the file: the daemon stops (exit 3) naming the file
            raise DivergedError(f"{row.name}: {e}") from e
        except Exception as e:
            if not self._is_file_error(row, e):
                raise
            self._fail_file(row, e)

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
        self._phase = "training"
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
        maybe_raise("trainerror", row.id)
        batches = file_batches(
            plan,
            cursor,
            train,
            grad_accum_steps=tr.grad_accum_steps,
            num_workers=self.cfg.data.num_workers,
            replay=replay,
            rank=tr.rank,
            world_size=tr.world_size,
            trim=tr.settings.trim_padding,
        )
        every = self.cfg.train.eval_every_steps
        micro = [0]  # micro-batches of the step about to run (rank 0 decides, tells the others)

        def before_step() -> bool:
            self._hold_while_paused()
            if self.stop_reason is not None:
                return False
            micro[0] = min(tr.grad_accum_steps, plan.micro_total - plan.micro_done)
            self.link.send("step", n=micro[0], epoch=cursor.epoch)
            return True

        def after_step(stats: StepStats) -> bool:
            if self.link.any_stop(self.stop_reason is not None) and self.stop_reason is None:
                self.request_stop("a stop on another rank")
            plan.steps_done += 1
            # a rollback may undo steps of earlier files too; the row counts its own
            plan.steps_skipped += min(stats.steps_undone, plan.steps_done)
            if plan.loss_start is None:
                plan.loss_start = stats.loss
            plan.loss_end = stats.loss
            self.meter.add(stats.tokens, stats.seconds)
            self._emit("step", {"stats": stats, "plan": plan})
            self.progress_log.step(plan, stats)
            if plan.steps_done == plan.steps_total:
                return False
            if every and stats.global_step % every == 0:
                tr.record_eval({})
                loss = self._eval(val, plan.id, "file")
                if loss is not None:
                    tr.record_eval({"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))})
            self._maybe_save()
            self._tick()
            return True

        try:
            tr.run(
                batches,
                plan.steps_total - plan.steps_done,
                epoch=lambda: cursor.epoch,
                micro_batches=lambda done: micro[0],
                before_step=before_step,
                after_step=after_step,
            )
        finally:
            batches.close()
        if plan.steps_done < plan.steps_total:
            return  # stopped: the file resumes from the checkpoint on the next start
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
        ``watch.retry_seconds``. False if a stop was requested before it succeeded.
        Returns only once the checkpoint is committed (an asynchronous save is waited
        for): a file is done only when the checkpoint holding its last step is on disk."""
        before = self.state
        while self._save() is None:
            self.warning = f"paused: {self.warning}"
            self._set_state("paused")
            log.warning(
                "CHECKPOINT NOT WRITTEN: the file cannot be marked done until it is; "
                "retrying in %g s (free disk space in %s)",
                self.w.retry_seconds,
                self.layout.checkpoints,
            )
            deadline = time.monotonic() + self.w.retry_seconds
            while self.stop_reason is None and time.monotonic() < deadline:
                self._sleep(min(self.w.poll_seconds, max(deadline - time.monotonic(), 0.01)))
                self._write_status()
            if self.stop_reason is not None:
                return False
        self._set_state(before)
        wait = getattr(self.trainer, "wait_for_checkpoint", None)
        if wait is not None:
            wait()
        return True

    def _finish_file(self, row: FileRow, plan: FilePlan, val: TokenizedDataset) -> None:
        assert self.ledger is not None
        tr = self.trainer
        val_after = self._eval(val, row.id, "file")
        tr.record_eval(
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
            "skipped_steps": plan.steps_skipped,
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
        if status != "rejected":  # a rejected row keeps its count of daemon deaths
            values = {"attempts": 0, "attempt_step": None, **values}
        self.ledger.update(
            row.id, status=status, path=self.layout.rel(dest), finished_at=time.time(), **values
        )
        maybe_crash(crash_point, row.id)
        if status == "rejected":
            write_reason(self.layout.rejected, row.id, row.name, values["error"])
        src = self.layout.abs(row.path)
        if not os.path.lexists(src):
            # removed from queue/ by hand: the verdict stands, there is just nothing to move
            log.warning("file %d (%s): %s is missing", row.id, row.name, src)
            return
        move(src, dest)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
