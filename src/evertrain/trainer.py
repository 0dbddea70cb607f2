"""The training loop, and the wiring of every state owner into one checkpointable run.

Exactness contract: a run resumed from any committed checkpoint produces bit-identical
weights, optimizer state and per-step losses to a run that never stopped. It holds because
(1) every piece of state has one owner that is checkpointed (model, optimizer, scheduler,
data_cursor, rng, progress); (2) the LR and the data order are pure functions of
global_step and (seed, epoch); (3) nothing between two checkpoints draws from a global RNG
except the training step itself (data loaders get their own generator, eval disables
dropout); (4) checkpoints are taken only between optimizer steps.

Process-safety: one trainer per run directory (the ``watch`` daemon holds a file lock);
under torchrun one per rank, in lockstep (see :mod:`evertrain.distributed`): rank 0 writes
the metrics and commits checkpoints, every rank writes its own RNG state.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import platform
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evertrain import __version__, distributed
from evertrain.batching import grad_accum_for_resume
from evertrain.checkpoint import (
    CheckpointManager,
    InsufficientDiskSpaceError,
    SavePolicy,
    retention_from_config,
)
from evertrain.checkpoint.ranks import choose_checkpoint, rng_state_for_rank, save_ranked
from evertrain.config import ConfigError, RunConfig, breaking_changes, diff_configs
from evertrain.data import DataCursor, build_datasets, make_loader
from evertrain.faults import maybe_crash
from evertrain.metrics import MetricsLog
from evertrain.model_state import ModelState
from evertrain.models import adapter_config, load_model, trainable_parameters
from evertrain.optim import OptimizerState, build_optimizer
from evertrain.progress import Progress
from evertrain.rng import RNGState, seed_everything
from evertrain.schedule import LRScheduler
from evertrain.signals import on_stop_signals

log = logging.getLogger("evertrain")


class ResumeError(RuntimeError):
    """A run directory cannot be resumed as asked (the message says why and what to do)."""


def library_versions() -> dict[str, Any]:
    """Versions that affect bit-exactness; stored in every checkpoint."""
    import numpy
    import safetensors
    import transformers

    return {
        "version": 1,
        "evertrain": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class StepStats:
    """What one optimizer step did (the line written to ``metrics.jsonl``)."""

    global_step: int
    loss: float  # mean of the micro-batch losses (each a token-mean cross-entropy, nats)
    lr: float
    grad_norm: float
    tokens: int  # non-padding input tokens in this step
    examples: int  # sequences in this step
    seconds: float
    epoch: int


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes the current optimizer step, saves and
    returns, so a preemption never loses more than the step in flight."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._guard = on_stop_signals(self._handle)

    def __enter__(self) -> _StopFlag:
        self._guard.__enter__()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        self._guard.__exit__(None, None, None)


class Trainer:
    """Builds a run from a config and trains it, resuming from ``RUN/checkpoints``.

    Args:
        cfg: the validated run config.
        run_dir: run directory (created); holds ``checkpoints/`` and ``metrics.jsonl``.
        allow_config_change: resume even if a change would break exactness or shapes.
        fresh: start from step 0 although the run has checkpoints (they are kept).
        build_data: build ``cfg.data`` into ``train_ds``/``val_ds`` and a ``data_cursor``
            owner. The ``watch`` daemon passes False and brings its own data owner in
            ``extra_owners``; ``total_steps`` is then ``train.max_steps`` (may be None).
        extra_owners: more state owners to checkpoint and restore (before ``rng``).
        make_scheduler: builds the LR schedule owner (``scheduler``) for the optimizer,
            before any checkpoint is restored into it; default an
            :class:`~evertrain.schedule.LRScheduler` of ``train.schedule`` over
            ``total_steps``. The ``watch`` daemon passes its open-ended schedule.
        summary_fields: called at each save; its JSON-able fields are added to the
            checkpoint's manifest summary (default: none).

    Raises:
        ResumeError: the run has checkpoints but none verifies, or the stored config
            differs in a breaking way (lists the keys).
        evertrain.state.StateError: a checkpoint does not fit the model/optimizer/data.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        *,
        allow_config_change: bool = False,
        fresh: bool = False,
        build_data: bool = True,
        extra_owners: dict[str, Any] | None = None,
        make_scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
        summary_fields: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t = cfg.train
        seed_everything(cfg.seed)
        # Under torchrun: join the process group (gloo on CPU, nccl on CUDA); else 1 process.
        self.dist = distributed.setup(t.device)
        self.device = self.dist.device
        self.world_size, self.rank = self.dist.world_size, self.dist.rank
        loaded = load_model(cfg.model, cfg.lora)
        self.model, self.tokenizer = loaded.model.to(self.device), loaded.tokenizer
        distributed.seed_rank(cfg.seed, self.dist)  # ranks > 0: their own dropout masks
        # DDP with several ranks. Checkpoints always name the original module's parameters
        # (no module. or _orig_mod.).
        self.ddp = distributed.wrap_model(self.model, self.dist)
        self.forward = torch.compile(self.ddp) if cfg.model.compile else self.ddp
        # Chosen before the data: on a different number of processes its global batch
        # fixes the accumulation.
        self._resume_info = (
            None
            if fresh
            else choose_checkpoint(self.run_dir / "checkpoints", self.dist, log.warning)
        )
        self.grad_accum_steps = grad_accum_for_resume(cfg, self.world_size, self._resume_info)
        data_owners: dict[str, Any] = {}
        self.total_steps: int | None = t.max_steps
        if build_data:
            self.train_ds, self.val_ds, self.data_report = build_datasets(
                cfg.data, self.tokenizer, cfg.seed
            )
            # The cursor counts optimizer steps' global batches (epoch length, drop_last),
            # so the data sequence does not depend on the (accumulation x ranks) split.
            global_batch = t.micro_batch_size * self.grad_accum_steps * self.world_size
            if len(self.train_ds) < global_batch:
                raise ConfigError(
                    f"data: {len(self.train_ds)} training sequences, fewer than one global "
                    f"batch ({global_batch} = micro_batch_size {t.micro_batch_size} x "
                    f"grad_accum_steps {self.grad_accum_steps} x {self.world_size} "
                    f"process(es)); add data or lower train.micro_batch_size or "
                    f"train.grad_accum_steps"
                )
            self.cursor = DataCursor(
                cfg.seed, len(self.train_ds), global_batch, self.train_ds.fingerprint
            )
            data_owners["data_cursor"] = self.cursor
            self.total_steps = t.max_steps or max(1, t.epochs * self.cursor.steps_per_epoch)
        params = trainable_parameters(self.model)
        self.optimizer = build_optimizer(params, t)
        self.scheduler = (
            LRScheduler(self.optimizer, t.schedule, t.lr, self.total_steps)
            if make_scheduler is None
            else make_scheduler(self.optimizer)
        )
        self.progress, self.rng = Progress(), RNGState()
        self.model_owner = "adapter_model" if cfg.lora is not None else "model"
        self.owners: dict[str, Any] = {
            self.model_owner: ModelState(self.model, loaded.identity),
            "optimizer": OptimizerState(self.optimizer, params),
            "scheduler": self.scheduler,
            **data_owners,
            **(extra_owners or {}),
            "progress": self.progress,
            "rng": self.rng,  # restored last: nothing may draw from the RNGs after it
        }
        c = cfg.checkpoint
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            retention_from_config(c),
            log=log.warning,
            min_free_bytes=c.min_free_bytes,
        )
        self.save_policy = SavePolicy(c.every_steps, c.every_seconds)
        self.metrics = (
            MetricsLog(self.run_dir / "metrics.jsonl")
            if self.rank == 0
            else distributed.NullMetricsLog()
        )
        self.last_eval: dict[str, float] = {}
        self.summary_fields: Callable[[], dict[str, Any]] = summary_fields or dict
        # saved instead of asking the owner: a state that must not be applied to this
        # process (override_owner_state)
        self._state_overrides: dict[str, dict[str, Any]] = {}
        self.resumed_from: int | None = None
        self._saved_step: int | None = None
        self._save_pending = False
        self._resume(allow_config_change, fresh)
        self.on_step: list[Callable[[StepStats], None]] = []
        self.on_step.extend(distributed.debug_hooks(self))

    # ------------------------------------------------------------------ resume / save

    def _resume(self, allow_config_change: bool, fresh: bool) -> None:
        if fresh:
            self.metrics.rewind(0)
            return
        info = self._resume_info
        if info is None:
            if self.checkpoints.committed() or any((self.run_dir / "checkpoints").glob("step-*")):
                raise ResumeError(
                    f"{self.run_dir}: has checkpoint directories but none verifies (see the "
                    f"warnings above); run `evertrain verify {self.run_dir}`, or pass --fresh "
                    f"to start over (existing checkpoints are kept)"
                )
            self.metrics.rewind(0)
            return
        states = self.checkpoints.load(info).states
        diffs = diff_configs(states["config"]["config"], self.cfg.to_json())
        for key, old, new in diffs:
            log.warning("config changed since checkpoint: %s: %r -> %r", key, old, new)
        breaking = breaking_changes(diffs)
        if breaking and not allow_config_change:
            keys = ", ".join(k for k, _, _ in breaking)
            raise ResumeError(
                f"resume refused: changing {keys} breaks exactness or tensor "
                f"shapes; restore them, or pass --allow-config-change"
            )
        stored_versions = {k: v for k, v in states["versions"].items() if k != "evertrain"}
        now_versions = {k: v for k, v in library_versions().items() if k != "evertrain"}
        if stored_versions != now_versions:
            log.warning(
                "library versions differ from the checkpoint's (%s now %s): the "
                "resumed run may not be bit-identical",
                stored_versions,
                now_versions,
            )
        # this rank's RNG state (rng_rank<R>; derived for a rank the checkpoint lacks)
        states["rng"] = rng_state_for_rank(
            states, rank=self.rank, world_size=self.world_size, seed=self.cfg.seed
        )
        for name, owner in self.owners.items():
            owner.load_state_dict(states[name])
        for change in self.scheduler.changes():
            log.warning("LR schedule changed since checkpoint: %s", change)
        self.metrics.rewind(int(info.summary["metrics_offset"]))
        self.resumed_from = self._saved_step = self.progress.global_step
        self.last_eval = dict(info.summary.get("metrics", {}))
        # A trainer without data of its own (the watch daemon) has no data_cursor: its data
        # owner reports its own position.
        where = (
            f", epoch {self.cursor.epoch}, example {self.cursor.offset} of the epoch"
            if "data_cursor" in self.owners
            else ""
        )
        log.info("resumed from %s (global_step %d%s)", info.path, self.progress.global_step, where)

    def save(self) -> Path | None:
        """Commit a checkpoint of the current state; ``None`` if skipped for disk space.

        With ``checkpoint.async`` the state is only copied here and the checkpoint is
        committed in the background: the returned directory exists once
        :meth:`wait_for_checkpoint` (or the next save) returns.
        """
        self.metrics.sync()
        # Ranks > 0 save only their own RNG state; rank 0 writes the replicated owners.
        states = {
            name: self._state_overrides[name]
            if name in self._state_overrides
            else owner.state_dict()
            for name, owner in self.owners.items()
            if self.rank == 0 or name in distributed.PER_RANK_OWNERS
        }
        states["config"] = {"version": 1, "config": self.cfg.to_json()}
        states["versions"] = library_versions()
        if self.cfg.lora is not None:
            states["adapter_config"] = adapter_config(self.model)
        summary = {
            "global_step": self.progress.global_step,
            "epoch": self.cursor.epoch if "data_cursor" in self.owners else None,
            "examples_seen": self.progress.examples_seen,
            "tokens_seen": self.progress.tokens_seen,
            "lr": self.scheduler.lr_at(max(self.progress.global_step - 1, 0)),
            "metrics": dict(self.last_eval),
            "time": time.time(),
            # bytes of metrics.jsonl up to this step: it depends on timings, so it lives
            # here and not in the bit-compared progress state
            "metrics_offset": self.metrics.offset(),
            # the split of the global batch (a resume on another process count keeps it)
            "batch": {
                "world_size": self.world_size,
                "micro_batch_size": self.cfg.train.micro_batch_size,
                "grad_accum_steps": self.grad_accum_steps,
            },
            **self.summary_fields(),
        }
        protect = [] if self.resumed_from is None else [self.resumed_from]
        c = self.checkpoints
        save = c.save_async if self.cfg.checkpoint.async_save else c.save
        if self.world_size > 1:  # every rank writes its part, rank 0 commits (synchronous)
            save = functools.partial(
                save_ranked, c, self.dist, async_requested=self.cfg.checkpoint.async_save
            )
        try:
            path = save(self.progress.global_step, states, summary, protect=protect)
        except InsufficientDiskSpaceError as e:
            log.warning(
                "CHECKPOINT SKIPPED at global_step %d: %s; will retry, nothing is "
                "deleted to make room",
                self.progress.global_step,
                e,
            )
            return None
        self.save_policy.mark_saved(self.progress.global_step, time.monotonic())
        self._saved_step = self.progress.global_step
        self._log_checkpoint_stats()
        return path

    def override_owner_state(self, name: str, state: dict[str, Any]) -> None:
        """Checkpoint ``state`` as owner ``name``'s state in every later :meth:`save`,
        instead of asking the owner; the owner itself is left as it is. For a state that
        must be saved but not applied to this process (an imported RNG state).

        Raises:
            KeyError: the trainer has no owner ``name``.
        """
        if name not in self.owners:
            raise KeyError(f"no owner {name!r}; the owners are {sorted(self.owners)}")
        self._state_overrides[name] = state

    def record_eval(self, metrics: dict[str, float]) -> None:
        """Make ``metrics`` (e.g. ``{"val_loss", "val_ppl"}``, or ``{}``) the latest
        evaluation: :attr:`last_eval`, which the next checkpoints' summary records under
        ``metrics``. Writes nothing to ``metrics.jsonl`` and leaves the best-checkpoint
        tracking alone. Raises nothing."""
        self.last_eval = dict(metrics)

    # ------------------------------------------------------------------ async checkpoints

    def wait_for_checkpoint(self) -> None:
        """Block until a background save (``checkpoint.async``) is committed; no-op if none.

        Raises:
            Exception: what made the background save fail (e.g. ``CheckpointWriteError``).
        """
        self.checkpoints.wait()
        self._log_checkpoint_stats()

    def _poll_checkpoint(self) -> None:
        # A failed background save is raised here, at the step after it failed.
        self.checkpoints.check()
        self._log_checkpoint_stats()

    def _log_checkpoint_stats(self) -> None:
        for stats in self.checkpoints.take_stats():
            self.metrics.write(stats.as_metrics())

    def save_policy_last_step(self) -> int | None:
        """global_step of the last checkpoint this process committed (or resumed from)."""
        return self._saved_step

    # ------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self, dataset: Any = None) -> dict[str, float]:
        """Token-weighted mean loss (nats) and perplexity over ``dataset`` (default: the
        held-out split); ``{}`` when it is empty. Uses no RNG and leaves the model in train
        mode."""
        ds = self.val_ds if dataset is None else dataset
        if len(ds) == 0:
            return {}
        self.model.eval()  # no dropout: eval must not draw from the training RNG
        mbs, limit = self.cfg.train.micro_batch_size, self.cfg.train.eval_max_batches
        total, count = 0.0, 0
        for b, start in enumerate(range(0, len(ds), mbs)):
            if limit is not None and b >= limit:
                break
            if b % self.world_size != self.rank:  # each rank evaluates its share
                continue
            rows = [ds[i] for i in range(start, min(start + mbs, len(ds)))]
            batch = {k: torch.stack([r[k] for r in rows]).to(self.device) for k in rows[0]}
            with self._autocast():
                loss = self.forward(**batch).loss
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + float(loss) * n, count + n
        self.model.train()
        total, count = distributed.eval_totals(self.dist, total, count)
        val_loss = total / max(count, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16"
        )

    # ------------------------------------------------------------------ the loop

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from the cursor's position; the cursor advances as each is handed
        out (not as the loader prefetches), so a checkpoint between optimizer steps records
        exactly what was trained on."""
        loader = make_loader(
            self.train_ds,
            self.cursor,
            micro_batch_size=self.cfg.train.micro_batch_size,
            num_workers=self.cfg.data.num_workers,
            seed=self.cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.loader = loader  # its .consumed ids feed the example-id debug log
        for batch in loader:
            self.cursor.advance(self.cfg.train.micro_batch_size * self.world_size)
            yield batch

    def train_step(
        self,
        batches: Iterator[dict[str, torch.Tensor]],
        epoch: int = 0,
        micro_batches: int | None = None,
    ) -> StepStats:
        """One optimizer step: ``grad_accum_steps`` micro-batches, clip, step, log.

        Args:
            batches: yields dicts of ``[micro_batch_size, seq_len]`` long tensors
                (``input_ids``, ``labels``, ``attention_mask``) and advances its cursor.
            epoch: recorded in the metrics line.
            micro_batches: micro-batches in this step, default ``grad_accum_steps``; the
                watch daemon passes fewer for a file's last step so no example of the file
                is dropped (the loss is then the mean over those micro-batches).

        Raises:
            ValueError: ``micro_batches`` is not in ``1..grad_accum_steps``.
        """
        self._poll_checkpoint()
        t, p = self.cfg.train, self.progress
        accum = self.grad_accum_steps  # train.grad_accum_steps, or adjusted on resume
        n_micro = accum if micro_batches is None else micro_batches
        if not 1 <= n_micro <= accum:
            raise ValueError(
                f"micro_batches must be in 1..{accum} (grad_accum_steps), got {micro_batches}"
            )
        step, t0 = p.global_step, time.perf_counter()
        lr = self.scheduler.apply(step)
        loss_sum, tokens, examples = 0.0, 0, 0
        for micro in range(n_micro):
            batch = {k: v.to(self.device) for k, v in next(batches).items()}
            # DDP all-reduces the gradients in the last micro-step's backward only
            with distributed.no_sync(self.ddp, last=micro == n_micro - 1):
                with self._autocast():
                    loss = self.forward(**batch).loss / n_micro
                loss.backward()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
            examples += batch["input_ids"].shape[0]
            maybe_crash("micro", step + 1, micro)
            self.dist.maybe_crash("micro", step + 1, micro)
        norm = torch.nn.utils.clip_grad_norm_(
            self.optimizer.param_groups[0]["params"], t.max_grad_norm or math.inf
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # global mean loss, global tokens and examples (one process: its own, untouched)
        loss_sum, tokens, examples = distributed.step_totals(self.dist, loss_sum, tokens, examples)
        p.global_step, p.micro_step = step + 1, p.micro_step + n_micro
        p.examples_seen += examples
        p.tokens_seen += tokens
        p.record_loss(loss_sum)
        stats = StepStats(
            p.global_step,
            loss_sum,
            lr,
            float(norm),
            tokens,
            examples,
            time.perf_counter() - t0,
            epoch,
        )
        self.metrics.write({"kind": "train", **stats.__dict__})
        for hook in self.on_step:
            hook(stats)
        return stats

    def fit(self, max_steps: int | None = None) -> str:
        """Train until ``total_steps`` (or ``max_steps``) or a stop signal.

        Returns:
            ``"done"`` or the name of the signal that stopped it (state saved either way).
        """
        p = self.progress
        if self.total_steps is None:
            raise ConfigError("train.max_steps: needed when the trainer has no data of its own")
        end = min(self.total_steps, max_steps) if max_steps else self.total_steps
        batches = self._batches()
        self.model.train()
        self.save_policy.mark_saved(p.global_step, time.monotonic())
        with _StopFlag() as stop:
            # Ranks agree on stopping after each step: a rank stopping alone would leave the
            # others waiting in a collective.
            while p.global_step < end and not self.dist.agree_stop(stop.requested):
                epoch = self.cursor.epoch
                self.train_step(batches, epoch)
                if self.cursor.epoch != epoch:
                    maybe_crash("epoch", self.cursor.epoch)
                self._maybe_eval_and_save(end)
            stopped = self.dist.agree_stop(stop.requested)
            if stopped and self.save_policy_last_step() != p.global_step:
                self.save()
            # Inside the signal guard: a second SIGTERM cannot cut the last save short.
            self.wait_for_checkpoint()
        if stopped:
            log.warning(
                "stopped by %s at global_step %d; checkpoint saved. Resume with the "
                "same command (evertrain train ... --run-dir %s)",
                stopped,
                p.global_step,
                self.run_dir,
            )
            return stopped
        return "done"

    def _maybe_eval_and_save(self, end: int) -> None:
        p, every = self.progress, self.cfg.train.eval_every_steps
        if (every and p.global_step % every == 0) or p.global_step == end:
            self.last_eval = self.evaluate()
            if self.last_eval:
                self.metrics.write({"kind": "eval", "global_step": p.global_step, **self.last_eval})
                self._track_best(self.last_eval)
        # A save skipped for disk space is retried every step until it succeeds.
        if (
            p.global_step == end
            or self._save_pending
            # agreed: a timer (every_seconds) may fire on one rank and not another
            or self.dist.any(self.save_policy.should_save(p.global_step, time.monotonic()))
        ):
            self._save_pending = self.save() is None

    def _track_best(self, metrics: dict[str, float]) -> None:
        c, p = self.cfg.checkpoint, self.progress
        value = metrics.get(c.best_metric)
        if value is None:
            return
        better = p.best_metric is None or (
            value < p.best_metric if c.best_mode == "min" else value > p.best_metric
        )
        if better:
            p.best_metric, p.best_step = value, p.global_step

    def close(self) -> None:
        """Wait for a background save (raising its error), then close ``metrics.jsonl``."""
        try:
            self.wait_for_checkpoint()
        finally:
            self.checkpoints.close()
            self.metrics.close()
