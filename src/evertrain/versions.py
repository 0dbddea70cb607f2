"""The library versions that affect bit-exactness, stored in every checkpoint: a resume
under other versions is warned about (its floating-point results may differ)."""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch

from evertrain import __version__


def versions() -> dict[str, Any]:
    """Library versions that affect bit-exactness, stored in every checkpoint
    (``transformers`` only when the process has imported it)."""
    import numpy
    import safetensors

    out: dict[str, Any] = {
        "version": 1,
        "evertrain": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
    if "transformers" in sys.modules:
        out["transformers"] = sys.modules["transformers"].__version__
    return out
