"""The one training loop: :class:`Trainer` takes a model, an optimizer, an LR scheduler and
data, and saves and resumes through a :class:`~evertrain.checkpointer.Checkpointer`.

``evertrain train`` and ``evertrain watch`` build it from YAML (:mod:`evertrain.recipe`);
the daemon and its torchrun followers drive the same :meth:`Trainer.run` /
:meth:`Trainer.train_step` with hooks. Nothing outside this module sets its attributes.

Exactness contract: a resumed run is bit-identical to one that never stopped, because
every piece of state has one checkpointed owner, the data order and the LR are pure
functions of (seed, epoch) and global_step, nothing but the step draws from a global RNG,
and checkpoints are taken only between optimizer steps.

Process-safety: one trainer per run directory; under torchrun one per rank, in lockstep:
rank 0 writes the metrics and commits checkpoints, every rank writes its own RNG state.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from evertrain import distributed
from evertrain import owners as owners_lib
from evertrain import precision as precision_lib
from evertrain.checkpoint import CheckpointInfo, retention_from_config
from evertrain.checkpointer import Checkpointer, ResumeError
from evertrain.config import CheckpointConfig, ConfigError
from evertrain.data import DataCursor, make_loader
from evertrain.data.loader import dataset_fingerprint
from evertrain.faults import maybe_crash
from evertrain.guard import DivergenceGuard
from evertrain.metrics import MetricsLog
from evertrain.owners import ObjectState
from evertrain.progress import Progress
from evertrain.step import backward_step, heldout_loss, step_results
from evertrain.trackers import Tracker
from evertrain.train_settings import (
    LossFn,
    Rows,
    StepStats,
    TrainSettings,
    causal_lm_loss,
    count_targets,
)

__all__ = ["ResumeError", "Rows", "StepStats", "TrainSettings", "Trainer"]

log = logging.getLogger("evertrain")


class Trainer:
    """Trains ``model`` with ``optimizer`` and ``scheduler`` on ``train_data``, resumably.

    Build it, call :meth:`resume` (or :meth:`start_fresh`), then :meth:`fit` (or drive
    :meth:`run` / :meth:`train_step` yourself), then :meth:`close`.

    Args:
        model: the module whose parameters train (its owner saves them; see ``model_owner``).
        optimizer: any torch optimizer over the model's parameters.
        scheduler: evertrain's :class:`~evertrain.schedule.LRScheduler` (LR set from
            global_step before each step) or any torch ``LRScheduler`` (stepped after each
            optimizer step); None: the optimizer's LR as it is.
        run_dir: where checkpoints and ``metrics.jsonl`` go.
        settings: the loop's settings.
        train_data: map-style dataset of rows (dicts of equal-shape tensors, e.g.
            ``input_ids``, ``labels``, ``attention_mask``); evertrain's data cursor walks it
            in a (seed, epoch) order, every row once per epoch. None: the caller feeds
            :meth:`run` / :meth:`train_step` its own batches.
        eval_data: held-out rows for :meth:`evaluate`.
        loss_fn: ``(forward_module, batch) -> scalar loss``; default ``model(**batch).loss``.
        count_targets: target tokens of a batch, for token-weighted evaluation.
        checkpoint: save and retention policy.
        config: stored in every checkpoint and compared on resume (see ``Checkpointer``).
        allow_config_change: which config changes a resume accepts (see ``Checkpointer``).
        group: this process's place in a torchrun group (default one process).
        forward: the module to call (DDP- or compile-wrapped ``model``); default ``model``.
        model_owner: ``(name, owner)`` saving the model; default ``("model",
            ModuleState(model))`` (every parameter and buffer).
        named_params: name -> parameter for the optimizer's state; default the model's.
        owners: more state owners, restored before ``progress`` and ``rng``.
        data_cursor: the cursor over ``train_data`` (default: a new one at the start).
        total_steps: the run's length when known otherwise (default from settings/data).
        resume_from: a checkpoint already chosen collectively (see
            :meth:`Checkpointer.use_checkpoint`).
        rank_state: derives a per-rank state the checkpoint lacks (see ``Checkpointer``).
        summary_fields: extra JSON fields for each checkpoint's manifest summary.
        tokenizer: kept for callers that decode or build data (not used by the loop).
        trackers: experiment trackers fed every ``metrics.jsonl`` record (see ``Checkpointer``).

    Raises:
        ConfigError: ``train_data`` is empty.
        TypeError: an owner without ``state_dict``/``load_state_dict``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        run_dir: str | Path,
        settings: TrainSettings | None = None,
        train_data: Rows | None = None,
        eval_data: Rows | None = None,
        loss_fn: LossFn = causal_lm_loss,
        count_targets: Callable[[Mapping[str, torch.Tensor]], int] = count_targets,
        checkpoint: CheckpointConfig | None = None,
        config: Any = None,
        allow_config_change: bool | Callable[[str], bool] = False,
        group: distributed.Group | None = None,
        forward: Callable[..., Any] | None = None,
        model_owner: tuple[str, Any] | None = None,
        named_params: dict[str, torch.nn.Parameter] | None = None,
        owners: Mapping[str, Any] | None = None,
        data_cursor: DataCursor | None = None,
        total_steps: int | None = None,
        resume_from: CheckpointInfo | None | bool = False,
        rank_state: Callable[[str, Mapping[str, Any]], dict[str, Any]] | None = None,
        summary_fields: Callable[[], Mapping[str, Any]] | None = None,
        tokenizer: Any = None,
        trackers: Sequence[Tracker] = (),
    ) -> None:
        self.settings = s = settings or TrainSettings()
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.forward = forward if forward is not None else model  # compiled: no truth value
        self.loss_fn, self.count_targets = loss_fn, count_targets
        self.tokenizer = tokenizer
        self.dist = group or distributed.current_group()
        # batches go where the model is (a CUDA model in a CPU process group, too)
        self.device = next(model.parameters()).device if group is None else self.dist.device
        self.world_size, self.rank = self.dist.world_size, self.dist.rank
        self.precision = precision_lib.announce(s.precision, self.device)  # "auto" resolved
        self._autocast = functools.partial(precision_lib.autocast, self.device, self.precision)
        self.grad_accum_steps = s.grad_accum_steps
        self.train_ds, self.val_ds = train_data, eval_data
        self.run_dir = Path(run_dir)
        state_owners: dict[str, Any] = {}
        name, owner = model_owner or ("model", owners_lib.model_owner(model))
        owner = owners_lib.sharded_if_needed(owner, model)  # FSDP2: each rank its slices
        self.model_owner = name
        state_owners[name] = owner
        params = named_params
        state_owners["optimizer"] = owners_lib.optimizer_owner(optimizer, model, params)
        if scheduler is not None:
            stateful_version = hasattr(scheduler, "VERSION")  # an evertrain owner as is
            state_owners["scheduler"] = (
                scheduler if stateful_version else ObjectState(scheduler, "scheduler")
            )
        self.total_steps = total_steps or s.max_steps
        self.cursor: DataCursor | None = None
        if train_data is not None:
            global_batch = s.micro_batch_size * s.grad_accum_steps * self.world_size
            if len(train_data) == 0:
                raise ConfigError("data: no training sequences; add data (data.files)")
            self.cursor = data_cursor or DataCursor(
                s.seed, len(train_data), global_batch, dataset_fingerprint(train_data)
            )
            state_owners["data_cursor"] = self.cursor
            self.total_steps = (
                total_steps or s.max_steps or max(1, s.epochs * self.cursor.steps_per_epoch)
            )
        state_owners.update(owners or {})
        self.owners = state_owners
        self.progress = Progress()
        c = checkpoint or CheckpointConfig()
        self.checkpoint_config = c
        self.ckpt = Checkpointer(
            self.run_dir,
            owners=state_owners,
            progress=self.progress,
            per_rank=("rng",),
            rank_state=rank_state,
            config=config,
            allow_config_change=allow_config_change,
            every_steps=c.every_steps,
            every_seconds=c.every_seconds,
            keep=retention_from_config(c),
            async_save=c.async_save,
            min_free_bytes=c.min_free_bytes,
            summary=self._summary,
            group=self.dist,
            trackers=trackers,
        )
        if resume_from is not False:
            chosen = resume_from if isinstance(resume_from, CheckpointInfo) else None
            self.ckpt.use_checkpoint(chosen)
        self.save_policy = self.ckpt.save_policy
        self.guard = DivergenceGuard(self.settings.on_nonfinite, self.ckpt)
        self.last_eval: dict[str, float] = {}
        self.summary_fields = summary_fields or dict
        self.loader: Any = None
        self.on_step: list[Callable[[StepStats], None]] = []
        self.on_step.extend(distributed.debug_hooks(self))

    # ------------------------------------------------------------------ resume / save

    @property
    def metrics(self) -> MetricsLog:
        """``RUN/metrics.jsonl`` (rank 0; a null log elsewhere), open after :meth:`resume`."""
        if self.ckpt.metrics is None:
            raise RuntimeError("call Trainer.resume() or start_fresh() first")
        return self.ckpt.metrics

    @property
    def checkpoints(self) -> Any:
        """The run's :class:`~evertrain.checkpoint.CheckpointManager` (listing, loading)."""
        return self.ckpt.manager

    def resume(self) -> int:
        """Restore every owner from the newest checkpoint that verifies; return its
        global_step (0 for a run directory without checkpoints).

        Raises:
            ResumeError: checkpoints exist but none verifies, or a config change that is not
                allowed, or a world size a user loop cannot change.
            evertrain.state.StateError: a checkpoint that does not fit an owner.
        """
        step = self.ckpt.resume()
        info = self.ckpt.last_checkpoint
        if info is not None:
            summary = self.ckpt.latest()
            self.last_eval = dict(summary.summary.get("metrics", {})) if summary else {}
            precision_lib.warn_changed(summary and summary.summary.get("precision"), self.precision)
            for change in getattr(self.scheduler, "changes", list)():
                log.warning("LR schedule changed since checkpoint: %s", change)
            c = self.cursor
            where = f", epoch {c.epoch}, example {c.offset} of the epoch" if c is not None else ""
            log.info("resumed from %s (global_step %d%s)", info, step, where)
        return step

    def start_fresh(self) -> None:
        """Begin at global_step 0 although the run has checkpoints (they are kept)."""
        self.ckpt.start_fresh()

    def _summary(self) -> dict[str, Any]:
        p = self.progress
        return {
            "epoch": self.cursor.epoch if self.cursor is not None else None,
            "examples_seen": p.examples_seen,
            "tokens_seen": p.tokens_seen,
            "lr": self.lr_at(max(p.global_step - 1, 0)),
            "metrics": dict(self.last_eval),
            "precision": self.precision,
            "trim_padding": self.settings.trim_padding,
            # the split of the global batch (a resume on another process count keeps it)
            "batch": {
                "world_size": self.world_size,
                "micro_batch_size": self.settings.micro_batch_size,
                "grad_accum_steps": self.grad_accum_steps,
            },
            **self.summary_fields(),
        }

    def lr_at(self, step: int) -> float:
        """The learning rate of the step after ``step`` steps (evertrain's schedule), or
        the optimizer's current LR."""
        lr_at = getattr(self.scheduler, "lr_at", None)
        if callable(lr_at):
            return float(lr_at(step))
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self) -> Path | None:
        """Commit a checkpoint of the current state; ``None`` if skipped for disk space.

        With ``checkpoint.async`` the state is only copied here and the checkpoint is
        committed in the background (see :meth:`wait_for_checkpoint`).
        """
        return self.ckpt.save()

    def load_owner_state(self, name: str, state: dict[str, Any]) -> None:
        """Apply ``state`` to owner ``name`` (``progress``, ``optimizer``, ``data_cursor``,
        ...) as a resume would: how an importer hands over state converted from another
        trainer's checkpoint.

        Raises:
            KeyError: no owner ``name``.
            evertrain.state.StateError: the owner refuses the state.
        """
        owners = self.ckpt.owners
        if name not in owners:
            raise KeyError(f"no owner {name!r}; the owners are {sorted(owners)}")
        owners[name].load_state_dict(state)

    def owner_state(self, name: str) -> dict[str, Any]:
        """Owner ``name``'s current state dict, as it would be saved (KeyError: no owner)."""
        return dict(self.ckpt.owners[name].state_dict())

    def override_owner_state(self, name: str, state: dict[str, Any]) -> None:
        """Checkpoint ``state`` as owner ``name``'s state at every later :meth:`save`
        instead of asking the owner (left as it is): an imported RNG state.

        Raises:
            KeyError: the trainer has no owner ``name``.
        """
        self.ckpt.override_state(name, state)

    def record_eval(self, metrics: dict[str, float]) -> None:
        """Make ``metrics`` (e.g. ``{"val_loss", "val_ppl"}``, or ``{}``) the latest
        evaluation, which the next checkpoints' summary records under ``metrics``."""
        self.last_eval = dict(metrics)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append a JSON record to ``metrics.jsonl`` (rank 0); rewound with checkpoints."""
        self.metrics.write(dict(record))

    def wait_for_checkpoint(self) -> None:
        """Block until a background save is committed; raise its error if it failed."""
        self.ckpt.wait()

    def save_policy_last_step(self) -> int | None:
        """global_step of the last checkpoint committed here (or resumed from)."""
        return self.ckpt.last_saved_step

    # ------------------------------------------------------------------ eval

    def evaluate(self, dataset: Any = None) -> dict[str, float]:
        """Token-weighted mean loss (nats) and perplexity over ``dataset`` (default: the
        held-out data); ``{}`` when there is none. Uses no RNG and leaves the model in
        train mode. Collective under torchrun (each rank scores its share)."""
        ds = self.val_ds if dataset is None else dataset
        if ds is None or len(ds) == 0:
            return {}
        return heldout_loss(
            self.model, self.forward, ds, loss_fn=self.loss_fn,
            count_targets=self.count_targets, settings=self.settings, group=self.dist,
            device=self.device, autocast=self._autocast,
        )  # fmt: skip

    # ------------------------------------------------------------------ the loop

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches of ``train_data`` from the cursor's position; the cursor advances
        as each is handed out (not as the loader prefetches), so a checkpoint between
        optimizer steps records exactly what was trained on."""
        if self.train_ds is None or self.cursor is None:
            raise ConfigError("the trainer has no train_data: pass batches to run()")
        s = self.settings
        self.loader = make_loader(
            self.train_ds,  # type: ignore[arg-type]
            self.cursor,
            micro_batch_size=s.micro_batch_size,
            num_workers=s.num_workers,
            seed=s.seed,
            rank=self.rank,
            world_size=self.world_size,
            trim_padding=s.trim_padding,
        )
        for batch in self.loader:
            self.cursor.advance_micro(s.micro_batch_size, self.world_size)
            yield batch

    def train_step(
        self,
        batches: Iterator[dict[str, torch.Tensor]],
        epoch: int = 0,
        micro_batches: int | None = None,
    ) -> StepStats:
        """One optimizer step: ``grad_accum_steps`` micro-batches, clip, step, log.

        Token-weighted over the whole step (see :mod:`evertrain.step`): the gradient is
        that of all the step's rows as one batch; the logged loss is nats per target token.
        A NaN/inf loss or gradient norm is never applied (``settings.on_nonfinite``).

        Args:
            batches: yields dicts of ``[micro_batch_size, length]`` tensors (with
                ``row_mask``, ``bool [micro_batch_size]``, marking real rows, if padded).
            epoch: recorded in the metrics line.
            micro_batches: micro-batches in this step, default ``grad_accum_steps``; fewer
                for an epoch's (or a watched file's) short last step, so no example is
                dropped.

        Raises:
            ValueError: ``micro_batches`` is not in ``1..grad_accum_steps``.
            DivergedError: a non-finite step with ``on_nonfinite="stop"``.
        """
        self.ckpt.check()  # a failed background save surfaces at the next step
        p, accum = self.progress, self.grad_accum_steps
        n_micro = accum if micro_batches is None else micro_batches
        if not 1 <= n_micro <= accum:
            raise ValueError(
                f"micro_batches must be in 1..{accum} (grad_accum_steps), got {micro_batches}"
            )
        step, t0 = p.global_step, time.perf_counter()
        apply = getattr(self.scheduler, "apply", None)
        lr = float(apply(step)) if callable(apply) else self.lr_at(step)
        loss_t, counts = backward_step(
            [next(batches) for _ in range(n_micro)],
            forward=self.forward,
            loss_fn=self.loss_fn,
            count_targets=self.count_targets,
            group=self.dist,
            device=self.device,
            autocast=self._autocast,
            global_step=step + 1,
        )
        norm_t = torch.nn.utils.clip_grad_norm_(
            [q for g in self.optimizer.param_groups for q in g["params"]],
            self.settings.max_grad_norm or math.inf,
        )
        # the step's only host sync: loss per target token, norm, global tokens, examples
        loss_sum, norm, tokens, examples = step_results(self.dist, loss_t, counts, norm_t)
        finite = math.isfinite(loss_sum) and math.isfinite(norm)
        undone = 0
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            undone = self.guard.nonfinite(step + 1, loss_sum, norm)
            p.skipped_steps += undone
        if self.scheduler is not None and not callable(apply):
            self.scheduler.step()  # a torch LRScheduler: stepped after the optimizer
        self.optimizer.zero_grad(set_to_none=True)
        p.global_step, p.micro_step = step + 1, p.micro_step + n_micro
        p.examples_seen += examples
        p.tokens_seen += tokens
        if finite:
            p.record_loss(loss_sum)
        stats = StepStats(
            p.global_step, loss_sum, lr, norm, tokens, examples,
            time.perf_counter() - t0, epoch, undone,
        )  # fmt: skip
        line = {"kind": "train", **stats.__dict__}
        if finite:
            del line["steps_undone"]
        else:  # JSON has no NaN
            line.update(loss=None, grad_norm=None, skipped=True)
        self.metrics.write(line)
        for hook in self.on_step:
            hook(stats)
        return stats

    def run(
        self,
        batches: Iterator[dict[str, torch.Tensor]],
        steps: int,
        *,
        epoch: Callable[[], int] = lambda: 0,
        micro_batches: Callable[[int], int | None] = lambda done: None,
        before_step: Callable[[], bool] = lambda: True,
        after_step: Callable[[StepStats], bool] = lambda stats: True,
    ) -> int:
        """The loop: up to ``steps`` optimizer steps over ``batches``, with hooks between
        steps. What :meth:`fit` and the watch daemon run.

        Args:
            batches: micro-batches (see :meth:`train_step`).
            steps: optimizer steps to take at most.
            epoch: the epoch to record for the next step.
            micro_batches: micro-batches of the step after ``done`` steps (None: all).
            before_step: called before each step; False ends the loop without it.
            after_step: called with each step's stats (evaluate, save, inbox checks...);
                False ends the loop.

        Returns:
            The steps taken.
        """
        done = 0
        while done < steps and before_step():
            done += 1
            if not after_step(self.train_step(batches, epoch(), micro_batches(done - 1))):
                break
        return done

    def fit(self, max_steps: int | None = None) -> str:
        """Train until ``total_steps`` (or ``max_steps``) or a stop signal; evaluates every
        ``eval_every_steps`` and at the end (if that or ``keep_best`` is set); saves by the
        policies, at the end, and on a stop.

        Returns:
            ``"done"`` or the name of the signal that stopped it (state saved either way,
            unless the disk was too full: then a warning says so).

        Raises:
            ConfigError: the trainer has neither ``total_steps`` nor ``max_steps``, or no
                ``train_data``.
            RuntimeError: :meth:`resume` or :meth:`start_fresh` was not called.
            CheckpointError: a save failed (see :meth:`save`).
            InsufficientDiskSpaceError: the last save was skipped for too little disk space.
        """
        p, cursor = self.progress, self.cursor
        if self.total_steps is None:
            raise ConfigError("train.max_steps: needed when the trainer has no data of its own")
        end = min(self.total_steps, max_steps) if max_steps else self.total_steps
        self.model.train()
        self.save_policy.mark_saved(p.global_step, time.monotonic())

        def after_step(stats: StepStats) -> bool:
            if cursor is not None and cursor.epoch != stats.epoch:
                maybe_crash("epoch", cursor.epoch)
            self._eval_if_due(end)
            # the save policy, a skipped save's retry and stop signals, agreed by all ranks
            self.ckpt.maybe_save(force=p.global_step == end)
            return not self.ckpt.should_stop

        with self.ckpt.stop_on_signals():
            self.run(
                self.batches(),
                end - p.global_step,
                epoch=lambda: cursor.epoch if cursor is not None else 0,
                # an epoch's short last global batch takes fewer micro-steps
                micro_batches=lambda done: (
                    cursor.micro_steps(self.settings.micro_batch_size, self.world_size)
                    if cursor is not None
                    else None
                ),
                before_step=lambda: not self.ckpt.should_stop,
                after_step=after_step,
            )
            # Inside the signal guard: a second SIGTERM cannot cut the last save short.
            self.wait_for_checkpoint()
        if self.ckpt.skipped_save is not None:  # "done" would say the steps were kept
            raise self.ckpt.skipped_save.unsaved(p.global_step, self.ckpt.last_saved_step)
        if self.ckpt.should_stop:
            log.warning(
                "stopped by %s at global_step %d; checkpoint saved. Resume with the "
                "same command (evertrain train ... --run-dir %s)",
                self.ckpt.stop_reason,
                p.global_step,
                self.run_dir,
            )
            return self.ckpt.stop_reason or "stopped"
        return "done"

    def _eval_if_due(self, end: int) -> None:
        p, every = self.progress, self.settings.eval_every_steps
        # an unasked-for final pass over the held-out rows cost ~10% of a short run (issue 14)
        wanted = bool(every) or self.checkpoint_config.keep_best > 0
        if (every and p.global_step % every == 0) or (wanted and p.global_step == end):
            self.last_eval = self.evaluate()
            if self.last_eval:
                self.metrics.write({"kind": "eval", "global_step": p.global_step, **self.last_eval})
                c = self.checkpoint_config
                self.progress.track_best(self.last_eval.get(c.best_metric), c.best_mode)

    def close(self) -> None:
        """Wait for a background save (raising its error), then close ``metrics.jsonl``."""
        try:
            if self.ckpt.metrics is not None:
                self.wait_for_checkpoint()
        finally:
            self.ckpt.close()
