"""PEFT options passed through to PEFT's LoraConfig (issue 13, item 4): all-linear targets,
DoRA, rsLoRA and modules_to_save. Each trains, stops and resumes bit-exactly, and exports an
adapter that `PeftModel.from_pretrained` loads with the trained tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_identical, evertrain, train_losses, write_config
from evertrain.checkpoint import read_checkpoint

OPTIONS = {
    "all-linear+rslora": {"target_modules": "all-linear", "use_rslora": True},
    "dora": {"use_dora": True},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
}


def adapter(run: Path, step: int) -> dict[str, Any]:
    return read_checkpoint(run / "checkpoints" / f"step-{step:08d}").states["adapter_model"]


@pytest.mark.parametrize("option", list(OPTIONS))
def test_peft_option_trains_resumes_exactly_and_exports(tmp_path: Path, option: str) -> None:
    from peft import PeftModel

    from evertrain.config import load_config
    from evertrain.models import load_model
    from evertrain.rng import seed_everything

    lora = {"r": 4, "alpha": 8.0, "dropout": 0.1, **OPTIONS[option]}
    cfg = write_config(
        tmp_path,
        lora=lora,
        train={"max_steps": 6, "eval_every_steps": None},
        checkpoint={"every_steps": 3, "keep_last": 5},
    )
    a, b = tmp_path / "a", tmp_path / "b"
    evertrain("train", str(cfg), "--run-dir", str(a))
    evertrain("train", str(cfg), "--run-dir", str(b), "--max-steps", "3")
    evertrain("train", str(cfg), "--run-dir", str(b))
    assert train_losses(a) == train_losses(b)
    assert_identical(adapter(a, 6), adapter(b, 6))
    saved = {k: v for k, v in adapter(a, 6).items() if isinstance(v, torch.Tensor)}
    if option == "dora":
        assert any("lora_magnitude_vector" in k for k in saved)
    if option == "modules_to_save":
        assert any("lm_head" in k for k in saved)
    if option.startswith("all-linear"):
        assert any("mlp.down_proj.lora_A" in k for k in saved)

    evertrain("export", str(a), "--out", str(tmp_path / "out"))
    stored = load_config(cfg)
    seed_everything(stored.seed)  # the tiny base model is random: rebuild the run's
    base = load_model(stored.model).model
    peft = PeftModel.from_pretrained(base, str(tmp_path / "out"))
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(peft)
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
