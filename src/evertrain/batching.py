"""How the global batch is split: micro-batches x accumulation x processes.

The global batch (examples per optimizer step) is ``micro_batch_size x grad_accum_steps x
world_size``; the data cursor counts global batches, so the data sequence does not depend
on the split (see :mod:`evertrain.data.cursor`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from evertrain.checkpoint import CheckpointInfo
from evertrain.config import ConfigError, RunConfig

log = logging.getLogger("evertrain")


def grad_accum_for_resume(cfg: RunConfig, world_size: int, resume: CheckpointInfo | None) -> int:
    """Accumulation micro-steps per optimizer step for this run on ``world_size`` processes.

    The global batch (examples per optimizer step) is ``micro_batch_size x
    grad_accum_steps x world_size``. When a run resumes on a different number of processes
    with ``train.micro_batch_size`` and ``train.grad_accum_steps`` unchanged from the
    checkpoint's config, the checkpoint's global batch (``summary["batch"]``) is kept and
    the accumulation is recomputed (and logged); the stored config keeps the user's value.
    A deliberate change of those keys (``--allow-config-change``) is taken as given.

    Args:
        cfg: the run config.
        world_size: the number of processes this run trains on.
        resume: the checkpoint being resumed (its summary and ``config.json``), or None.

    Raises:
        ConfigError: the checkpoint's global batch cannot be split over this many processes
            with this micro-batch size; the message lists the (processes, grad_accum_steps)
            pairs that work.
    """
    t = cfg.train
    batch = None if resume is None else resume.summary.get("batch")
    if resume is None or not isinstance(batch, dict):
        return t.grad_accum_steps  # fresh, or written before multi-process support
    try:
        stored = json.loads((resume.path / "config.json").read_bytes())["config"]["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return t.grad_accum_steps  # the resume's own checks report a broken config
    if (stored.get("micro_batch_size"), stored.get("grad_accum_steps")) != (
        t.micro_batch_size,
        t.grad_accum_steps,
    ):
        return t.grad_accum_steps
    saved_world = int(batch.get("world_size", 1))
    global_batch = int(batch["micro_batch_size"]) * int(batch["grad_accum_steps"]) * saved_world
    per_step = t.micro_batch_size * world_size
    if global_batch == t.grad_accum_steps * per_step:
        return t.grad_accum_steps
    if global_batch % per_step == 0:
        accum = global_batch // per_step
        log.warning(
            "resuming a checkpoint of %d process(es) on %d: train.grad_accum_steps %d -> %d "
            "keeps the global batch of %d examples per optimizer step (micro_batch_size %d x "
            "%d x %d processes); the data sequence continues exactly, floating-point results "
            "may differ in the last bits (the gradient reduction order changes)",
            saved_world,
            world_size,
            int(batch["grad_accum_steps"]),
            accum,
            global_batch,
            t.micro_batch_size,
            accum,
            world_size,
        )
        return accum
    mbs = t.micro_batch_size
    pairs = [
        f"({w}, {global_batch // (mbs * w)})"
        for w in range(1, global_batch // mbs + 1)
        if global_batch % (mbs * w) == 0
    ]
    raise ConfigError(
        f"resume on {world_size} process(es): the checkpoint's global batch of "
        f"{global_batch} examples per optimizer step cannot be split into micro-batches of "
        f"train.micro_batch_size {mbs} on {world_size} processes; (processes, "
        f"grad_accum_steps) that keep it: {', '.join(pairs) or 'none'}. Start with one of "
        f"those process counts, or change train.micro_batch_size (a breaking change: "
        f"--allow-config-change)"
    )


def trim_for_resume(cfg: RunConfig, summary: Mapping[str, Any] | None) -> bool:
    """Whether this run's micro-batches lose their trailing all-padding columns
    (:func:`evertrain.data.loader.trim_padding`).

    ``data.trim_padding`` when set; unset, what the checkpoint being resumed trained with
    (``summary["trim_padding"]``; a checkpoint without it was written before trimming
    existed and trained on full rows: False), so a resumed run keeps its arithmetic across
    evertrain upgrades and ``model.compile`` changes; for a fresh run (``summary`` None), on
    unless ``model.compile`` (a compiled graph specialises on the length)."""
    if cfg.data.trim_padding is not None:
        if cfg.data.trim_padding and cfg.model.compile:
            log.warning(
                "data.trim_padding: true with model.compile: true: each new micro-batch length "
                "compiles again, and a resume that meets another length first may compile a "
                "graph whose sums differ (not bit-identical); leave data.trim_padding unset"
            )
        return cfg.data.trim_padding
    if summary is not None:
        return bool(summary.get("trim_padding", False))
    return not cfg.model.compile
