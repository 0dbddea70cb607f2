"""Benchmark 4: resume time to the first training step at data positions 0, 10^4 and 10^6.

Both sides train the built-in tiny model (random-init Llama, byte-level tokenizer; one torch
thread) on the same 1.075M rows of 8 tokens (86k random-letter documents, packed),
micro-batch 8, in the same process.

- evertrain: a run directory whose checkpoint sits at position P (cursor offset and
  examples_seen = P, global_step = P / 8); resume = ``build_trainer(cfg, run_dir).resume()``
  (verify and
  load the newest checkpoint, build the data from the tokenised-data cache) up to the end of
  the first ``train_step``.
- Hugging Face Trainer: an ``IterableDataset`` over the same rows and a checkpoint whose
  ``trainer_state.json`` says global_step = P / 8; resume = ``Trainer(...)`` +
  ``train(resume_from_checkpoint=...)`` up to the first ``on_step_end``. For an iterable
  dataset the Trainer (accelerate's ``skip_first_batches``) fetches and discards the P
  consumed examples.

Usage: ``python bench/bench_resume.py [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from common import median, pairwise, print_table, rotated, workdir, write_json

from evertrain.config import load_config
from evertrain.recipe import build_trainer

POSITIONS = [0, 10_000, 1_000_000]
MB = 8
SEQ = 8


def make_data(work: Path) -> Path:
    rnd = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    path = work / "data.jsonl"
    with open(path, "w") as f:
        for _ in range(86_000):
            f.write(json.dumps({"text": "".join(rnd.choices(letters, k=99))}) + "\n")
    return path


def config(work: Path, data: Path) -> Any:
    return load_config(
        {
            "seed": 1,
            "model": {"source": "tiny", "num_threads": 1},
            "data": {
                "files": [str(data)],
                "seq_len": SEQ,
                "val_fraction": 0.0,
                "cache_dir": str(work / "data-cache"),
            },
            "train": {
                "micro_batch_size": MB,
                "max_steps": 200_000,
                "lr": 1e-3,
                "schedule": {"name": "constant"},
            },
            "checkpoint": {"every_steps": 1_000_000, "keep_last": 1},
        }
    )


def evertrain_checkpoint(cfg: Any, run: Path, position: int) -> None:
    """A run directory whose newest checkpoint is at data position ``position``."""
    tr = build_trainer(cfg, run)
    tr.resume()
    c, p = tr.cursor, tr.progress
    assert position < c.steps_per_epoch * c.global_batch_size, "position must lie in epoch 0"
    c.offset = c.examples_seen = p.examples_seen = position
    p.global_step = p.micro_step = position // MB
    tr.save()
    tr.close()


def evertrain_resume(cfg: Any, run: Path) -> float:
    t0 = time.perf_counter()
    tr = build_trainer(cfg, run)
    tr.resume()
    tr.model.train()
    tr.train_step(tr.batches())
    seconds = time.perf_counter() - t0
    tr.close()
    return seconds


# --------------------------------------------------------------------------- HF Trainer


class Rows(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """The same rows as evertrain's training set, streamed in order."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        self.ids, self.labels, self.mask = ids, labels, mask

    def __iter__(self):  # type: ignore[no-untyped-def]
        for i in range(len(self.ids)):
            yield {
                "input_ids": self.ids[i].long(),
                "labels": self.labels[i].long(),
                "attention_mask": self.mask[i].long(),
            }


def hf_trainer(cfg: Any, rows: Rows, out: Path, max_steps: int, stop_after_first: bool) -> Any:
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments

    from evertrain.models.tiny import build_tiny

    torch.manual_seed(1)
    model, _ = build_tiny(cfg.model)
    args = TrainingArguments(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=MB,
        max_steps=max_steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        save_strategy="steps" if not stop_after_first else "no",
        save_steps=1,
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class FirstStep(TrainerCallback):
        at: float | None = None

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if self.at is None:
                self.at = time.perf_counter()
            control.should_training_stop = True
            return control

    cb = FirstStep()
    trainer = HFTrainer(
        model=model, args=args, train_dataset=rows, callbacks=[cb] if stop_after_first else []
    )
    trainer.first_step = cb
    return trainer


def hf_checkpoint(cfg: Any, rows: Rows, work: Path, position: int) -> Path:
    """``work/hf-P/checkpoint-S`` with S = P / 8, made from one real checkpoint."""
    base = work / "hf-base"
    if not (base / "checkpoint-1").exists():
        hf_trainer(cfg, rows, base, max_steps=1, stop_after_first=False).train()
    step = position // MB
    target = work / f"hf-{position}" / f"checkpoint-{step}"
    shutil.copytree(base / "checkpoint-1", target)
    state_file = target / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["global_step"] = step
    state["max_steps"] = step + 1
    state_file.write_text(json.dumps(state))
    return target


def hf_resume(cfg: Any, rows: Rows, ckpt: Path, position: int) -> float:
    t0 = time.perf_counter()
    tr = hf_trainer(
        cfg, rows, ckpt.parent / "resumed", max_steps=position // MB + 1, stop_after_first=True
    )
    tr.train(resume_from_checkpoint=str(ckpt))
    assert tr.first_step.at is not None
    return tr.first_step.at - t0


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)  # both sides; see bench_throughput.py for why
    work = workdir("resume")
    data = make_data(work)
    cfg = config(work, data)
    setup = build_trainer(cfg, work / "setup")  # builds the tokenised-data cache (untimed)
    setup.resume()
    ds = setup.train_ds
    print(f"training rows: {len(ds)} of {SEQ} tokens")
    rows = Rows(ds.input_ids, ds.labels, ds.attention_mask)
    setup.close()
    for pos in POSITIONS:
        evertrain_checkpoint(cfg, work / f"et-{pos}", pos)
    hf_ckpts = {pos: hf_checkpoint(cfg, rows, work, pos) for pos in POSITIONS}
    methods = [(fw, pos) for pos in POSITIONS for fw in ("evertrain", "hf_trainer")]
    times: dict[tuple[str, int], list[float]] = {m: [] for m in methods}
    for i in range(a.repeats):
        for fw, pos in rotated(methods, i):
            if fw == "evertrain":
                times[(fw, pos)].append(evertrain_resume(cfg, work / f"et-{pos}"))
            else:
                shutil.rmtree(hf_ckpts[pos].parent / "resumed", ignore_errors=True)
                times[(fw, pos)].append(hf_resume(cfg, rows, hf_ckpts[pos], pos))
    rows_out = []
    result: dict[str, Any] = {
        "repeats": a.repeats,
        "rows": len(ds),
        "micro_batch": MB,
        "seq_len": SEQ,
    }
    for fw in ("evertrain", "hf_trainer"):
        base = times[(fw, 0)]
        for pos in POSITIONS:
            t = times[(fw, pos)]
            rows_out.append([fw, pos, median(t), pairwise(t, base)])
            result[f"{fw}@{pos}"] = {
                "median_s": median(t),
                "runs_s": t,
                "vs_position_0": pairwise(t, base),
            }
    for pos in POSITIONS:
        result[f"hf_over_evertrain@{pos}"] = pairwise(
            times[("hf_trainer", pos)], times[("evertrain", pos)]
        )
    print_table(
        f"4. resume to the first step ({a.repeats} runs; "
        "ratio = time / same framework at position 0, pairwise)",
        ["framework", "position (examples)", "seconds", "x position 0"],
        rows_out,
    )
    for pos in POSITIONS:
        print(f"  HF Trainer / evertrain at {pos}: {result[f'hf_over_evertrain@{pos}']:.2f}")
    write_json("resume", result)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
