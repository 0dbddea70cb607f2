"""evertrain: continuous, exactly-resumable PyTorch training.

A resumed run is bit-identical to one that never stopped: every piece of training state
(model, optimizer, LR scheduler, data position, RNG, progress) is owned by one object with
``state_dict()``/``load_state_dict()``, and checkpoints are safetensors + JSON only,
committed atomically and verified by content hash (see ``docs/checkpoint-format.md``).

The public API is :data:`__all__` (see ``docs/api.md``); every other module is private.
Names are imported on first use, so ``import evertrain`` stays cheap and changes nothing
in the process (no environment variable, no RNG, no logging setup).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Checkpointer": "evertrain.checkpointer",
    "ResumeError": "evertrain.checkpointer",
    "Trainer": "evertrain.trainer",
    "TrainSettings": "evertrain.train_settings",
    "StepStats": "evertrain.train_settings",
    "CheckpointConfig": "evertrain.config",
    "split_by_hash": "evertrain.data.split",
    "seed_everything": "evertrain.rng",
    "ConfigError": "evertrain.config",
    "RunConfig": "evertrain.config",
    "load_config": "evertrain.config",
    "StateError": "evertrain.state",
    "CheckpointError": "evertrain.checkpoint",
    "CorruptCheckpointError": "evertrain.checkpoint",
    "KeepBest": "evertrain.checkpoint",
    "KeepEvery": "evertrain.checkpoint",
    "KeepLast": "evertrain.checkpoint",
    "read_checkpoint": "evertrain.checkpoint",
    "verify_checkpoint": "evertrain.checkpoint",
    "Tracker": "evertrain.trackers",
    "TensorBoardTracker": "evertrain.trackers",
    "MLflowTracker": "evertrain.trackers",
    "WandbTracker": "evertrain.trackers",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from evertrain.checkpoint import (
        CheckpointError as CheckpointError,
    )
    from evertrain.checkpoint import (
        CorruptCheckpointError as CorruptCheckpointError,
    )
    from evertrain.checkpoint import (
        KeepBest as KeepBest,
    )
    from evertrain.checkpoint import (
        KeepEvery as KeepEvery,
    )
    from evertrain.checkpoint import (
        KeepLast as KeepLast,
    )
    from evertrain.checkpoint import (
        read_checkpoint as read_checkpoint,
    )
    from evertrain.checkpoint import (
        verify_checkpoint as verify_checkpoint,
    )
    from evertrain.checkpointer import Checkpointer as Checkpointer
    from evertrain.checkpointer import ResumeError as ResumeError
    from evertrain.config import CheckpointConfig as CheckpointConfig
    from evertrain.config import (
        ConfigError as ConfigError,
    )
    from evertrain.config import (
        RunConfig as RunConfig,
    )
    from evertrain.config import (
        load_config as load_config,
    )
    from evertrain.data.split import split_by_hash as split_by_hash
    from evertrain.rng import seed_everything as seed_everything
    from evertrain.state import StateError as StateError
    from evertrain.trackers import MLflowTracker as MLflowTracker
    from evertrain.trackers import TensorBoardTracker as TensorBoardTracker
    from evertrain.trackers import Tracker as Tracker
    from evertrain.trackers import WandbTracker as WandbTracker
    from evertrain.train_settings import StepStats as StepStats
    from evertrain.train_settings import TrainSettings as TrainSettings
    from evertrain.trainer import Trainer as Trainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'evertrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
