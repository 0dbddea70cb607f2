"""Keep every model-loading code path off the network (no model hub, no telemetry).

Every ``from_pretrained`` in :mod:`evertrain.models` passes ``local_files_only=True``; PEFT
and ``huggingface_hub`` also have code paths that look at the hub on their own (e.g. PEFT
asking whether a base model exists there), which only the offline switches stop. Those are
switched on for the duration of a load or an export (:func:`hub_offline`) and restored
after it, so importing evertrain or building a trainer leaves the process's environment as
it was.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_HUB_CONSTANTS = "huggingface_hub.constants"


def _env_says_offline() -> bool:
    # huggingface_hub's own rule (constants.py), for a module first imported inside the block
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face libraries in offline mode inside the ``with`` block, as they were after.

    Sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` and
    ``huggingface_hub.constants.HF_HUB_OFFLINE`` (which ``huggingface_hub`` reads from the
    environment once, at import); on exit the variables get their previous values (or are
    removed again) and the constant is what it was, or, if ``huggingface_hub`` was first
    imported inside the block, what the restored environment makes it. Nests. While it
    lasts the change is process-wide (``os.environ`` is): not for use by two threads at once.
    Raises nothing of its own.
    """
    saved_env = {k: os.environ.get(k) for k in _ENV_VARS}
    constants = sys.modules.get(_HUB_CONSTANTS)
    saved_constant = getattr(constants, "HF_HUB_OFFLINE", None)
    for key in _ENV_VARS:
        os.environ[key] = "1"
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        now = sys.modules.get(_HUB_CONSTANTS)
        if now is not None:
            restored = saved_constant if constants is not None else _env_says_offline()
            now.HF_HUB_OFFLINE = restored  # type: ignore[attr-defined]
