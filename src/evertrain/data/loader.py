"""The training DataLoader: reads batches at the cursor's position without touching global RNG.

Exactness rules this module enforces:

- The batch sampler is the cursor's :meth:`~.cursor.DataCursor.indices` taken when the loader
  is made, so a loader made from a restored cursor yields exactly the batches an uninterrupted
  loader would have yielded next, without reading consumed examples. Each rank's loader
  yields its share of every global micro-batch (see :mod:`.cursor` for the split).
- ``DataLoader`` draws a base seed when an iterator is created: from the global torch RNG
  unless it is given a ``generator``. A draw from the global RNG would shift the dropout
  stream of a resumed run, so an explicit generator seeded from ``(seed, epoch, offset,
  rank)`` is always passed.
- Worker processes seed Python's ``random``, NumPy and torch from the same value plus their
  worker id (the data itself is not random; this keeps any future augmentation exact).
- An epoch's last micro-batches are filled up with padding rows (the cursor's
  :data:`~.cursor.PADDING`): a copy of row 0 whose labels are all ``-100``, so it adds no
  target token; every batch carries ``row_mask`` (``bool [micro_batch_size]``, False for
  padding), which the trainer removes before the forward pass and counts examples with.
"""

from __future__ import annotations

import collections
import functools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import xxhash
from torch.utils.data import DataLoader

from evertrain.data.cursor import PADDING, DataCursor, check_split
from evertrain.data.dataset import TokenizedDataset

CONSUMED_KEPT = 4096  # index lists DataIterator.consumed keeps (bounds its memory)


def _loader_seed(seed: int, epoch: int, offset: int, rank: int) -> int:
    key = f"evertrain.data.loader/{seed}/{epoch}/{offset}/{rank}".encode()
    return xxhash.xxh3_64_intdigest(key) >> 1


def _seed_worker(worker_id: int, *, base: int) -> None:
    s = xxhash.xxh3_64_intdigest(f"{base}/{worker_id}".encode()) >> 1
    random.seed(s)
    np.random.seed(s % (1 << 32))
    torch.manual_seed(s)


ROW_MASK = "row_mask"  # batch key: which rows are real examples (not padding)


class _PaddedRows:
    """``dataset`` plus the padding row at index :data:`~.cursor.PADDING`; every row
    gets its ``row_mask`` entry."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.padding: dict[str, torch.Tensor] | None = None  # read when first needed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index != PADDING:
            return {**self.dataset[index], ROW_MASK: torch.tensor(True)}
        if self.padding is None:
            row = self.dataset[0]
            self.padding = {**row, "labels": torch.full_like(row["labels"], -100)}
        return {**self.padding, ROW_MASK: torch.tensor(False)}


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` without the trailing columns that are padding in every row.

    A column is kept up to the last one where some row has ``attention_mask`` True or a
    label other than -100; every tensor of shape ``[rows, seq_len, ...]`` becomes ``[rows,
    kept, ...]`` (contiguous copies), others (``row_mask [rows]``) stay. A batch without a
    2-D ``attention_mask`` is returned as it is.

    Why it is safe: rows are right-padded, so in a causal LM no kept position attends to a
    dropped one and no dropped position is a target; an encoder-decoder's encoder masks the
    dropped inputs out and its causal decoder has no target there either. Without dropout
    the loss is the same up to float rounding (matmuls of another shape may sum in another
    order); dropout masks are drawn in the kept shape, so they differ from an untrimmed
    run's. A step costs what its longest row does, not ``seq_len`` (the HF Trainer's
    collators pad to the batch's longest row for the same reason). Deterministic, so a
    resume stays exact.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    # numpy on the host batch: no tensor read-back (a device sync if it were on a GPU)
    used = mask.numpy().astype(bool)
    labels = batch.get("labels")
    if labels is not None and labels.shape == mask.shape:
        used = used | (labels.numpy() != -100)
    cols = np.flatnonzero(used.any(0))
    n = mask.shape[1]
    keep = int(cols[-1]) + 1 if len(cols) else 1
    if keep == n:
        return batch
    return {
        k: v[:, :keep].contiguous() if v.dim() >= 2 and v.shape[1] == n else v
        for k, v in batch.items()
    }


def collate(rows: list[dict[str, torch.Tensor]], trim: bool = False) -> dict[str, torch.Tensor]:
    """``rows`` stacked key by key into one batch, cut by :func:`trim_padding` if ``trim``."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return trim_padding(batch) if trim else batch


