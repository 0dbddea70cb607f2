"""The YAML recipe: turns a :class:`~evertrain.config.RunConfig` into the objects a
:class:`~evertrain.trainer.Trainer` takes (model with LoRA, optimizer, LR schedule, data,
owners) and builds it. ``evertrain train``, ``watch``, ``import-hf`` and ``eval`` use it; it
resumes nothing (call :meth:`Trainer.resume`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from evertrain import distributed
from evertrain.batching import grad_accum_for_resume, trim_for_resume
from evertrain.checkpoint.ranks import choose_checkpoint, rng_state_for_rank
from evertrain.config import RunConfig
from evertrain.config_diff import breaking_changes
from evertrain.data import DataCursor, build_datasets
from evertrain.fsdp import enable_gradient_checkpointing, shard_model
from evertrain.model_state import AdapterConfigState, ModelState
from evertrain.models import load_model, trainable_parameters
from evertrain.optim import build_optimizer
from evertrain.precision import resolve
from evertrain.rng import seed_everything
from evertrain.runlock import LOCK_NAME, RunLock
from evertrain.schedule import LRScheduler
from evertrain.threads import apply_threads
from evertrain.trackers import make_trackers
from evertrain.train_settings import TrainSettings, token_loss_sum
from evertrain.trainer import Trainer

log = logging.getLogger("evertrain")


def settings_from_config(
    cfg: RunConfig, grad_accum_steps: int, precision: str, trim_padding: bool
) -> TrainSettings:
    """The loop's settings from ``cfg.train``/``cfg.data``, with the accumulation, the
    resolved precision and the trimming this run (as resumed) uses."""
    t = cfg.train
    return TrainSettings(
        micro_batch_size=t.micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        epochs=t.epochs,
        max_steps=t.max_steps,
        max_grad_norm=t.max_grad_norm,
        precision=precision,
        eval_every_steps=t.eval_every_steps,
        eval_max_batches=t.eval_max_batches,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        on_nonfinite=t.on_nonfinite,
        trim_padding=trim_padding,
    )


def config_change_allowed(allow_all: bool) -> Callable[[str], bool]:
    """Which changed config keys a resume accepts: all with ``allow_all`` (the CLI's
    ``--allow-config-change``), else those that keep exactness and tensor shapes."""
    return lambda key: allow_all or not breaking_changes([(key, None, None)])


def build_trainer(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    allow_config_change: bool = False,
    fresh: bool = False,
    build_data: bool = True,
    extra_owners: Mapping[str, Any] | None = None,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    summary_fields: Callable[[], Mapping[str, Any]] | None = None,
) -> Trainer:
    """A :class:`Trainer` for ``cfg`` in ``run_dir``, not yet resumed.

    Seeds every RNG with ``cfg.seed``, joins the torchrun process group when there is one,
    loads the model (LoRA applied), wraps it in DDP (and ``torch.compile``), and, with
    ``build_data``, reads, splits and tokenises ``cfg.data``. The checkpoint to resume is
    chosen here (unless ``fresh``): on another number of processes its global batch fixes
    the accumulation.

    Args:
        cfg: the validated run config.
        run_dir: the run directory.
        allow_config_change: a resume accepts any config change (else only those keeping
            exactness and shapes).
        fresh: do not look for a checkpoint (the caller calls ``start_fresh()``).
        build_data: build ``cfg.data``; the watch daemon passes False and brings its own
            data owner in ``extra_owners``.
        extra_owners: more state owners (restored before progress and RNG).
        make_scheduler: builds the ``scheduler`` owner for the optimizer (default
            evertrain's :class:`~evertrain.schedule.LRScheduler` of ``train.schedule``).
        summary_fields: extra JSON fields for each checkpoint's manifest summary.

    Raises:
        ConfigError: bad data geometry or a resume geometry that cannot keep the batch.
        evertrain.models.ModelSourceError, evertrain.data.DataError: see the loaders.
        evertrain.runlock.RunLockedError: another process writes ``run_dir``.
    """
    t = cfg.train
    seed_everything(cfg.seed)
    # a missing tracker package fails here, before the model loads
    trackers = make_trackers(
        cfg.report_to,
        project=cfg.tracking.project,
        mlflow_tracking_uri=cfg.tracking.mlflow_tracking_uri,
        wandb_mode=cfg.tracking.wandb_mode,
        wandb_entity=cfg.tracking.wandb_entity,
        config=cfg.to_json(),
    )
    group = distributed.setup(t.device)
    if group.device.type == "cuda":
        # bit-exact resume needs deterministic kernels (cuBLAS's split-K, scatter-add...);
        # the workspace setting must be in place before cuBLAS starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # one writer per run directory: held while the checkpoint is chosen, and by the
    # Trainer's Checkpointer from its construction on (a shared reference)
    with RunLock(Path(run_dir) / LOCK_NAME) if group.rank == 0 else contextlib.nullcontext():
        loaded = load_model(cfg.model, cfg.lora)
        if cfg.model.num_threads is None and cfg.data.num_workers:
            apply_threads(None, cfg.data.num_workers)  # leave a core per loader worker
        model = loaded.model.to(group.device)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        distributed.seed_rank(cfg.seed, group)  # ranks > 0: their own dropout masks
        # "auto" resolved once, on rank 0, for every rank: nodes of different hardware
        # must not train (or FSDP all-gather) in different precisions
        precision = resolve(t.precision, group.device)
        precision = group.broadcast_json(precision) if group.distributed else precision
        if t.precision == "auto":
            log.info("train.precision: auto -> %s (rank 0's device)", precision)
        if t.parallel == "fsdp" and group.distributed:
            # FSDP2 in place; the Trainer's owners then save each rank's slices
            bf16 = next(model.parameters()).is_cuda and precision == "bf16"
            shard_model(model, group.world_size, bf16=bf16)
            ddp = model
        else:  # DDP with several ranks; checkpoints name the original module's parameters
            ddp = distributed.wrap_model(model, group)
        forward = torch.compile(ddp) if cfg.model.compile else ddp
        root = Path(run_dir) / "checkpoints"
        chosen = None if fresh else choose_checkpoint(root, group, log.warning)
        accum = grad_accum_for_resume(cfg, group.world_size, chosen)
        trim = trim_for_resume(cfg, None if chosen is None else chosen.summary)
        settings = settings_from_config(cfg, accum, precision, trim)
        train_ds = val_ds = cursor = None
        total_steps = t.max_steps
        if build_data:
            # cached by default: a restart (a resume) need not tokenise the data again
            train_ds, val_ds, _report = build_datasets(
                cfg.data, loaded.tokenizer, cfg.seed, default_cache=True
            )
            # The cursor counts optimizer steps' global batches, so the data sequence does not
            # depend on the (accumulation x ranks) split.
            global_batch = t.micro_batch_size * accum * group.world_size
            if len(train_ds):  # (an empty set is refused by the Trainer, with what to do)
                cursor = DataCursor(cfg.seed, len(train_ds), global_batch, train_ds.fingerprint)
                total_steps = t.max_steps or max(1, t.epochs * cursor.steps_per_epoch)
        params = trainable_parameters(model)
        optimizer = build_optimizer(params, t)
        scheduler = (
            LRScheduler(optimizer, t.schedule, t.lr, total_steps)
            if make_scheduler is None
            else make_scheduler(optimizer)
        )

        def rank_rng(owner: str, states: Mapping[str, Any]) -> dict[str, Any]:
            return rng_state_for_rank(
                states, rank=group.rank, world_size=group.world_size, seed=cfg.seed
            )

        return Trainer(
            model,
            optimizer,
            scheduler,
            run_dir=run_dir,
            settings=settings,
            train_data=train_ds,
            eval_data=val_ds,
            loss_fn=functools.partial(token_loss_sum, kind=cfg.model.kind),
            count_targets=lambda batch: cfg.model.target_tokens(batch["labels"]),
            checkpoint=cfg.checkpoint,
            config=cfg.to_json(),
            allow_config_change=config_change_allowed(allow_config_change),
            group=group,
            forward=forward,
            model_owner=(
                "adapter_model" if cfg.lora is not None else "model",
                ModelState(model, loaded.identity),
            ),
            named_params=params,
            owners={
                # LoRA: PEFT's adapter_config.json beside the adapter weights
                **({"adapter_config": AdapterConfigState(model)} if cfg.lora is not None else {}),
                **(extra_owners or {}),
            },
            data_cursor=cursor,
            total_steps=total_steps,
            resume_from=None if fresh else chosen,
            rank_state=rank_rng,
            summary_fields=summary_fields,
            tokenizer=loaded.tokenizer,
            trackers=trackers,
        )
