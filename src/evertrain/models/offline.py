"""Keep every model-loading code path off the network (no model hub, no telemetry)."""

from __future__ import annotations

import os
import sys


def ensure_offline() -> None:
    """Put Hugging Face libraries into offline mode.

    Sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1``. ``huggingface_hub`` reads
    these once, at import; when it is already imported (e.g. by the data loader's
    tokenizer) its module constant is set too, otherwise a missing local file would
    silently turn into a download attempt. Call before importing ``transformers``/``peft``.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
