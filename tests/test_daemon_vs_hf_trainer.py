"""Why evertrain exists: the Trainer-based daemon pattern silently skips new files.

The common pattern for training on files as they arrive is a new ``transformers.Trainer``
per file, resumed with ``resume_from_checkpoint`` so optimizer, scheduler and step carry
over. But ``Trainer`` resumes its *position in the dataset* too: it skips the first
``global_step`` batches of the new file (and believes it has finished its epochs), so with
files of equal size every file after the first trains zero examples, and nothing says so.
This test shows it by counting dataset reads, and that ``evertrain watch`` reads every
training example of every file exactly once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from daemon_util import drop, equal_files, load_watch, rows, watch_config
from evertrain.daemon import Daemon
from evertrain.data import TokenizedDataset, build_datasets
from evertrain.models import load_model

TRAIN_ROWS = 12


def test_trainer_per_file_trains_zero_examples_of_later_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import Trainer, TrainingArguments

    reads: Counter[str] = Counter()  # training-set fingerprint -> rows read
    original = TokenizedDataset.__getitem__

    def counting(self: TokenizedDataset, i: int) -> dict[str, torch.Tensor]:
        if self.settings.get("split") == "train":
            reads[self.fingerprint] += 1
        return original(self, i)

    monkeypatch.setattr(TokenizedDataset, "__getitem__", counting)
    files = equal_files(tmp_path / "src", 3, train_rows=TRAIN_ROWS, val_rows=2)
    cfg = load_watch(watch_config(tmp_path, train={"grad_accum_steps": 1}))

    # --- the Trainer-based pattern: a new Trainer per file, resumed from the last checkpoint
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, cfg.lora)
    out = tmp_path / "hf"
    hf_reads, hf_steps = [], []
    for f in files:
        data = cfg.data.model_copy(update={"files": [str(f)]})
        train, _, _ = build_datasets(data, loaded.tokenizer, cfg.seed)
        assert len(train) == TRAIN_ROWS
        args = TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=cfg.train.micro_batch_size,
            num_train_epochs=1,
            learning_rate=cfg.train.lr,
            save_strategy="epoch",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=loaded.model, args=args, train_dataset=train)
        ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        trainer.train(resume_from_checkpoint=str(ckpts[-1]) if ckpts else None)
        hf_reads.append(reads.pop(train.fingerprint, 0))
        hf_steps.append(trainer.state.global_step)
    assert hf_reads == [TRAIN_ROWS, 0, 0]  # files 2 and 3: not one example read
    assert hf_steps == [3, 3, 3]  # and global_step never moved: it "finished" at once

    # --- evertrain watch on the same three files
    reads.clear()
    run = tmp_path / "run"
    for f in files:
        drop(f, run / "inbox")
    assert Daemon(run, cfg, once=True).run() == 0
    assert sorted(reads.values()) == [TRAIN_ROWS] * 3
    ledger = rows(run)
    assert [(r.status, r.examples, r.steps) for r in ledger] == [("done", TRAIN_ROWS, 3)] * 3
    assert ledger[-1].global_step_end == 9
