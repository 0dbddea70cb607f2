"""The baselines of ``bench_startup.py``: one fresh process that trains SmolLM2-135M LoRA
for exactly one optimizer step, the way a user would without evertrain.

``hf_trainer``: ``transformers.Trainer``; ``plain``: a hand-written PyTorch + PEFT loop.
Both do the same work as ``evertrain train`` up to its first step:

- load the model and tokenizer from ``MODEL_DIR`` (evertrain's converted SmolLM2 cache
  entry: ``model.safetensors`` and tokenizer files, float32),
- wrap it in PEFT LoRA (r, alpha, dropout 0, the target modules given),
- read the JSONL file and tokenise every document (no cache of any kind), each document's
  tokens plus ``eos``, truncated to ``SEQ_LEN`` and right-padded (evertrain's
  ``data.packing: false``; the tokenizer adds no ``bos``, evertrain neither),
- take one optimizer step (AdamW, lr 2e-4, gradient clipping at 1.0) on ``MICRO_BATCH``
  shuffled rows, one torch thread.

At the end of the step (after ``optimizer.step``, ``zero_grad`` and reading the loss back
to the host, as evertrain does before its metrics line) the process appends
``{"kind": "train", "global_step": 1, "loss": ..., "seconds": ..., "time": time.time()}`` to
``OUT/metrics.jsonl``, the file and line format evertrain writes, so the parent detects both
the same way; the parent then kills the process. ``seconds`` is the step's own time, as in
evertrain's line: from its batch in hand to the line.

``floor`` (a bound, not a peer): ``plain`` without the data: it tokenises only the
``MICRO_BATCH`` documents its one step trains. What is left, importing torch, transformers
and PEFT, loading the model, wrapping it and one step, is what any fresh process that
trains this model with these libraries must do: no start-up, evertrain's restart included,
can take less.

Usage: ``python bench/startup_baselines.py {hf_trainer,plain,floor} MODEL_DIR DATA OUT
--targets q_proj,k_proj,... [--seq-len 128] [--micro-batch 4] [--r 8] [--alpha 16]``
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

LR = 2e-4
MAX_GRAD_NORM = 1.0
SEED = 1234


def end_of_step(out: Path, global_step: int, loss: float, seconds: float) -> None:
    """Append the step's metrics line (written whole and flushed, like evertrain's)."""
    line = {"kind": "train", "global_step": global_step, "loss": loss, "seconds": seconds}
    line["time"] = time.time()
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def load(a: argparse.Namespace) -> tuple[Any, Any]:
    """Model with a fresh LoRA adapter (base frozen), and its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, local_files_only=True, dtype=torch.float32, use_safetensors=True
    )
    tok = AutoTokenizer.from_pretrained(a.model_dir, local_files_only=True)
    lora = LoraConfig(
        r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=a.targets.split(",")
    )
    return get_peft_model(model, lora), tok


def rows(tok: Any, data: Path, seq_len: int, limit: int | None = None) -> dict[str, torch.Tensor]:
    """Every document of the JSONL file (the first ``limit``) as one row: ``input_ids``,
    ``labels`` (-100 on padding) and ``attention_mask``, ``[documents, seq_len]``."""
    with open(data, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()][:limit]
    eos = tok.eos_token_id
    pad = eos if tok.pad_token_id is None else tok.pad_token_id
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    ids = torch.full((len(texts), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), seq_len), dtype=torch.long)
    for i, doc in enumerate(encoded):
        doc = (doc + [eos])[:seq_len]
        ids[i, : len(doc)] = torch.tensor(doc)
        mask[i, : len(doc)] = 1
    return {"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask}


def hf_trainer(a: argparse.Namespace) -> None:
    """``transformers.Trainer`` with ``max_steps=1``: no eval, no save, no logging."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, tok = load(a)
    data = rows(tok, a.data, a.seq_len)
    dataset = [{k: v[i] for k, v in data.items()} for i in range(len(data["input_ids"]))]

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            loss = float(trainer._tr_loss)  # the step's loss, read back to the host
            end_of_step(a.out, state.global_step, loss, time.perf_counter() - self.t0)

    args = TrainingArguments(
        output_dir=str(a.out / "hf"),
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=MAX_GRAD_NORM,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=SEED,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[FirstStep()])
    trainer.train()


def plain(a: argparse.Namespace, floor: bool = False) -> None:
    """Forward, backward, clip, ``AdamW.step``, ``zero_grad`` on ``micro_batch`` random rows
    (``floor``: the first ``micro_batch`` documents, the only ones tokenised)."""
    torch.manual_seed(SEED)
    model, tok = load(a)
    data = rows(tok, a.data, a.seq_len, a.micro_batch if floor else None)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    pick = torch.randperm(len(data["input_ids"]))[: a.micro_batch]
    batch = {k: v[pick] for k, v in data.items()}
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end_of_step(a.out, 1, loss.item(), time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("method", choices=["hf_trainer", "plain", "floor"])
    p.add_argument("model_dir")
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--targets", required=True, help="LoRA target modules, comma-separated")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    methods = {"hf_trainer": hf_trainer, "plain": plain, "floor": partial(plain, floor=True)}
    methods[a.method](a)


if __name__ == "__main__":
    main()
