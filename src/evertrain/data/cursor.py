"""The data position: which examples have been consumed, as a few integers.

The sample order is a pure function of ``(seed, epoch)``: epoch ``e`` visits the examples in
the order of ``torch.randperm(num_examples, generator=torch.Generator().manual_seed(
epoch_seed(seed, e)))`` (its own generator, so the global RNG is never touched). An epoch is
``steps_per_epoch = num_examples // global_batch_size`` global micro-batches; the last
``num_examples % global_batch_size`` examples of each epoch's permutation are dropped
(drop_last), and since the permutation changes each epoch a different few are dropped each
time. Global micro-batch ``b`` of epoch ``e`` is ``perm_e[b*G:(b+1)*G]`` with
``G = global_batch_size``; rank ``r`` of ``world_size`` takes the ``r``-th contiguous slice of
``G // world_size`` of it, so the global order does not depend on the world size.

Resuming restores ``(epoch, offset)`` and starts the next batch directly at that position:
O(1) in the position, nothing consumed is replayed or skipped through.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import xxhash

from evertrain.state import StateError, check_version

log = logging.getLogger("evertrain.data")


def epoch_seed(seed: int, epoch: int) -> int:
    """The 63-bit seed of epoch ``epoch``'s permutation: XXH3-64 of ``"order/{seed}/{epoch}"``
    (a hash, so neighbouring seeds and epochs give unrelated orders)."""
    return xxhash.xxh3_64_intdigest(f"evertrain.data.order/{seed}/{epoch}".encode()) >> 1


def epoch_permutation(seed: int, epoch: int, n: int) -> list[int]:
    """The visiting order of epoch ``epoch``: a permutation of ``range(n)``."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g).tolist()


