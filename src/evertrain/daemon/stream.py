"""The stream's data position: which file is being trained, how far, and which are done.

:class:`StreamState` is the Stateful owner ``stream`` (version 1) that the daemon adds to the
trainer's checkpoints. With the trainer's own owners it makes a checkpoint a complete
description of the stream: after any crash the newest valid checkpoint says which files
are finished (``completed``) and where in the current file training stands (``current``
plus the file's :class:`~evertrain.data.DataCursor`, epoch and offset within the file), and
the ledger is reconciled to it (:mod:`evertrain.daemon.reconcile`).

Per file: the training split is visited ``epochs_per_file`` times by a
:class:`~evertrain.data.DataCursor` seeded from ``(run seed, file id)``; each micro-batch
holds ``rows_per_micro`` rows of the file (``micro_batch_size`` minus the replay rows).
A file is ``micro_total = epochs * ceil(train_rows / rows_per_micro)`` micro-batches,
trained in ``steps_total = ceil(micro_total / grad_accum_steps)`` optimizer steps; the last
step takes the remaining micro-batches, and each epoch's last micro-batch is filled up with
padding rows (no target tokens), so **every row of the file is trained once per epoch**
(the ledger's ``examples`` is ``train_rows x epochs``).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import xxhash

from evertrain.daemon.replay import ReplaySampler
from evertrain.data import DataCursor, TokenizedDataset, make_loader
from evertrain.data.loader import ROW_MASK, trim_padding
from evertrain.state import StateError, check_version


class FileTooSmallError(ValueError):
    """A file has no training rows (all of its records went to the held-out split)."""


def file_seed(seed: int, file_id: int) -> int:
    """The data-order seed of file ``file_id``: XXH3-64 of ``"stream.file/{seed}/{id}"``
    (63 bits), so files of equal length are not visited in the same order."""
    return xxhash.xxh3_64_intdigest(f"evertrain.stream.file/{seed}/{file_id}".encode()) >> 1


@dataclass
class FilePlan:
    """The file being trained: what was planned when it started and how far it got.

    Counts are of this file's rows only (replay rows are not counted). ``replay_pool`` is
    ``[[file_id, train_rows], ...]``, frozen when the file starts.
    """

    id: int
    name: str
    content_hash: str
    seed: int
    train_rows: int
    train_fingerprint: str
    rows_per_micro: int
    replay_rows: int
    epochs: int
    micro_total: int
    steps_total: int
    global_step_start: int
    replay_pool: list[list[int]] = field(default_factory=list)
    micro_done: int = 0
    steps_done: int = 0
    examples: int = 0
    tokens: int = 0
    loss_start: float | None = None
    loss_end: float | None = None
    val_loss_before: float | None = None
    steps_skipped: int = 0  # of steps_done: non-finite, not applied or rolled back

    @property
    def global_step_end(self) -> int:
        """global_step after the file's last optimizer step."""
        return self.global_step_start + self.steps_total

    @property
    def examples_total(self) -> int:
        """Examples the file trains: every training row once per epoch."""
        return self.train_rows * self.epochs

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FilePlan:
        names = {f.name for f in fields(cls)}
        # added later: a stream state written before has none (and skipped nothing)
        optional = {"steps_skipped"}
        if not names - optional <= set(data) <= names:
            raise StateError(
                f"stream state: current file has keys {sorted(data)}, expected {sorted(names)}"
            )
        return cls(**data)


