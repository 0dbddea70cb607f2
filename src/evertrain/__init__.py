"""evertrain: continuous, exactly-resumable PyTorch training.

A resumed run is bit-identical to one that never stopped: every piece of training state
(model, optimizer, LR scheduler, data cursor, RNG, progress) is owned by one object with
``state_dict()``/``load_state_dict()``, and checkpoints are safetensors + JSON only,
committed atomically and verified by content hash (see ``docs/checkpoint-format.md``).
"""

__version__ = "0.1.0"
