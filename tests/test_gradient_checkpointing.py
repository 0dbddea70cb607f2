"""`train.gradient_checkpointing: true` (transformers' activation checkpointing, non-reentrant)
trades compute for memory only: with dropout on, the recomputed forward draws the same masks
(torch restores the RNG state), so losses and weights equal a run without it, bit for bit;
full fine-tuning and LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_identical, evertrain, train_losses, write_config
from evertrain.checkpoint import read_checkpoint


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path: Path, lora: bool) -> None:
    runs = {}
    for on in (False, True):
        sections: dict[str, object] = {
            "train": {"max_steps": 6, "eval_every_steps": None, "gradient_checkpointing": on}
        }
        if lora:
            sections["lora"] = {"r": 4, "alpha": 8.0, "dropout": 0.1}
        tmp = tmp_path / f"gc-{on}"
        tmp.mkdir()
        cfg = write_config(tmp, **sections)
        evertrain("train", str(cfg), "--run-dir", str(tmp / "run"))
        runs[on] = tmp / "run"
    assert train_losses(runs[True]) == train_losses(runs[False])
    owner = "adapter_model" if lora else "model"
    a, b = (read_checkpoint(r / "checkpoints" / "step-00000006").states for r in runs.values())
    assert_identical(a[owner], b[owner])
    assert any(isinstance(v, torch.Tensor) for v in a[owner].values())


@pytest.mark.parametrize("lora", [False, True])
def test_the_setting_turns_checkpointing_on(tmp_path: Path, lora: bool) -> None:
    """(so the test above compares two different computations, not one run twice)"""
    from evertrain.config import load_config
    from evertrain.recipe import build_trainer

    sections: dict[str, object] = {"train": {"max_steps": 6, "gradient_checkpointing": True}}
    if lora:
        sections["lora"] = {"r": 4}
    trainer = build_trainer(load_config(write_config(tmp_path, **sections)), tmp_path / "run")
    try:
        flags = [m.gradient_checkpointing for m in trainer.model.modules()
                 if hasattr(m, "gradient_checkpointing")]  # fmt: skip
        assert flags and all(flags)
    finally:
        trainer.close()