def plan_file(
    *,
    file_id: int,
    name: str,
    content_hash: str,
    seed: int,
    train: TokenizedDataset,
    micro_batch_size: int,
    replay_rows: int,
    replay_pool: list[list[int]],
    epochs: int,
    grad_accum_steps: int,
    global_step: int,
    world_size: int = 1,
) -> FilePlan:
    """The plan of a file about to start (replay is off when ``replay_pool`` is empty).

    With ``world_size`` ranks (torchrun) a micro-batch is global: ``rows_per_micro`` rows
    of the file on each rank, ``micro_total`` counts global micro-batches.

    Raises:
        FileTooSmallError: no training rows.
    """
    r = replay_rows if replay_pool else 0
    per_micro = micro_batch_size - r
    if len(train) == 0:
        raise FileTooSmallError(
            "no training rows: every record went to the held-out split (data.val_fraction); "
            "add records to the file"
        )
    micro_total = epochs * -(-len(train) // (per_micro * world_size))
    return FilePlan(
        id=file_id,
        name=name,
        content_hash=content_hash,
        seed=file_seed(seed, file_id),
        train_rows=len(train),
        train_fingerprint=train.fingerprint,
        rows_per_micro=per_micro,
        replay_rows=r,
        epochs=epochs,
        micro_total=micro_total,
        steps_total=math.ceil(micro_total / grad_accum_steps),
        global_step_start=global_step,
        replay_pool=[list(p) for p in replay_pool],
    )


class StreamState:
    """Stateful owner ``stream`` (version 1).

    Attributes:
        completed: ids of the files whose last step is in this state, in training order.
        last_file: the statistics of the most recently completed file (what its ledger row
            gets), or None.
        current: the file being trained, or None between files.
        cursor: the current file's data cursor once attached (None before).
    """

    VERSION = 1

    def __init__(self) -> None:
        self.completed: list[int] = []
        self.last_file: dict[str, Any] | None = None
        self.current: FilePlan | None = None
        self.cursor: DataCursor | None = None
        self._cursor_state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        cursor = self.cursor.state_dict() if self.cursor is not None else self._cursor_state
        return {
            "version": self.VERSION,
            "completed": list(self.completed),
            "last_file": None if self.last_file is None else dict(self.last_file),
            "current": None if self.current is None else self.current.to_json(),
            "cursor": cursor if self.current is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; the cursor is applied later by :meth:`attach` (it needs the dataset).

        Raises:
            StateVersionError: another version.
            StateError: malformed state.
        """
        check_version(state, "stream", self.VERSION)
        completed = state.get("completed")
        if not isinstance(completed, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in completed
        ):
            raise StateError(f"stream state: 'completed' must be a list of file ids: {completed}")
        current = state.get("current")
        if current is not None and not isinstance(state.get("cursor"), dict):
            raise StateError("stream state: a current file without a data cursor")
        self.completed = list(completed)
        self.last_file = state.get("last_file")
        self.current = None if current is None else FilePlan.from_json(dict(current))
        self.cursor = None
        self._cursor_state = state.get("cursor") if current is not None else None

    # ------------------------------------------------------------------ transitions

    def begin(self, plan: FilePlan, cursor: DataCursor) -> None:
        """Start ``plan``'s file at its beginning."""
        self.current, self.cursor, self._cursor_state = plan, cursor, None

    def attach(self, cursor: DataCursor) -> None:
        """Resume the current file: load the checkpointed position into ``cursor``.

        Raises:
            StateError: the cursor does not fit the file (data changed).
        """
        if self.current is None or self._cursor_state is None:
            raise StateError("stream: no file to resume")
        cursor.load_state_dict(self._cursor_state)
        self.cursor = cursor

    def complete(self, stats: dict[str, Any]) -> None:
        """Mark the current file finished with its ledger statistics ``stats``."""
        if self.current is None:
            raise StateError("stream: no current file to complete")
        self.completed.append(self.current.id)
        self.last_file = dict(stats)
        self.current, self.cursor, self._cursor_state = None, None, None


def file_batches(
    plan: FilePlan,
    cursor: DataCursor,
    train: TokenizedDataset,
    *,
    grad_accum_steps: int,
    num_workers: int,
    replay: ReplaySampler | None,
    rank: int = 0,
    world_size: int = 1,
    trim: bool = False,
) -> Generator[dict[str, torch.Tensor], None, None]:
    """Micro-batches of the current file from the cursor's position, each extended by its
    replay rows. The cursor and ``plan``'s counters advance as each micro-batch is handed
    out (not as the loader prefetches), so a checkpoint between optimizer steps records
    exactly what was trained. Yields ``{"input_ids", "labels", "attention_mask"}``, each
    ``long [micro_batch_size, length]``: ``seq_len``, or with ``trim`` the micro-batch's
    longest row, replay rows included (:func:`~evertrain.data.loader.trim_padding`). Stops
    after the file's last micro-batch.

    Under torchrun (``world_size`` > 1) this rank gets its ``rows_per_micro`` rows of each
    global micro-batch (the cursor's ``global_batch_size`` is ``rows_per_micro x
    world_size``); ``plan.examples`` counts global rows, ``plan.tokens`` this rank's
    tokens; replay rows are drawn per rank (draw index ``micro x world_size + rank``, which
    is ``micro`` with one process)."""
    loader = make_loader(
        train,
        cursor,
        micro_batch_size=plan.rows_per_micro,
        num_workers=num_workers,
        seed=plan.seed,
        rank=rank,
        world_size=world_size,
        trim_padding=False,  # after the replay rows (full seq_len) are added
    )
    try:
        for batch in loader:
            if plan.micro_done >= plan.micro_total:
                return
            plan.examples += cursor.advance_micro(plan.rows_per_micro, world_size)
            step = plan.global_step_start + plan.micro_done // grad_accum_steps
            micro = plan.micro_done % grad_accum_steps
            plan.micro_done += 1
            real = batch.pop(ROW_MASK)
            plan.tokens += int(batch["attention_mask"][real].sum())
            if replay is not None:
                batch = replay.extend(batch, step, micro * world_size + rank)
                extra = batch["input_ids"].shape[0] - real.shape[0]  # replay rows are real
                real = torch.cat([real, torch.ones(extra, dtype=torch.bool)])
            batch = {**batch, ROW_MASK: real}
            yield trim_padding(batch) if trim else batch
    finally:
        loader.close()
