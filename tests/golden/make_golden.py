"""Regenerate the golden checkpoint ``tests/golden/step-00000003/`` (format v1).

Run ``python tests/golden/make_golden.py`` only when the on-disk format changes on purpose
(bump FORMAT_VERSION and document it in docs/checkpoint-format.md). ``test_checkpoint_golden``
reads the checked-in files with the current code and also checks that writing
:func:`build_states` again reproduces them byte for byte, so any format change fails it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from evertrain.checkpoint import step_dir_name, write_checkpoint

GLOBAL_STEP = 3
HERE = Path(__file__).resolve().parent


def build_states() -> dict[str, dict[str, Any]]:
    """Small deterministic states: several dtypes (incl. bf16, a 0-dim), nested JSON."""
    return {
        "model": {
            "version": 1,
            "params": {
                "layers.0.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4,
                "layers.0.bias": torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16),
                "scale": torch.tensor(0.125, dtype=torch.float64),
            },
        },
        "optimizer": {
            "version": 1,
            "state": {
                "0": {
                    "step": torch.tensor(7, dtype=torch.int64),
                    "exp_avg": torch.tensor([[0.5, -1.0]], dtype=torch.float16),
                }
            },
            "param_groups": [{"lr": 0.001, "betas": [0.9, 0.999], "params": ["layers.0.weight"]}],
        },
        "rng": {
            "version": 1,
            "torch_cpu": torch.arange(16, dtype=torch.uint8),
            "mask": torch.tensor([True, False]),
            "python": [3, [1, 2, 3], None],
        },
        "progress": {
            "version": 1,
            "global_step": GLOBAL_STEP,
            "epoch": 0,
            "done": False,
            "note": "héllo",
            "best": float("inf"),
            "nan": float("nan"),
            "big": 2**62,
        },
    }


def build_summary() -> dict[str, Any]:
    return {
        "global_step": GLOBAL_STEP,
        "epoch": 0,
        "metrics": {"val_loss": 2.5},
        "wall_time_s": 12.0,
        "versions": {"evertrain": "0.1.0"},
    }


def write_golden(root: Path) -> Path:
    """Write the golden checkpoint under ``root`` and return its directory."""
    return write_checkpoint(
        root / step_dir_name(GLOBAL_STEP), build_states(), build_summary(), global_step=GLOBAL_STEP
    )


if __name__ == "__main__":
    shutil.rmtree(HERE / step_dir_name(GLOBAL_STEP), ignore_errors=True)
    print(write_golden(HERE))
