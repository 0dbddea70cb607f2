"""LoRA on the tiny model: only the adapter trains and is checkpointed, the checkpoint
directory is a PEFT adapter as-is, and a LoRA run with dropout killed with SIGKILL resumes
bit-identically."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import resumed_trainer, train_losses, write_config
from evertrain.checkpoint import read_checkpoint
from evertrain.config import load_config
from evertrain.models import load_model
from evertrain.rng import seed_everything
from test_exact_resume import assert_identical, run_straight_and_interrupted

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.1}


def test_lora_trains_only_the_adapter_and_loads_with_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    cfg = load_config(
        write_config(
            tmp_path,
            lora=LORA,
            train={
                "max_steps": 10,
                "eval_every_steps": None,
                "device": "cpu",
                "schedule": {"warmup_steps": 0},
            },
            checkpoint={"every_steps": 10},
        )
    )
    t = resumed_trainer(cfg, tmp_path / "run")
    base_before = {
        n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad
    }
    loss_before = t.evaluate()["val_loss"]
    assert t.fit() == "done"
    t.close()
    assert t.evaluate()["val_loss"] < loss_before
    for n, p in t.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), f"frozen {n} changed"
    lora_b = [p for n, p in t.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # zero-initialised, trained

    ckpt = tmp_path / "run" / "checkpoints" / "step-00000010"
    states = read_checkpoint(ckpt).states
    assert "model" not in states
    tensors = [k for k in states["adapter_model"] if k not in ("version", "identity")]
    # 2 layers x q,k,v,o x lora_A,lora_B; the frozen base is never saved
    assert len(tensors) == 16 and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert states["adapter_config"]["r"] == 4 and states["adapter_config"]["lora_alpha"] == 8.0

    seed_everything(cfg.seed)
    base = load_model(cfg.model).model
    loaded = PeftModel.from_pretrained(base, str(ckpt)).eval()
    t.model.eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, t.model(input_ids=ids).logits)


def test_lora_with_dropout_resumes_bit_identical_after_sigkill(tmp_path: Path) -> None:
    """Killed mid-accumulation, between the dropout draws of LoRA and attention (the crash
    points of the checkpoint writer are covered by test_exact_resume); the resumed run
    equals the straight one in every adapter weight, Adam moment, RNG state and logged
    loss, across an epoch boundary."""
    steps = 12
    straight, resumed = run_straight_and_interrupted(
        tmp_path,
        ["micro@7:1"],
        lora=LORA,
        train={"max_steps": steps, "eval_every_steps": 8, "device": "cpu"},
        checkpoint={"every_steps": 4},
    )
    assert train_losses(straight) == train_losses(resumed)
    assert sorted(train_losses(straight)) == list(range(1, steps + 1))
    a = read_checkpoint(straight / "checkpoints" / f"step-{steps:08d}").states
    b = read_checkpoint(resumed / "checkpoints" / f"step-{steps:08d}").states
    assert "model" not in a
    for owner in ("adapter_model", "optimizer", "scheduler", "data_cursor", "progress", "rng"):
        assert_identical(a[owner], b[owner], owner)
    assert a["data_cursor"]["epoch"] >= 1  # crossed an epoch boundary
