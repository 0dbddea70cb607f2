"""The training DataLoader: reads batches at the cursor's position without touching global RNG.

Exactness rules this module enforces:

- The batch sampler is the cursor's :meth:`~.cursor.DataCursor.indices` taken when the loader
  is made, so a loader made from a restored cursor yields exactly the batches an uninterrupted
  loader would have yielded next, without reading consumed examples.
- ``DataLoader`` draws a base seed when an iterator is created: from the global torch RNG
  unless it is given a ``generator``. A draw from the global RNG would shift the dropout
  stream of a resumed run, so an explicit generator seeded from ``(seed, epoch, offset,
  rank)`` is always passed.
- Worker processes seed Python's ``random``, NumPy and torch from the same value plus their
  worker id (the data itself is not random; this keeps any future augmentation exact).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import xxhash
from torch.utils.data import DataLoader

from evertrain.data.cursor import DataCursor
from evertrain.data.dataset import TokenizedDataset


def _loader_seed(seed: int, epoch: int, offset: int, rank: int) -> int:
    key = f"evertrain.data.loader/{seed}/{epoch}/{offset}/{rank}".encode()
    return xxhash.xxh3_64_intdigest(key) >> 1


def _seed_worker(worker_id: int, *, base: int) -> None:
    s = xxhash.xxh3_64_intdigest(f"{base}/{worker_id}".encode()) >> 1
    random.seed(s)
    np.random.seed(s % (1 << 32))
    torch.manual_seed(s)


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class _CursorBatchSampler:
    """Yields the index lists of a cursor snapshot; re-iterating restarts at the snapshot."""

    def __init__(self, cursor: DataCursor, rank: int, world_size: int) -> None:
        self.cursor, self.rank, self.world_size = cursor, rank, world_size
        self.epoch, self.offset = cursor.epoch, cursor.offset

    def __iter__(self) -> Iterator[list[int]]:
        mb = self.cursor.global_batch_size // self.world_size
        return self.cursor._iter(
            self.epoch, self.offset // self.cursor.global_batch_size, self.rank, mb
        )


class DataIterator:
    """An iterator over collated micro-batches; :meth:`close` stops worker processes.

    Each item is ``{"input_ids", "labels", "attention_mask"}``, each ``long
    [micro_batch_size, seq_len]``. The iterator is infinite (it continues across epochs).
    """

    def __init__(self, loader: DataLoader[Any]) -> None:
        self.loader = loader
        self._it: Iterator[dict[str, torch.Tensor]] | None = iter(loader)

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            raise StopIteration
        return next(self._it)

    def close(self) -> None:
        """Shut down worker processes now (they also stop when this object is collected)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


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
) -> DataIterator:
    """Micro-batches for ``rank`` from the cursor's current position (snapshot at call).

    The caller advances the cursor (``cursor.advance()``) once per consumed global
    micro-batch; prefetching by the loader does not move the cursor.

    Args:
        dataset: the training set the cursor was made for.
        cursor: the data position.
        micro_batch_size: rows per batch on this rank; must be
            ``cursor.global_batch_size // world_size``.
        num_workers: DataLoader worker processes (0 = load in this process).
        seed: the run seed.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        pin_memory: passed to the DataLoader.

    Raises:
        ValueError: the sizes do not match the cursor, or the dataset is not the cursor's
            (different length or fingerprint).
    """
    if micro_batch_size * world_size != cursor.global_batch_size:
        raise ValueError(
            f"micro_batch_size {micro_batch_size} x world_size {world_size} != the cursor's "
            f"global batch size {cursor.global_batch_size}"
        )
    if len(dataset) != cursor.num_examples or dataset.fingerprint != cursor.fingerprint:
        raise ValueError(
            "the dataset is not the one the cursor was made for (different length or fingerprint)"
        )
    sampler = _CursorBatchSampler(cursor, rank, world_size)
    base = _loader_seed(seed, cursor.epoch, cursor.offset, rank)
    loader: DataLoader[Any] = DataLoader(
        dataset,
        batch_sampler=sampler,  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(base),
        worker_init_fn=functools.partial(_seed_worker, base=base) if num_workers else None,
    )
    return DataIterator(loader)
