"""What the training loop is configured with and reports: :class:`TrainSettings`,
:class:`StepStats`, the data protocol :class:`Rows` and the default loss and target count
(a Hugging Face causal LM's)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

LossFn = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]


class Rows(Protocol):
    """Map-style training or held-out data: rows of equal-shape tensors by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


@dataclass
class StepStats:
    """What one optimizer step did (the line written to ``metrics.jsonl``)."""

    global_step: int
    loss: float  # cross-entropy per target token over the step's micro-batches and ranks, nats
    lr: float
    grad_norm: float
    tokens: int  # non-padding input tokens in this step
    examples: int  # sequences in this step
    seconds: float
    epoch: int
    # optimizer steps whose updates this step undid: 0, or for a non-finite step 1 (skip)
    # or the steps since the checkpoint it rolled back to (evertrain.guard)
    steps_undone: int = 0


@dataclass
class TrainSettings:
    """How the loop runs (the model, optimizer and data are objects of their own).

    Attributes:
        micro_batch_size: rows per micro-batch per rank.
        grad_accum_steps: micro-batches per optimizer step (per rank).
        epochs: passes over ``train_data`` when ``max_steps`` is None.
        max_steps: optimizer steps of the run (overrides ``epochs``).
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bf16 where the device
            computes it natively, else fp32: :mod:`evertrain.precision`).
        eval_every_steps / eval_max_batches: held-out loss every N optimizer steps, on at
            most M micro-batches (None: every batch).
        seed: the data order's seed (a pure function of (seed, epoch)).
        num_workers: DataLoader worker processes.
        on_nonfinite: a step whose loss or gradient norm is NaN or infinite is never
            applied; ``"stop"`` raises :class:`DivergedError`, ``"skip"`` drops the step's
            batches (a ``"skipped": true`` train line in the metrics) and goes on,
            ``"rollback"`` also reloads model and optimizer from the newest checkpoint
            (:mod:`evertrain.guard`).
        trim_padding: drop each micro-batch's trailing columns that are padding in every
            row, in training and held-out batches (:func:`evertrain.data.loader.
            trim_padding`: a step on padded rows costs what its longest row does; without
            dropout the same loss up to float rounding). Off by default here: a compiled
            ``forward`` would meet many shapes, and a ``loss_fn`` whose targets are in
            another key than ``labels`` could lose them; ``evertrain train`` turns it on
            (``data.trim_padding``, :func:`evertrain.batching.trim_for_resume`).
    """

    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    epochs: int = 1
    max_steps: int | None = None
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    eval_every_steps: int | None = None
    eval_max_batches: int | None = None
    seed: int = 0
    num_workers: int = 0
    on_nonfinite: str = "stop"
    trim_padding: bool = False


def token_loss_sum(
    forward: Any, batch: dict[str, torch.Tensor], kind: str = "causal"
) -> torch.Tensor:
    """The **sum** of a Hugging Face LM's per-token cross-entropies (nats) over the batch's
    target tokens: labels not ``-100``, after the causal one-token shift (``kind="causal"``)
    or as they are (``"seq2seq"``: the decoder's targets). A scalar ``float32``; 0 (with a
    zero gradient) for a batch without targets, where a token mean would be NaN.

    Summing, rather than each model's own token mean, is what makes the loss of an
    optimizer step the mean over **all** its target tokens whatever their split into
    micro-batches and ranks (the trainer divides by the step's token count; the fix
    transformers made with ``num_items_in_batch``).
    """
    labels = batch["labels"]
    if kind == "causal":
        inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
        if "position_ids" in inputs:
            # masked packing: without an attention mask and without a KV cache, transformers
            # builds a block-diagonal causal mask from the restarting positions (each
            # document attends to itself); with a cache it silently attends across them
            inputs.pop("attention_mask", None)
            inputs["use_cache"] = False
        logits, labels = forward(**inputs).logits[:, :-1], labels[:, 1:]
    else:  # seq2seq: the model shifts the labels into decoder inputs itself
        logits = forward(**batch).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )


def causal_lm_loss(forward: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`token_loss_sum` of a causal LM."""
    return token_loss_sum(forward, batch, "causal")


def count_targets(batch: Mapping[str, torch.Tensor]) -> int:
    """Target tokens of a causal-LM batch: labels after the one-token shift that are not
    -100 (the tokens the loss averages over)."""
    return int(np.count_nonzero(batch["labels"][:, 1:].numpy() != -100))  # host: no sync
