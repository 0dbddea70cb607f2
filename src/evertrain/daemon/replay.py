"""Replay: rows of earlier files mixed into every micro-batch, to limit forgetting.

With ``watch.replay_fraction`` f and ``train.micro_batch_size`` B, each micro-batch holds
``B - r`` rows of the file being trained and ``r = round(f * B)`` rows drawn uniformly, with
replacement, from the training rows of the earlier files in the pool (the most recent
``watch.replay_window_files`` completed files, or all of them; frozen when a file starts).
The draw is a pure function of ``(seed, global_step, micro-batch index)``: its own
``torch.Generator`` seeded with XXH3-64 of ``"evertrain.replay/{seed}/{step}/{micro}"``, so
it never touches the global RNG and is identical after a resume.
"""

from __future__ import annotations

import bisect

import torch
import xxhash

from evertrain.data import TokenizedDataset


def replay_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the replay draw of micro-batch ``micro`` of optimizer step ``step``."""
    return xxhash.xxh3_64_intdigest(f"evertrain.replay/{seed}/{step}/{micro}".encode()) >> 1


class ReplaySampler:
    """Draws ``rows`` replay rows per micro-batch from ``pool``.

    Args:
        seed: the run seed.
        pool: the earlier files' training sets, in pool order.
        rows: replay rows per micro-batch (>= 1).

    Raises:
        ValueError: an empty pool, or ``rows`` < 1.
    """

    def __init__(self, seed: int, pool: list[TokenizedDataset], rows: int) -> None:
        if not pool or rows < 1:
            raise ValueError("replay needs at least one earlier file and at least one row")
        self.seed, self.pool, self.rows = seed, pool, rows
        self._ends: list[int] = []
        total = 0
        for ds in pool:
            total += len(ds)
            self._ends.append(total)
        self.total = total

    def indices(self, step: int, micro: int) -> list[tuple[int, int]]:
        """``[(pool index, row index), ...]`` of the rows for ``(step, micro)``."""
        g = torch.Generator().manual_seed(replay_seed(self.seed, step, micro))
        out = []
        for i in torch.randint(self.total, (self.rows,), generator=g).tolist():
            k = bisect.bisect_right(self._ends, i)
            start = self._ends[k - 1] if k else 0
            out.append((k, i - start))
        return out

    def extend(
        self, batch: dict[str, torch.Tensor], step: int, micro: int
    ) -> dict[str, torch.Tensor]:
        """``batch`` with the replay rows of ``(step, micro)`` appended along dim 0."""
        extra = [self.pool[k][i] for k, i in self.indices(step, micro)]
        return {
            key: torch.cat([value, torch.stack([r[key] for r in extra])])
            for key, value in batch.items()
        }
