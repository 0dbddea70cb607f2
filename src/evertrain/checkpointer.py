"""The public face of the engine for a user's own training loop: :class:`Checkpointer`.

It owns the run directory (``RUN/checkpoints/step-N`` in format v1, ``RUN/metrics.jsonl``),
the state owners (model, optimizer, LR scheduler, data, extras, RNG, progress), the stored
config and its drift check, the save and retention policies, async saving and the stop
signals. A loop that calls :meth:`Checkpointer.resume` once and :meth:`Checkpointer.step`
after every optimizer step resumes bit-identically after a ``kill -9`` at any moment.

Thread-safety: call every method from the training thread. Process-safety: one
Checkpointer per run directory per rank; under torchrun every rank builds one (after
``torch.distributed.init_process_group``) and calls :meth:`~Checkpointer.resume` and
:meth:`~Checkpointer.step` in lockstep (they run collectives).
"""

from __future__ import annotations

import logging
import re
import signal
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from evertrain.checkpoint import (
    CheckpointInfo,
    CheckpointManager,
    InsufficientDiskSpaceError,
    KeepLast,
    RetentionPolicy,
    SavePolicy,
)
from evertrain.checkpoint.format import STEP_DIR_RE
from evertrain.checkpoint.ranks import choose_checkpoint, save_ranked
from evertrain.config_json import config_to_json
from evertrain.distributed import Group, NullMetricsLog, current_group
from evertrain.metrics import MetricsLog
from evertrain.owners import (
    ObjectState,
    check_loader_rng,
    is_stateful,
    model_owner,
    optimizer_owner,
)
from evertrain.progress import Progress
from evertrain.resume_checks import ResumeError
from evertrain.resume_states import RANK_SUFFIX, owner_states
from evertrain.rng import RNGState
from evertrain.runlock import LOCK_NAME, RunLock
from evertrain.signals import on_stop_signals
from evertrain.trackers import Tracker, set_aside_tracker_runs
from evertrain.versions import versions

log = logging.getLogger("evertrain")

# Owners every rank saves for itself: RNG streams and data positions differ between ranks.
PER_RANK = ("data", "rng")
EXTRA_NAME = re.compile(r"[a-z0-9_]+")
RESERVED = frozenset(
    {"model", "optimizer", "scheduler", "data", "rng", "progress", "config", "versions"}
)


