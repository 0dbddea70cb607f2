"""Pickle-free, atomically committed, hash-verified checkpoints (format v1).

See ``docs/checkpoint-format.md`` for the on-disk format. Public API:

- :func:`write_checkpoint`, :func:`read_checkpoint`, :func:`verify_checkpoint`: one directory.
- :class:`CheckpointManager`: the checkpoints of a run (save + retention, latest valid, load),
  synchronously or in the background (``save_async``); :class:`SaveStats` records each save's
  cost.
- :class:`SavePolicy` and the retention policies :class:`KeepLast`, :class:`KeepBest`,
  :class:`KeepEvery`, :class:`KeepPinned`, :class:`KeepUnion` (or ``a | b``).
"""

from evertrain.checkpoint.commit import write_checkpoint
from evertrain.checkpoint.errors import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InsufficientDiskSpaceError,
    Problem,
)
from evertrain.checkpoint.format import (
    FORMAT_VERSION,
    LoadedCheckpoint,
    estimate_size,
    step_dir_name,
)
from evertrain.checkpoint.manager import CheckpointInfo, CheckpointManager
from evertrain.checkpoint.policy import (
    KeepBest,
    KeepEvery,
    KeepLast,
    KeepPinned,
    KeepUnion,
    RetentionPolicy,
    SavePolicy,
    retention_from_config,
)
from evertrain.checkpoint.verify import read_checkpoint, verify_checkpoint
from evertrain.checkpoint.writer import SaveStats

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "InsufficientDiskSpaceError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepPinned",
    "KeepUnion",
    "LoadedCheckpoint",
    "Problem",
    "RetentionPolicy",
    "SavePolicy",
    "SaveStats",
    "estimate_size",
    "read_checkpoint",
    "retention_from_config",
    "step_dir_name",
    "verify_checkpoint",
    "write_checkpoint",
]
