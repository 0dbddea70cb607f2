"""The data position: which examples have been consumed, as a few integers.

The sample order is a pure function of ``(seed, epoch)``: epoch ``e`` visits the examples in
the order of ``torch.randperm(num_examples, generator=torch.Generator().manual_seed(
epoch_seed(seed, e)))`` (its own generator, so the global RNG is never touched).

The cursor's unit is the **global batch** ``G`` (``global_batch_size``): the examples one
optimizer step consumes over all processes. The trainer uses ``G = micro_batch_size x
grad_accum_steps x world_size``. An epoch is ``steps_per_epoch = ceil(num_examples / G)``
global batches and trains **every example once**: global batch ``b`` of epoch ``e`` is
``perm_e[b*G:(b+1)*G]``, so the last one holds the ``num_examples % G`` remaining examples
when ``G`` does not divide the data. Its micro-batches are filled up with *padding rows*
(index :data:`PADDING`; the loader turns them into rows whose labels are all ignored, so
they add nothing to a token-weighted loss), and it may need fewer accumulation micro-steps
(:meth:`DataCursor.micro_steps`); a rank whose share is empty takes part with a micro-batch
of padding only, so every rank runs the same collectives.

How a global batch is split into micro-batches and ranks does not change which examples it
holds, nor their global order: with ``m`` rows per micro-batch and ``W`` ranks, the
global batch is read in consecutive chunks of ``m*W`` examples (one chunk per accumulation
micro-step) and rank ``r`` takes the ``r``-th ``m`` examples of each chunk. So 2 processes
with accumulation 1 and 1 process with accumulation 2 train on the same examples in every
optimizer step (only the floating-point reduction order differs).

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


PADDING = -1  # the index of a padding row in a micro-batch (see the module docstring)


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
        global_batch_size: examples per global batch, the unit of the
            epoch length; the trainer passes one optimizer step's examples over all ranks
            (``micro_batch_size x grad_accum_steps x world_size``).
        fingerprint: the training set's :attr:`~.dataset.TokenizedDataset.fingerprint`.

    Attributes:
        epoch: current epoch (0-based).
        offset: global examples consumed in the current epoch (a multiple of
            ``global_batch_size`` between optimizer steps, which is when it is saved).
        examples_seen: global examples consumed since the start of training.

    Raises:
        ValueError: non-positive sizes, or fewer examples than one global batch.
    """

    VERSION = 1

    def __init__(
        self, seed: int, num_examples: int, global_batch_size: int, fingerprint: str
    ) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if num_examples < 1:
            raise ValueError("no training examples; add data")
        self.seed, self.num_examples = int(seed), int(num_examples)
        self.global_batch_size, self.fingerprint = int(global_batch_size), str(fingerprint)
        self.epoch = 0
        self.offset = 0
        self.examples_seen = 0
        self._perm: tuple[int, list[int]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch: ``ceil(num_examples / global_batch_size)``."""
        return -(-self.num_examples // self.global_batch_size)

    @property
    def step_in_epoch(self) -> int:
        """Global batches consumed in the current epoch."""
        return self.offset // self.global_batch_size

    @property
    def epoch_examples(self) -> int:
        """Examples an epoch uses: all of them (``num_examples``)."""
        return self.num_examples

    def micro_steps(self, micro_batch_size: int, world_size: int = 1) -> int:
        """Accumulation micro-steps of the global batch starting at the current position
        (a global batch boundary): ``global_batch_size // (micro_batch_size x world_size)``,
        fewer for an epoch's short last global batch."""
        rows = min(self.global_batch_size, self.epoch_examples - self.offset)
        return -(-rows // (micro_batch_size * world_size))

    def advance_micro(self, micro_batch_size: int, world_size: int = 1) -> int:
        """Record one global micro-batch (``micro_batch_size`` rows on each of
        ``world_size`` ranks) as handed out; return how many real examples it held (fewer
        at an epoch's end, where padding fills it)."""
        rows = min(micro_batch_size * world_size, self.epoch_examples - self.offset)
        self.advance(rows)
        return rows

    def permutation(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s order (the current epoch's is cached)."""
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.seed, epoch, self.num_examples))
        return self._perm[1]

    def global_batch(self, epoch: int, step: int) -> list[int]:
        """Example indices of global batch ``step`` of epoch ``epoch``, in global order."""
        g = self.global_batch_size
        return self.permutation(epoch)[step * g : (step + 1) * g]

    def advance(self, examples: int | None = None) -> None:
        """Record ``examples`` global examples as consumed (default: one global batch, or
        what is left of the epoch); rolls over to the next epoch at the end of the epoch.

        The trainer advances by one global micro-batch as each is handed out
        (:meth:`advance_micro`), so the offset is a multiple of ``global_batch_size`` again
        after each optimizer step (or 0 after an epoch's last).

        Raises:
            ValueError: ``examples`` is not positive, or would step past the epoch's end.
        """
        left = self.epoch_examples - self.offset
        n = min(self.global_batch_size, left) if examples is None else int(examples)
        if n < 1 or self.offset + n > self.epoch_examples:
            raise ValueError(
                f"cannot advance by {n} examples at offset {self.offset} of an epoch of "
                f"{self.epoch_examples}"
            )
        self.offset += n
        self.examples_seen += n
        if self.offset >= self.epoch_examples:
            self.epoch += 1
            self.offset = 0

    def indices(
        self, rank: int = 0, world_size: int = 1, micro_batch_size: int | None = None
    ) -> Iterator[list[int]]:
        """Infinite iterator of rank ``rank``'s micro-batches from the current position.

        The position is read when this is called (later :meth:`advance` calls do not affect
        an iterator already made). Each item is a list of ``micro_batch_size`` example
        indices (default ``global_batch_size // world_size``: one micro-batch per global
        batch; :data:`PADDING` fills an epoch's last ones); iteration continues across
        epochs. See the module docstring for the split.

        Raises:
            ValueError: ``world_size`` does not divide ``global_batch_size``,
                ``micro_batch_size x world_size`` does not divide it or the current offset,
                or ``rank`` is out of range.
        """
        g = self.global_batch_size
        if world_size < 1 or g % world_size:
            raise ValueError(f"world_size {world_size} must divide the global batch size {g}")
        mb = g // world_size if micro_batch_size is None else micro_batch_size
        check_split(g, self.offset, mb, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        return self._iter(self.epoch, self.offset, rank, mb, world_size)

    def _iter(
        self, epoch: int, offset: int, rank: int, mb: int, world_size: int
    ) -> Iterator[list[int]]:
        chunk, end = mb * world_size, self.epoch_examples
        while True:
            # A local permutation: the iterator may run ahead of self.epoch (prefetching).
            perm = epoch_permutation(self.seed, epoch, self.num_examples)
            for start in range(offset, end, chunk):
                first = min(start + rank * mb, end)
                ids = perm[first : min(first + mb, end)]
                yield ids + [PADDING] * (mb - len(ids))
            epoch, offset = epoch + 1, 0

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
            old_g < 1
            or epoch < 0
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
        if self.offset >= self.epoch_examples:
            # A larger batch size can make the saved offset the end of the (shorter) epoch.
            self.epoch, self.offset = self.epoch + 1, 0


def check_split(
    global_batch_size: int, offset: int, micro_batch_size: int, world_size: int
) -> None:
    """Raise ValueError unless micro-batches of ``micro_batch_size`` rows on ``world_size``
    ranks tile a global batch of ``global_batch_size`` (and the position ``offset``)."""
    chunk = micro_batch_size * world_size
    if micro_batch_size < 1 or world_size < 1 or global_batch_size % chunk:
        raise ValueError(
            f"micro_batch_size {micro_batch_size} x world_size {world_size} = {chunk} does not "
            f"divide the cursor's global batch size {global_batch_size}"
        )
    if offset % chunk:
        raise ValueError(
            f"the cursor's offset {offset} is not a multiple of micro_batch_size x world_size "
            f"= {chunk}: it stands inside a global micro-batch"
        )
