"""One host sync per optimizer step, none per micro-batch (issue 14, item 2): the loss and
the gradient norm stay on the device until the step ends, and the step's token/example
counts are read from the host batches. Counted on CPU by wrapping every tensor read-back
(``item``, ``tolist``, ``__float__``, ``__int__``, ``__bool__``) made by evertrain's own
code during ``train_step`` (torch's optimizer reading its CPU ``step`` counters is not
ours); on a GPU, scripts/gpu-check.sh runs the step under ``set_sync_debug_mode``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import write_config
from evertrain.config import load_config
from evertrain.recipe import build_trainer

READ_BACKS = ("item", "tolist", "__float__", "__int__", "__bool__")


def count_read_backs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    src = str(Path(__file__).resolve().parents[1] / "src" / "evertrain")

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(src):
                calls.append(f"{name} at {caller.rsplit('/', 1)[-1]}:{sys._getframe(1).f_lineno}")
            return original(self, *a, **k)

        return counted

    for name in READ_BACKS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    return calls


@pytest.mark.parametrize("accum", [1, 4])
def test_train_step_reads_back_once_whatever_the_accumulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accum: int
) -> None:
    cfg = write_config(
        tmp_path,
        train={"micro_batch_size": 2, "grad_accum_steps": accum, "max_steps": 6},
    )
    trainer = build_trainer(load_config(cfg), tmp_path / "run")
    try:
        trainer.start_fresh()
        batches = trainer.batches()
        trainer.train_step(batches)  # warm-up: first-step work is not per step
        calls = count_read_backs(monkeypatch)
        for _ in range(2):
            before = len(calls)
            trainer.train_step(batches)
            assert len(calls) - before == 1, calls[before:]
    finally:
        monkeypatch.undo()
        trainer.close()