class DataCursor:
    """Stateful owner (version 1) of the position in the training data.

    Args:
        seed: the run seed (the order is a function of it and the epoch).
        num_examples: rows in the training set.
        global_batch_size: examples per global micro-batch (micro_batch_size x world_size).
        fingerprint: the training set's :attr:`~.dataset.TokenizedDataset.fingerprint`.

    Attributes:
        epoch: current epoch (0-based).
        offset: global examples consumed in the current epoch (a multiple of
            ``global_batch_size``).
        examples_seen: global examples consumed since the start of training.

    Raises:
        ValueError: non-positive sizes, or fewer examples than one global micro-batch.
    """

    VERSION = 1

    def __init__(
        self, seed: int, num_examples: int, global_batch_size: int, fingerprint: str
    ) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if num_examples < global_batch_size:
            raise ValueError(
                f"{num_examples} training examples, fewer than one global micro-batch of "
                f"{global_batch_size}; add data or lower the batch size"
            )
        self.seed, self.num_examples = int(seed), int(num_examples)
        self.global_batch_size, self.fingerprint = int(global_batch_size), str(fingerprint)
        self.epoch = 0
        self.offset = 0
        self.examples_seen = 0
        self._perm: tuple[int, list[int]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Global micro-batches per epoch: ``num_examples // global_batch_size``."""
        return self.num_examples // self.global_batch_size

    @property
    def step_in_epoch(self) -> int:
        """Global micro-batches consumed in the current epoch."""
        return self.offset // self.global_batch_size

    def permutation(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s order (the current epoch's is cached)."""
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.seed, epoch, self.num_examples))
        return self._perm[1]

    def global_batch(self, epoch: int, step: int) -> list[int]:
        """Example indices of global micro-batch ``step`` of epoch ``epoch``."""
        g = self.global_batch_size
        return self.permutation(epoch)[step * g : (step + 1) * g]

    def advance(self) -> None:
        """Record one global micro-batch as consumed (rolls over to the next epoch)."""
        self.offset += self.global_batch_size
        self.examples_seen += self.global_batch_size
        if self.offset >= self.steps_per_epoch * self.global_batch_size:
            self.epoch += 1
            self.offset = 0

    def indices(self, rank: int = 0, world_size: int = 1) -> Iterator[list[int]]:
        """Infinite iterator of rank ``rank``'s micro-batches from the current position.

        The position is read when this is called (later :meth:`advance` calls do not affect
        an iterator already made). Each item is a list of ``global_batch_size //
        world_size`` example indices; iteration continues across epochs.

        Raises:
            ValueError: ``world_size`` does not divide ``global_batch_size`` or ``rank`` is out
                of range.
        """
        g = self.global_batch_size
        if world_size < 1 or g % world_size:
            raise ValueError(f"world_size {world_size} must divide the global batch size {g}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        return self._iter(self.epoch, self.offset // g, rank, g // world_size)

    def _iter(self, epoch: int, step: int, rank: int, mb: int) -> Iterator[list[int]]:
        g, steps = self.global_batch_size, self.steps_per_epoch
        while True:
            # A local permutation: the iterator may run ahead of self.epoch (prefetching).
            perm = epoch_permutation(self.seed, epoch, self.num_examples)
            for s in range(step, steps):
                start = s * g + rank * mb
                yield perm[start : start + mb]
            epoch, step = epoch + 1, 0

    # ------------------------------------------------------------------ Stateful

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "epoch": self.epoch,
            "offset": self.offset,
            "examples_seen": self.examples_seen,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position.

        Raises:
            StateVersionError: a different state version.
            StateError: the data changed (fingerprint or num_examples differ), the seed
                differs, the global batch size differs and the saved offset is not a multiple
                of the new one, or the state is malformed.
        """
        check_version(state, "data_cursor", self.VERSION)
        for k in ("epoch", "offset", "examples_seen", "seed", "num_examples", "global_batch_size"):
            if not isinstance(state.get(k), int) or isinstance(state.get(k), bool):
                raise StateError(
                    f"data_cursor state: {k!r} must be an integer, got {state.get(k)!r}"
                )
        if (
            state.get("fingerprint") != self.fingerprint
            or state["num_examples"] != self.num_examples
        ):
            raise StateError(
                f"data_cursor: the training data changed since the checkpoint (saved "
                f"{state['num_examples']} examples, fingerprint "
                f"{str(state.get('fingerprint'))[:16]}...; now {self.num_examples} examples, "
                f"{self.fingerprint[:16]}...): the saved position does not apply; restore the "
                "data files, or start a new run (or fine-tune from this checkpoint's weights)"
            )
        if state["seed"] != self.seed:
            raise StateError(
                f"data_cursor: the seed changed ({state['seed']} -> {self.seed}); "
                "the data order depends on it: resume with the original seed"
            )
        old_g, epoch, offset = state["global_batch_size"], state["epoch"], state["offset"]
        if (
            epoch < 0
            or offset < 0
            or offset % old_g
            or offset > self.num_examples
            or state["examples_seen"] < 0
        ):
            raise StateError(
                f"data_cursor state is inconsistent: epoch {epoch}, offset "
                f"{offset}, global_batch_size {old_g}"
            )
        if old_g != self.global_batch_size:
            if offset % self.global_batch_size:
                raise StateError(
                    f"data_cursor: the global batch size changed ({old_g} -> "
                    f"{self.global_batch_size}) at offset {offset}, which is not a multiple of "
                    f"the new size; resume with global batch size {old_g}, or from a "
                    "checkpoint at an offset that both sizes divide"
                )
            log.warning(
                "data_cursor: global batch size changed %d -> %d at epoch %d offset %d",
                old_g,
                self.global_batch_size,
                epoch,
                offset,
            )
        self.epoch, self.offset = epoch, offset
        self.examples_seen = state["examples_seen"]
        if self.offset >= self.steps_per_epoch * self.global_batch_size:
            # A larger batch size can make the saved offset the end of the (shorter) epoch.
            self.epoch, self.offset = self.epoch + 1, 0