class _CursorBatchSampler:
    """Yields the index lists of a cursor snapshot; re-iterating restarts at the snapshot.

    Every list handed to the DataLoader is also appended to ``sampled``: the DataLoader
    iterates its batch sampler in the main process and delivers batches in sampling order
    (with or without workers), so the oldest entry is always the next batch's indices.
    """

    def __init__(
        self, cursor: DataCursor, micro_batch_size: int, rank: int, world_size: int
    ) -> None:
        self.cursor, self.rank, self.world_size = cursor, rank, world_size
        self.micro_batch_size = micro_batch_size
        self.epoch, self.offset = cursor.epoch, cursor.offset
        self.sampled: collections.deque[list[int]] = collections.deque()

    def __iter__(self) -> Iterator[list[int]]:
        self.sampled.clear()
        it = self.cursor._iter(
            self.epoch, self.offset, self.rank, self.micro_batch_size, self.world_size
        )
        for ids in it:
            self.sampled.append(ids)
            yield ids


class DataIterator:
    """An iterator over collated micro-batches; :meth:`close` stops worker processes.

    Each item is ``{"input_ids", "labels", "attention_mask"}``, each ``long
    [micro_batch_size, length]``, ``length`` at most ``seq_len`` (see
    :func:`trim_padding`). The iterator is infinite (it continues across epochs).

    Attributes:
        consumed: the example indices (rows of the dataset) of the batches handed out, oldest
            first, at most the last :data:`CONSUMED_KEPT`; a caller that wants them all
            (the example-id debug log) pops them as it goes.
    """

    def __init__(self, loader: DataLoader[Any], sampler: _CursorBatchSampler | None = None) -> None:
        self.loader = loader
        self._sampler = sampler
        self.consumed: collections.deque[list[int]] = collections.deque(maxlen=CONSUMED_KEPT)
        self._it: Iterator[dict[str, torch.Tensor]] | None = iter(loader)

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            raise StopIteration
        batch = next(self._it)
        if self._sampler is not None and self._sampler.sampled:
            self.consumed.append(self._sampler.sampled.popleft())
        return batch

    def close(self) -> None:
        """Shut down worker processes now (they also stop when this object is collected)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def dataset_fingerprint(dataset: Any) -> str:
    """What identifies ``dataset`` for a :class:`DataCursor`: its ``fingerprint`` attribute
    (a :class:`TokenizedDataset`'s content hash), else ``"rows=<len>"`` for a user's own
    map-style dataset (which then must not change between runs)."""
    return str(getattr(dataset, "fingerprint", f"rows={len(dataset)}"))


def make_loader(
    dataset: TokenizedDataset,
    cursor: DataCursor,
    *,
    micro_batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    trim_padding: bool = False,
) -> DataIterator:
    """Micro-batches for ``rank`` from the cursor's current position (snapshot at call).

    The caller advances the cursor (``cursor.advance_micro(micro_batch_size, world_size)``) once
    per consumed global micro-batch; prefetching by the loader does not move the cursor.

    Args:
        dataset: the training set the cursor was made for.
        cursor: the data position.
        micro_batch_size: rows per batch on this rank; ``micro_batch_size x world_size``
            must divide ``cursor.global_batch_size`` (the quotient is the number of
            accumulation micro-steps per global batch).
        num_workers: DataLoader worker processes (0 = load in this process).
        seed: the run seed.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        pin_memory: passed to the DataLoader.
        trim_padding: cut each micro-batch's trailing all-padding columns
            (:func:`trim_padding`); False: every batch is ``[rows, seq_len]``.

    Raises:
        ValueError: the sizes do not tile the cursor's global batch or its offset, or the
            dataset is not the cursor's (different length or fingerprint).
    """
    check_split(cursor.global_batch_size, cursor.offset, micro_batch_size, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if len(dataset) != cursor.num_examples or dataset_fingerprint(dataset) != cursor.fingerprint:
        raise ValueError(
            "the dataset is not the one the cursor was made for (different length or fingerprint)"
        )
    sampler = _CursorBatchSampler(cursor, micro_batch_size, rank, world_size)
    base = _loader_seed(seed, cursor.epoch, cursor.offset, rank)
    loader: DataLoader[Any] = DataLoader(
        _PaddedRows(dataset),  # type: ignore[arg-type]
        batch_sampler=sampler,  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=functools.partial(collate, trim=trim_padding),
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(base),
        worker_init_fn=functools.partial(_seed_worker, base=base) if num_workers else None,
    )
    return DataIterator(loader, sampler)
