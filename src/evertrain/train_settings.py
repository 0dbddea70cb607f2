"""What the training loop is configured with and reports: :class:`TrainSettings`,
:class:`StepStats`, the data protocol :class:`Rows` and the default loss and target count
(a Hugging Face causal LM's)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

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
    loss: float  # mean of the micro-batch losses (each a token-mean cross-entropy, nats)
    lr: float
    grad_norm: float
    tokens: int  # non-padding input tokens in this step
    examples: int  # sequences in this step
    seconds: float
    epoch: int


@dataclass
class TrainSettings:
    """How the loop runs (the model, optimizer and data are objects of their own).

    Attributes:
        micro_batch_size: rows per micro-batch per rank.
        grad_accum_steps: micro-batches per optimizer step (per rank).
        epochs: passes over ``train_data`` when ``max_steps`` is None.
        max_steps: optimizer steps of the run (overrides ``epochs``).
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        eval_every_steps / eval_max_batches: held-out loss every N optimizer steps, on at
            most M micro-batches (None: every batch).
        seed: the data order's seed (a pure function of (seed, epoch)).
        num_workers: DataLoader worker processes.
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


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(**batch).loss``: a Hugging Face model's token-mean cross-entropy (nats)."""
    return model(**batch).loss  # type: ignore[no-any-return]


def count_targets(batch: Mapping[str, torch.Tensor]) -> int:
    """Target tokens of a causal-LM batch: labels after the one-token shift that are not
    -100 (the tokens the loss averages over)."""
    return int((batch["labels"][:, 1:] != -100).sum())
