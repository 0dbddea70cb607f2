"""Pieces the own-loop examples share: data, batching across epochs, a loss tracker."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parents[1] / "data"


def pc_examples() -> list[dict[str, str]]:
    """Prompt/completion pairs from examples/data/tiny_pc.jsonl."""
    lines = (DATA / "tiny_pc.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def byte_ids(text: str) -> list[int]:
    """ByT5's byte vocabulary: byte + 3 (0 pad, 1 eos, 2 unk), then eos."""
    return [b + 3 for b in text.encode("utf-8")] + [1]


def seq2seq_collate(rows: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Prompt -> encoder input, completion -> decoder target (pad 0, label -100)."""
    enc = [byte_ids(r["prompt"]) for r in rows]
    dec = [byte_ids(r["completion"]) for r in rows]
    n, m = max(map(len, enc)), max(map(len, dec))
    ids = torch.tensor([e + [0] * (n - len(e)) for e in enc])
    labels = torch.tensor([d + [-100] * (m - len(d)) for d in dec])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


class EpochTracker:
    """Per-epoch mean micro-batch loss and the best epoch so far: state a recipe trainer
    keeps next to its model, checkpointed as an ``extra`` owner."""

    def __init__(self) -> None:
        self.epoch, self.loss_sum, self.count = 0, 0.0, 0
        self.epoch_losses: list[float] = []
        self.best_loss: float | None = None

    def add(self, loss: float) -> None:
        self.loss_sum, self.count = self.loss_sum + loss, self.count + 1

    def end_epoch(self) -> None:
        mean = self.loss_sum / max(self.count, 1)
        self.epoch_losses.append(mean)
        self.best_loss = mean if self.best_loss is None else min(self.best_loss, mean)
        self.epoch, self.loss_sum, self.count = self.epoch + 1, 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def endless(loader: Any, tracker: EpochTracker, sampler: Any = None) -> Iterator[Any]:
    """Micro-batches epoch after epoch; the tracker closes an epoch when the loader runs
    out. A resumed StatefulDataLoader continues its epoch at the next ``iter()``."""
    while True:
        if sampler is not None:  # DistributedSampler: each epoch its own order
            sampler.set_epoch(tracker.epoch)
        yield from loader
        tracker.end_epoch()
