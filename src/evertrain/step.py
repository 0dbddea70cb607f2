"""The forward and backward half of an optimizer step: token-weighted over all its
micro-batches and ranks.

The step's micro-batches are taken first and their target tokens counted and summed over
ranks, so the count is known before the first backward; each micro-batch's *summed* token
loss is then scaled by ``world_size / count`` (DDP averages gradients over ranks, the world
size turns that back into a sum), so the accumulated gradient is that of all the step's rows
taken as one batch, whatever their lengths and their split into micro-batches and ranks
(torchtune's normalisation; transformers' ``num_items_in_batch`` fix).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from evertrain import distributed
from evertrain.data.loader import ROW_MASK, collate
from evertrain.faults import maybe_crash, poisoned
from evertrain.sharded import is_sharded_model, reshard

log = logging.getLogger("evertrain")


def backward_step(
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    forward: Any,
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    count_targets: Callable[[Mapping[str, torch.Tensor]], int],
    group: distributed.Group,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    global_step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward every micro-batch of optimizer step ``global_step``,
    accumulating gradients (DDP reduces them in the last backward only). Reads nothing
    back from the device: the step's counts come from the host batches, the loss stays a
    device tensor (see :func:`step_results`, the step's one host sync).

    Args:
        micro_batches: this rank's micro-batches (CPU tensors ``[rows, length]``, each its
            own length when trimmed: :func:`~evertrain.data.loader.trim_padding`); a
            ``row_mask`` entry (``bool [rows]``, False for padding) is removed and counted.
        forward, loss_fn, count_targets: the module to call, its summed token loss and the
            target tokens that sum is over (see :class:`~evertrain.trainer.Trainer`).
        group: this process's group (the counts are summed over it).
        device: where batches go.
        autocast: the precision context of a forward pass.
        global_step: the step being taken (1-based), for fault injection.

    Returns:
        ``(loss, counts)``: this rank's summed token loss (nats, ``float64 []`` on
        ``device``), and ``float64 [3]`` on the group's device: the step's target tokens,
        non-padding tokens and examples, summed over ranks.
    """
    rows = [b.pop(ROW_MASK, None) for b in micro_batches]
    targets, tokens, examples = 0, 0, 0
    for real, b in zip(rows, micro_batches, strict=True):
        targets += count_targets(b)
        t, e = host_counts(b, real)
        tokens, examples = tokens + t, examples + e
    # summed over ranks before the first backward, on the device: no host round trip
    counts = group.sum_tensor(group.tensor([targets, tokens, examples], torch.float64))
    scale = group.world_size / counts[0].clamp(min=1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    last = len(micro_batches) - 1
    for micro, cpu_batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        with distributed.no_sync(forward, last=micro == last):
            with autocast():
                summed = loss_fn(forward, batch)
            if micro == 0 and poisoned(global_step):
                summed = summed * math.nan
            if micro == 0 and poisoned(global_step, "gradinf"):
                summed = _InfiniteGradient.apply(summed)
            # scale in the loss's dtype, as a Python float would have been
            (summed * scale.to(device=summed.device, dtype=summed.dtype)).backward()
        loss_sum = loss_sum + summed.detach().double()
        maybe_crash("micro", global_step, micro)
        group.maybe_crash("micro", global_step, micro)
    return loss_sum, counts


class _InfiniteGradient(torch.autograd.Function):
    """Identity whose gradient is infinite (the ``gradinf@N`` fault: a finite loss with a
    non-finite gradient norm)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


def host_counts(batch: Mapping[str, torch.Tensor], real: torch.Tensor | None) -> tuple[int, int]:
    """``(non-padding tokens, examples)`` of a host micro-batch (``real``: its row mask, or
    None when every row is real). Read with numpy from host memory: no device sync."""
    first = next(iter(batch.values()))
    mask = batch.get("attention_mask")
    keep = np.ones(first.shape[0], dtype=bool) if real is None else real.numpy()
    if mask is not None:
        tokens = int(np.count_nonzero(mask.numpy()[keep]))
    else:
        tokens = int(keep.sum()) * (first.numel() // max(first.shape[0], 1))
    return tokens, int(keep.sum())


def step_results(
    group: distributed.Group, loss_sum: torch.Tensor, counts: torch.Tensor, norm: torch.Tensor
) -> tuple[float, float, int, int]:
    """The step's one host sync: ``(loss per target token in nats, gradient norm, tokens,
    examples)``, the loss summed over ranks first. Every rank gets the same values, so all
    decide alike whether to apply the step."""
    loss_sum = group.sum_tensor(loss_sum.to(counts.device))
    if hasattr(norm, "full_tensor"):  # a DTensor (FSDP2): the global norm, still on device
        norm = norm.full_tensor()
    both = torch.stack([loss_sum, norm.detach().to(counts.device, torch.float64), *counts])
    loss, grad_norm, targets, tokens, examples = both.tolist()
    return loss / max(targets, 1.0), grad_norm, int(tokens), int(examples)


@torch.no_grad()
def loss_totals(
    forward: Any,
    dataset: Any,
    *,
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    count_targets: Callable[[Mapping[str, torch.Tensor]], int],
    micro_batch_size: int,
    max_batches: int | None,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    rank: int = 0,
    world_size: int = 1,
    lockstep: bool = False,
    trim: bool = False,
) -> tuple[float, int, int]:
    """``(summed token loss in nats, target tokens, rows)`` of ``dataset``'s rows in
    order, ``micro_batch_size`` at a time (at most ``max_batches`` batches; batch ``b``
    scored by rank ``b % world_size``): the one held-out loop of the trainer and of
    ``evertrain eval``, so both report the same number. Leaves the module's mode alone.

    ``lockstep``: every rank runs the same number of forward passes (a rank without a batch
    in the last round repeats batch 0 and discards it), for a sharded model whose every
    forward is a collective (FSDP2 all-gathers the weights): otherwise a rank done early
    waits in the final all-reduce while another waits in an all-gather, forever.

    ``trim``: each batch loses its trailing all-padding columns
    (:func:`~evertrain.data.loader.trim_padding`), as training batches do."""
    total, count, scored = 0.0, 0, 0
    starts = list(range(0, len(dataset), micro_batch_size))
    if max_batches is not None:
        starts = starts[:max_batches]
    rounds = -(-len(starts) // world_size)
    for r in range(rounds if lockstep else len(starts)):
        b = r * world_size + rank if lockstep else r
        if not lockstep and b % world_size != rank:  # each rank evaluates its share
            continue
        real = b < len(starts)
        start = starts[b] if real else 0
        rows = [dataset[i] for i in range(start, min(start + micro_batch_size, len(dataset)))]
        host = collate(rows, trim)
        batch = {k: v.to(device) for k, v in host.items()}
        with autocast():
            loss = float(loss_fn(forward, batch))
        if real:
            total += loss
            count += count_targets(host)  # counted on the host batch
            scored += len(rows)
    return total, count, scored


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    forward: Any,
    dataset: Any,
    *,
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    count_targets: Callable[[Mapping[str, torch.Tensor]], int],
    settings: Any,
    group: distributed.Group,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> dict[str, float]:
    """``{"val_loss": nats per target token, "val_ppl"}`` over ``dataset`` (see
    :func:`loss_totals`), each rank its share. No dropout (eval mode, restored to train),
    no RNG draw."""
    model.eval()  # no dropout: eval must not draw from the training RNG
    total, count, _ = loss_totals(
        forward, dataset, loss_fn=loss_fn, count_targets=count_targets,
        micro_batch_size=settings.micro_batch_size, max_batches=settings.eval_max_batches,
        device=device, autocast=autocast, rank=group.rank, world_size=group.world_size,
        lockstep=is_sharded_model(model), trim=settings.trim_padding,
    )  # fmt: skip
    model.train()
    reshard(model)
    total, count = distributed.eval_totals(group, total, count)
    val_loss = total / max(count, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