class Checkpointer:
    """Exact, pickle-free checkpoints for any training loop.

    Args:
        run_dir: the run directory (created); checkpoints go to ``run_dir/checkpoints``,
            ``step()`` metrics to ``run_dir/metrics.jsonl``.
        model: any ``nn.Module``, plain or wrapped in DDP and/or ``torch.compile``; every
            parameter and persistent buffer is saved under the unwrapped names.
        optimizer: any torch optimizer over ``model``'s parameters (moments are stored by
            parameter name; needs ``model``).
        scheduler: any object with ``state_dict()``/``load_state_dict()``, e.g. a
            ``torch.optim.lr_scheduler.LRScheduler`` (``LambdaLR`` included: its lambdas
            are code, not state, and are not saved).
        data: the data position, e.g. a ``torchdata.stateful_dataloader.StatefulDataLoader``
            (pass it a ``generator=`` so it never draws from the global RNG). Saved per rank.
        extra: more owners by name (``[a-z0-9_]+``, not a reserved name); rank 0's state is
            saved.
        config: a dict, dataclass, OmegaConf config or pydantic model; stored as JSON and
            compared on resume.
        allow_config_change: ``True`` to resume whatever changed in ``config``, the dotted
            keys (and their sub-keys) that may change, or a predicate on a dotted key; any
            other change is refused.
        every_steps / every_seconds: save after every N optimizer steps (on multiples of
            N) and/or when N seconds have passed since the last save.
        keep_last: committed checkpoints to keep (ignored when ``keep`` is given).
        keep: a retention policy (:class:`~evertrain.checkpoint.KeepLast`, ``KeepBest``,
            ``KeepEvery``, combined with ``|``).
        async_save: copy the state to host memory at a save and write it in a background
            thread; with several processes each rank writes its own part in the background
            and the commit is agreed over a second (gloo) process group.
        trackers: experiment trackers (:mod:`evertrain.trackers`: TensorBoard, MLflow, W&B,
            or anything with ``start``/``log``/``close``) that get every ``metrics.jsonl``
            record on rank 0, started at :meth:`resume`; a resume never logs a step twice.
        min_free_bytes: bytes that must stay free after a save; a save that would go below
            is skipped (warned) and retried after each following step.
        owners: owners used as they are (each with ``state_dict()``/``load_state_dict()``
            returning a versioned state of JSON values and tensors), saved under their names
            before ``progress`` and ``rng``; how :class:`evertrain.Trainer` passes its own.
        progress: the counters owner (default a new :class:`~evertrain.progress.Progress`).
        per_rank: owners every rank saves for itself (``<name>_rank<R>`` for rank R > 0).
        rank_state: ``(owner, states) -> state`` for a per-rank owner the checkpoint lacks
            for this rank: when given, a resume on another number of processes is allowed
            (owners of ranks that no longer exist are dropped); when None it is refused.
        summary: called at each save; its JSON fields are added to the manifest summary
            (a ``"metrics"`` field replaces the last ``step()`` metrics there).
        group: this process's place in the run (default: from the initialised default
            process group, else one process).
        lock: hold the run directory's lock (``RUN/daemon.lock``, rank 0) from here to
            :meth:`close`, so a second writer (another loop, ``evertrain train`` or
            ``watch``) is refused instead of corrupting the run; shared with the holder
            when this process already holds it (the daemon).

    Raises:
        TypeError: an owner without ``state_dict``/``load_state_dict``, an optimizer without
            a model, a bad or reserved ``extra`` name.
        evertrain.config_json.ConfigTypeError: ``config`` holds a value JSON cannot store.
        evertrain.distributed.DistributedError: several torchrun processes but no process
            group.
        evertrain.runlock.RunLockedError: another process writes the run directory (the
            message names its pid, host and start time).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        data: Any = None,
        extra: Mapping[str, Any] | None = None,
        config: Any = None,
        allow_config_change: bool | Collection[str] | Callable[[str], bool] = False,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        keep_last: int = 3,
        keep: RetentionPolicy | None = None,
        async_save: bool = False,
        trackers: Sequence[Tracker] = (),
        min_free_bytes: int = 0,
        owners: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
        per_rank: Collection[str] = PER_RANK,
        rank_state: Callable[[str, Mapping[str, Any]], dict[str, Any]] | None = None,
        summary: Callable[[], Mapping[str, Any]] | None = None,
        group: Group | None = None,
        lock: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.owners: dict[str, Any] = {}
        if model is not None:
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"model: a {type(model).__name__} is not a torch.nn.Module")
            self.owners["model"] = model_owner(model)
        if optimizer is not None:
            self.owners["optimizer"] = optimizer_owner(optimizer, model)
        if scheduler is not None:
            self.owners["scheduler"] = ObjectState(scheduler, "scheduler")
        if data is not None:
            check_loader_rng(data)
            self.owners["data"] = ObjectState(data, "data")
        for name, obj in (extra or {}).items():
            # a name like loss_rank1 would read back as rank 1's state of an owner "loss"
            if (
                not isinstance(name, str)
                or name in RESERVED
                or not EXTRA_NAME.fullmatch(name)
                or RANK_SUFFIX.search(name)
            ):
                raise TypeError(
                    f"extra: name {name!r} is reserved or not [a-z0-9_]+; use another name "
                    f"(not one of {sorted(RESERVED)}, not ending in _rank<N>)"
                )
            self.owners[name] = ObjectState(obj, name)
        for name, obj in (owners or {}).items():
            if not is_stateful(obj):
                raise TypeError(f"owners[{name!r}]: has no state_dict()/load_state_dict()")
            self.owners[name] = obj
        self.progress = Progress() if progress is None else progress
        self.owners["progress"] = self.progress
        self.owners["rng"] = RNGState()  # restored last: nothing may draw after it
        self.config = None if config is None else config_to_json(config)
        self.allow_config_change = allow_config_change
        self.group = current_group() if group is None else group
        self.async_save = async_save
        self.trackers = list(trackers)
        self.per_rank = tuple(n for n in per_rank if n in self.owners) + tuple(
            n for n, o in self.owners.items() if getattr(o, "sharded", False)
        )
        self.rank_state = rank_state
        self.summary_fields = summary or dict
        self.save_policy = SavePolicy(every_steps, every_seconds)
        self.manager = CheckpointManager(
            self.run_dir / "checkpoints",
            keep or KeepLast(keep_last),
            log=log.warning,
            min_free_bytes=min_free_bytes,
        )
        self.metrics: MetricsLog | None = None
        self.should_stop = False
        self.stop_reason: str | None = None
        self.last_checkpoint: Path | None = None
        self.last_saved_step: int | None = None  # committed (or resumed from) by this process
        self._signal: str | None = None
        self._resumed_from: int | None = None
        self._last_metrics: dict[str, Any] = {}
        self._save_pending = False
        # the last save, skipped for too little disk space (retried at every step until
        # one is written); a loop that ends with one must not report its steps as saved
        self.skipped_save: InsufficientDiskSpaceError | None = None
        self._closed = False
        self._chose = False
        self._overrides: dict[str, dict[str, Any]] = {}
        self._side: Group | None = None  # the async commit's own process group
        self._lock = RunLock(self.run_dir / LOCK_NAME) if lock and self.group.rank == 0 else None
        if self._lock is not None:
            self._lock.acquire()  # last: a refused argument above leaves no directory behind
        self._chosen: CheckpointInfo | None = None

    # ------------------------------------------------------------------ resume

    @property
    def global_step(self) -> int:
        """Optimizer steps completed (restored by :meth:`resume`, set by :meth:`step`)."""
        return self.progress.global_step

    def _open_metrics(self) -> MetricsLog:
        if self.metrics is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / "metrics.jsonl"
            self.metrics = (
                MetricsLog(path, self.trackers) if self.group.rank == 0 else NullMetricsLog()
            )
        return self.metrics

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint :meth:`resume` will restore: the newest that verifies completely
        (every rank's files included), chosen once and remembered; None if there is none.
        Damaged ones are warned about (file and problem) and skipped, never deleted.
        Collective under torchrun: rank 0 reads and chooses, every rank gets its choice."""
        if not self._chose:
            root = self.run_dir / "checkpoints"
            self._chosen = choose_checkpoint(root, self.group, log.warning)
            self._chose = True
        return self._chosen

    def use_checkpoint(self, info: CheckpointInfo | None) -> None:
        """Make :meth:`resume` restore ``info``, a checkpoint already chosen with
        :func:`~evertrain.checkpoint.ranks.choose_checkpoint` (by every rank), instead of
        choosing again: for a caller that must read the checkpoint's summary before it
        can build its owners (the batch split of a resume on another world size)."""
        self._chosen, self._chose = info, True

    def override_state(self, name: str, state: dict[str, Any]) -> None:
        """Save ``state`` as owner ``name``'s state at every later save instead of asking
        the owner, which is left as it is: for a state that must be checkpointed but not
        applied to this process (an RNG state imported from another trainer).

        Raises:
            KeyError: no owner ``name``.
        """
        if name not in self.owners:
            raise KeyError(f"no owner {name!r}; the owners are {sorted(self.owners)}")
        self._overrides[name] = state

    @property
    def stop_requested(self) -> str | None:
        """The name of the stop signal received inside :meth:`stop_on_signals` on this
        rank (``"SIGTERM"``, ``"SIGINT"``), else None."""
        return self._signal

    def start_fresh(self, *, new_tracker_runs: bool = True) -> None:
        """Begin at global_step 0 although the run directory has checkpoints (they are kept;
        ``metrics.jsonl`` is emptied; MLflow and W&B get new runs, the ids of the old ones
        set aside in ``RUN/trackers/``). Instead of :meth:`resume`."""
        self._open_metrics().rewind(0)
        if new_tracker_runs:
            set_aside_tracker_runs(self.run_dir)
        self.metrics.start_trackers(0)  # type: ignore[union-attr]
        self._resumed_from = 0
        self.save_policy.mark_saved(0, time.monotonic())

    def resume(self) -> int:
        """Restore every owner from the newest checkpoint that verifies; return its global_step
        (0 for a run directory without checkpoints: it is created, with an empty
        ``metrics.jsonl``, and no owner is touched).

        Order: the config is checked first (nothing is restored on a refused change), then
        model, optimizer, scheduler, data, extras, progress, and the Python, NumPy, torch CPU
        and CUDA RNG states last. Under torchrun every rank gets its own RNG and data state
        back. ``metrics.jsonl`` is cut back to the checkpoint's step, so replayed steps are
        logged once. Collective under torchrun.

        Raises:
            ResumeError: checkpoint directories exist but none verifies (each problem was
                warned with the file and what is wrong), the stored config differs in keys
                not allowed to change, or the world size differs from the checkpoint's.
            evertrain.state.StateError: a checkpoint that does not fit an owner (another
                model, optimizer class, scheduler class, parameter shapes). Owners are
                checked for a state first; one whose own ``load_state_dict`` refuses the
                state fails after the owners before it were restored. Nothing in the run
                directory is written when resuming fails.
        """
        info = self.latest()
        if info is None:
            # only committed names count: a step-N.tmp (a first save cut short by a kill,
            # e.g. in the background) was never a checkpoint, and must not block a start
            root = self.run_dir / "checkpoints"
            if any(STEP_DIR_RE.fullmatch(p.name) for p in root.glob("step-*")):
                raise ResumeError(
                    f"{self.run_dir}: has checkpoint directories but none verifies (see the "
                    f"warnings above); run `evertrain verify {self.run_dir}`, or start over "
                    f"(`evertrain train --fresh` keeps the damaged ones)"
                )
            # a run killed before its first checkpoint: the same tracker runs continue
            self.start_fresh(new_tracker_runs=False)
            return 0
        states = owner_states(
            self.manager, info, self.owners, self.per_rank, self.group, self.rank_state,
            self.config, self.allow_config_change,
        )  # fmt: skip
        for name, owner in self.owners.items():
            owner.load_state_dict(states[name])
        # opened only now: a refused resume leaves the run directory as it was
        self._open_metrics().rewind(int(info.summary.get("metrics_offset", 0)))
        self.metrics.start_trackers(self.progress.global_step)  # type: ignore[union-attr]
        self._last_metrics = dict(info.summary.get("metrics", {}))
        self._resumed_from = self.progress.global_step
        self.last_checkpoint, self.last_saved_step = info.path, self.progress.global_step
        self.save_policy.mark_saved(self.progress.global_step, time.monotonic())
        log.info("resumed from %s (global_step %d)", info.path, self.progress.global_step)
        return self.progress.global_step

    # ------------------------------------------------------------------ the loop's side

    @contextmanager
    def stop_on_signals(self) -> Iterator[Checkpointer]:
        """Inside the block, SIGTERM/SIGINT only set a flag: the next :meth:`step` saves a
        checkpoint and sets :attr:`should_stop`, so the loop leaves after the step in
        flight. The previous handlers come back on exit (main thread only; elsewhere
        nothing is installed)."""

        def handle(signum: int, frame: Any) -> None:
            self._signal = signal.Signals(signum).name

        with on_stop_signals(handle):
            yield self

    def step(
        self, global_step: int, metrics: Mapping[str, Any] | None = None, *, save: bool = False
    ) -> Path | None:
        """Record that optimizer step ``global_step`` is done; save when the policy says so
        (or ``save`` is true, e.g. at the last step).

        Call after ``optimizer.step()`` (and the scheduler's step), never mid-accumulation:
        a checkpoint holds exactly the state between two optimizer steps. ``metrics`` (JSON
        values: a loss in nats, an LR, ...) are written to ``metrics.jsonl`` as
        ``{"kind": "train", "global_step": N, **metrics}`` by rank 0 and kept in the
        checkpoint's summary (``KeepBest`` reads them). A stop signal (see
        :meth:`stop_on_signals`) on any rank saves on every rank and sets
        :attr:`should_stop`. Collective under torchrun.

        Returns:
            The checkpoint directory saved now (with ``async_save`` committed in the
            background), else None.

        Raises:
            RuntimeError: :meth:`resume` was not called first, or ``global_step`` does not
                increase.
            CheckpointError: an owner's state holds a value that is neither JSON nor a
                tensor (the message names the owner and key path); or the previous
                background save failed.
        """
        if self._resumed_from is None or self.metrics is None:
            raise RuntimeError("call Checkpointer.resume() once before the first step()")
        if global_step <= self.progress.global_step:
            raise RuntimeError(
                f"step({global_step}) after step {self.progress.global_step}: global_step must "
                f"increase"
            )
        self.check()
        self.progress.global_step = global_step
        if metrics:
            self._last_metrics = dict(metrics)
            self.metrics.write({"kind": "train", "global_step": global_step, **metrics})
        return self.maybe_save(force=save)

    def maybe_save(self, *, force: bool = False) -> Path | None:
        """The save decision after an optimizer step, at the current global_step: save if
        ``force``, if the save policy is due, if an earlier save was skipped for disk space,
        or if a stop signal arrived on any rank (then :attr:`should_stop` is set, saved or
        not). What :meth:`step` does after logging; the :class:`~evertrain.Trainer`, which
        counts its own steps, calls it directly. Collective under torchrun.

        Returns:
            The checkpoint directory saved now, else None.

        Raises:
            CheckpointError: as :meth:`save`.
        """
        due = self.save_policy.should_save(self.progress.global_step, time.monotonic())
        sig = signal.Signals[self._signal].value if self._signal else 0
        # one collective for both decisions: a timer or a signal on one rank only would
        # otherwise leave the other ranks waiting in the save's collectives
        sig, due_any = self.group.max_ints([sig, int(due or force or self._save_pending)])
        saved = None
        if sig or due_any:
            saved = self.save()
        if sig:
            self.should_stop, self.stop_reason = True, signal.Signals(sig).name
        return saved

    def log(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (JSON values, e.g. ``{"kind": "eval", "global_step": N,
        "val_loss": x}``) to ``metrics.jsonl`` (rank 0); rewound with the checkpoints.

        Raises:
            RuntimeError: :meth:`resume` (or :meth:`start_fresh`) was not called first.
            TypeError: a value JSON cannot write.
        """
        if self.metrics is None:
            raise RuntimeError("call Checkpointer.resume() before log()")
        self.metrics.write(dict(record))

    def save(self) -> Path | None:
        """Commit a checkpoint of every owner at the current global_step now. Collective
        under torchrun (every rank writes its per-rank owners, rank 0 commits).

        Returns:
            The checkpoint directory, or None when skipped for disk space (warned; retried
            after the next step).

        Raises:
            CheckpointError: a state value that is neither JSON nor a tensor, named by owner
                and key path (nothing is written); CheckpointWriteError on an OS error.
            RuntimeError: :meth:`resume` (or :meth:`start_fresh`) was not called first.
        """
        if self.metrics is None:
            raise RuntimeError("call Checkpointer.resume() before save()")
        self.metrics.sync()
        rank, step = self.group.rank, self.progress.global_step
        states = {
            name: self._overrides[name] if name in self._overrides else owner.state_dict()
            for name, owner in self.owners.items()
            if rank == 0 or name in self.per_rank
        }
        if self.config is not None:
            states["config"] = {"version": 1, "config": self.config}
        states["versions"] = versions()
        summary = {
            "global_step": step,
            "metrics": self._last_metrics,
            "time": time.time(),
            "metrics_offset": self.metrics.offset(),
            "torch_threads": torch.get_num_threads(),
            **self.summary_fields(),
        }
        protect = [self._resumed_from] if self._resumed_from else []
        try:
            if self.group.world_size > 1:
                path = save_ranked(
                    self.manager,
                    self.group,
                    step,
                    states,
                    summary,
                    per_rank_owners=self.per_rank,
                    protect=protect,
                    async_group=self._async_group() if self.async_save else None,
                )
            elif self.async_save:
                path = self.manager.save_async(step, states, summary, protect=protect)
            else:
                path = self.manager.save(step, states, summary, protect=protect)
        except InsufficientDiskSpaceError as e:
            log.warning("CHECKPOINT SKIPPED at global_step %d: %s; will retry", step, e)
            self._save_pending = True
            self.skipped_save = e
            return None
        self._save_pending = False
        self.skipped_save = None
        self.save_policy.mark_saved(step, time.monotonic())
        self.last_checkpoint, self.last_saved_step = path, step
        self._log_save_stats()
        return path

    def _async_group(self) -> Group:
        # created at the first save, which every rank reaches at the same global_step
        if self._side is None:
            self._side = self.group.side_group()
        return self._side

    def _log_save_stats(self) -> None:
        # each save's cost (stall, write, bytes) goes to metrics.jsonl once it is known
        if self.metrics is not None:
            for stats in self.manager.take_stats():
                self.metrics.write(stats.as_metrics())

    def check(self) -> None:
        """Raise the error of a background save that failed since the last call, if any;
        never blocks. :meth:`step` calls it; a loop driving :meth:`maybe_save` itself calls
        it once per step."""
        self.manager.check()
        self._log_save_stats()

    def wait(self) -> None:
        """Block until a background save is committed; raise its error if it failed."""
        self.manager.wait()
        self._log_save_stats()

    def close(self) -> None:
        """Wait for a background save (raising its error), then close the files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.skipped_save is not None:
            log.error(
                "closed with global_step %d unsaved (the last save was skipped: %s); the "
                "newest checkpoint is global_step %s",
                self.progress.global_step,
                self.skipped_save,
                self.last_saved_step,
            )
        try:
            self.manager.close()  # the background commit, the side group's last user, is over
            if self._side is not None:
                self.group.destroy_side_group(self._side)
                self._side = None
        finally:
            if self.metrics is not None:
                self.metrics.close()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
