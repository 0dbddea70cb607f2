"""Benchmark: useful (target) tokens per second with ``data.packing: masked`` against the
padded batches of the HF Trainer and of a plain PyTorch + PEFT loop (issue 14, item 3).

Job: LoRA r=8 (alpha 16, dropout 0, evertrain's default targets) on the bundled
SmolLM2-135M, float32, one torch thread, AdamW lr 2e-4 constant, clipping at 1.0,
micro-batch 4 rows, ``seq_len`` 256, one epoch over the same documents for every method.

Data: short prompt/completion records cut from CPython's reference documentation (the
main job's text, :func:`evertrain.data.pydoc.pydoc_records`): the prompt is the start of a
sentence, the completion the start of the next one, so a record's median length is far
under a quarter of ``seq_len`` (the bench checks it and prints it). Every method trains the
completion tokens and ``eos`` of every record (targets), and nothing is truncated. Packing
continues a record that does not fit in the next row, which starts with the row's last
token again (a one-token overlap), so the packed runs train every target too: the bench
checks that every method trains the same number of target tokens.

- ``evertrain_masked``: ``Trainer.fit`` with ``data.packing: masked`` (rows of 256 tokens
  holding many records, ``position_ids`` restarting per record, attention kept inside each
  record: what is learned is the same as unpacked).
- ``evertrain_greedy`` (information): ``data.packing: true`` (attention spans records).
- ``evertrain_none`` (information): ``data.packing: none``, one record per row padded to
  ``seq_len``, each micro-batch cut to its longest row (``data.trim_padding``, the
  default): each batch as long as its longest record, as with the HF Trainer's padding.
- ``hf_trainer``: ``transformers.Trainer`` with ``DataCollatorForSeq2Seq`` padding each
  batch to its longest record (the usual SFT set-up; the strongest padded baseline).
- ``plain``: a hand-written loop over records right-padded to ``seq_len``, the simplest
  padded loop; its first ``--plain-steps`` steps only (each costs a full ``seq_len`` row per
  record whatever the record's length, so its rate is steady and a whole epoch would take
  most of the bench's time).

Useful tokens/s = the target tokens of optimizer steps 2..N over the time from the end of
step 1 to the end of step N (tokenisation, model loading and step 1's one-time costs
excluded, as in ``common.steady_tokens_per_s``). evertrain's per-step targets come from the
rows its example-id log (``EVERTRAIN_LOG_EXAMPLE_IDS``) names for each step. Methods rotate
between repeats; ratios are medians of per-repeat ratios (``common.pairwise``).

Usage: ``python bench/bench_packing.py [--repeats 3] [--records 240] [--quick] [--data main]``
(``--quick``: the built-in tiny Llama instead of SmolLM2, one repeat). ``--data main``: the
main job's documents instead (scripts/main.sh's pydoc files, ``{"text": ...}`` records of up
to 4000 characters, the first ``--records`` of them) at its ``seq_len`` of 128: most are
longer than a row, so the peers truncate each to one row (the usual ``truncation=True``) and
train far fewer targets, while evertrain packs every token; the rate compares what each
trains per second, and ``target_tokens_trained`` in the JSON shows how much of the data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import lora_model, median, pairwise, print_table, rotated, workdir, write_json

from evertrain.config import load_config
from evertrain.recipe import build_trainer

SEQ_LEN, MICRO_BATCH, LR, MAX_GRAD_NORM, SEED = 256, 4, 2e-4, 1.0, 1234
METHODS = ["evertrain_masked", "evertrain_greedy", "evertrain_none", "hf_trainer", "plain"]
PACKING = {"evertrain_masked": "masked", "evertrain_greedy": "greedy", "evertrain_none": "none"}
MAIN_JOB_FILES = (0, 4, 5, 6, 8, 11)  # scripts/main.sh's FILES
MAIN_JOB_SEQ_LEN = 128  # examples/watch-smollm2.yaml


def make_data(path: Path, records: int, max_words: int = 24, seed: int = 0) -> None:
    """``records`` prompt/completion lines from consecutive sentences of the pydoc topics."""
    from evertrain.data.pydoc import pydoc_records

    sentences = []
    for _topic, pieces in pydoc_records():
        for piece in pieces:
            sentences += [s.split() for s in re.split(r"(?<=[.!?:])\s+", piece) if s.strip()]
    rng = random.Random(seed)
    consecutive = zip(sentences, sentences[1:], strict=False)
    pairs = [(a, b) for a, b in consecutive if len(a) >= 4 and len(b) >= 3]
    rng.shuffle(pairs)
    with open(path, "w", encoding="utf-8") as f:
        for a, b in pairs[:records]:
            prompt = " ".join(a[: rng.randint(4, max_words)])
            completion = " " + " ".join(b[: rng.randint(3, max_words)])
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def main_job_data(path: Path, records: int) -> None:
    """The main job's documents (scripts/main.sh: the pydoc files it drops into the inbox,
    ``{"text": ...}`` records of up to 4000 characters), the first ``records`` of them."""
    from evertrain.data.pydoc import write_pydoc_files

    files = write_pydoc_files(path.parent / "pydoc", 12)
    lines = [ln for i in MAIN_JOB_FILES for ln in files[i].read_text().splitlines()]
    path.write_text("".join(ln + "\n" for ln in lines[:records]), encoding="utf-8")


def config(data: Path, model: str, packing: str) -> Any:
    return load_config(
        {
            "seed": SEED,
            "model": {"source": model, "dropout": 0.0, "num_threads": 1},
            **({"lora": {"r": 8, "alpha": 16, "dropout": 0.0}} if model != "tiny" else {}),
            "data": {"files": [str(data)], "seq_len": SEQ_LEN, "val_fraction": 0.0,
                     "packing": packing},
            "train": {"micro_batch_size": MICRO_BATCH, "epochs": 1, "lr": LR,
                      "schedule": {"name": "constant"}, "max_grad_norm": MAX_GRAD_NORM},
        }
    )  # fmt: skip


def run_evertrain(cfg: Any, run: Path) -> tuple[list[float], list[int]]:
    """Each optimizer step's end time and target tokens; the rows a step trained are the
    ids evertrain's own example-id log writes to ``metrics.jsonl``."""
    from evertrain.distributed import EXAMPLE_IDS_ENV
    from evertrain.metrics import read_metrics

    shutil.rmtree(run, ignore_errors=True)
    os.environ[EXAMPLE_IDS_ENV] = "1"
    try:
        tr = build_trainer(cfg, run)
    finally:
        del os.environ[EXAMPLE_IDS_ENV]
    tr.resume()
    row_targets = [cfg.model.target_tokens(tr.train_ds[i]["labels"][None])
                   for i in range(len(tr.train_ds))]  # fmt: skip
    ends: list[float] = []
    tr.on_step.append(lambda s: ends.append(time.perf_counter()))
    tr.fit()
    tr.close()
    steps = read_metrics(run / "metrics.jsonl", "example_ids")
    shutil.rmtree(run, ignore_errors=True)
    return ends, [sum(row_targets[i] for i in rec["ids"]) for rec in steps]


def peer_rows(model_dir: Path, data: Path) -> tuple[Any, list[dict[str, list[int]]]]:
    """The tokenizer and each record as ``input_ids``/``labels`` lists the way a user writes
    it: ``tokens(prompt) + tokens(completion) + [eos]``, the prompt's labels -100."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    rows = []
    for line in data.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "text" in rec:  # the main job's documents: truncated to seq_len, all targets
            ids = (tok(rec["text"])["input_ids"] + [tok.eos_token_id])[:SEQ_LEN]
            rows.append({"input_ids": ids, "labels": list(ids)})
            continue
        p = tok(rec["prompt"])["input_ids"]
        c = tok(rec["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert len(p) + len(c) <= SEQ_LEN, "a record longer than seq_len would be truncated"
        rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return tok, rows


def peer_model(model_dir: Path, lora: bool) -> Any:
    """The converted model, float32, with evertrain's LoRA (r=8, alpha 16, dropout 0, its
    default llama targets) applied by PEFT as a user would (``common.lora_model``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32, use_safetensors=True
    )
    return lora_model(model, r=8) if lora else model


def shifted_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


def run_hf_trainer(
    model_dir: Path, data: Path, work: Path, lora: bool
) -> tuple[list[float], list[int]]:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    tok, rows = peer_rows(model_dir, data)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    ends: list[float] = []
    targets: list[int] = []  # per batch, in the order the loader collates them (= steps)
    collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collator(features: list[dict[str, Any]]) -> Any:
        batch = collate([dict(f) for f in features])
        targets.append(shifted_targets(batch["labels"]))
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=MICRO_BATCH,
        num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant",
        max_grad_norm=MAX_GRAD_NORM, eval_strategy="no", save_strategy="no",
        logging_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, seed=SEED,
    )  # fmt: skip
    trainer = Trainer(model=peer_model(model_dir, lora), args=args, train_dataset=rows,
                      data_collator=collator, callbacks=[Clock()])  # fmt: skip
    trainer.train()
    shutil.rmtree(work / "hf", ignore_errors=True)
    return ends, targets


def run_plain(
    model_dir: Path, data: Path, lora: bool, max_steps: int
) -> tuple[list[float], list[int]]:
    tok, rows = peer_rows(model_dir, data)
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
    ids = torch.full((len(rows), SEQ_LEN), pad, dtype=torch.long)
    labels = torch.full((len(rows), SEQ_LEN), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), SEQ_LEN), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = (
            torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1,
        )  # fmt: skip
    model = peer_model(model_dir, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SEED))
    ends: list[float] = []
    targets: list[int] = []
    for start in range(0, min(len(rows), max_steps * MICRO_BATCH), MICRO_BATCH):
        pick = order[start : start + MICRO_BATCH]
        loss = model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        ends.append(time.perf_counter())
        targets.append(shifted_targets(labels[pick]))
    return ends, targets


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--records", type=int, default=240)
    p.add_argument(
        "--plain-steps",
        type=int,
        default=12,
        help="steps of the plain loop "
        "(every row costs seq_len tokens of compute: its rate is steady)",
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--data",
        choices=("short", "main"),
        default="short",
        help="short prompt/completion records (the target), or the main job's documents "
        "(longer than seq_len: the peers truncate them, evertrain packs all of each)",
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    global SEQ_LEN
    if a.data == "main":
        SEQ_LEN = MAIN_JOB_SEQ_LEN
    model = "tiny" if a.quick else "smollm2-135m"
    repeats = 1 if a.quick else a.repeats
    work = workdir("packing")
    data = work / f"{a.data}.jsonl"
    if a.data == "main":
        main_job_data(data, a.records)
    else:
        make_data(data, a.records, max_words=5 if a.quick else 24)  # tiny model: byte tokens
    cfgs = {m: config(data, model, packing) for m, packing in PACKING.items()}
    model_dir = work / "model"
    if model == "tiny":
        from evertrain.models.tiny import build_tiny

        tiny, tok = build_tiny(cfgs["evertrain_masked"].model)
        tiny.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    else:  # evertrain converts the bundled GGUF once; the peers load the converted directory
        from evertrain.models import load_model
        from evertrain.models.cache import cache_root
        from evertrain.models.sources import SMOLLM2

        load_model(cfgs["evertrain_masked"].model, None)
        model_dir = cache_root(None) / f"{SMOLLM2}-float32"
    _tok, rows = peer_rows(model_dir, data)
    lengths = [len(r["input_ids"]) for r in rows]
    print(f"{len(rows)} records, tokens per record: median {statistics.median(lengths):.0f}, "
          f"max {max(lengths)}; seq_len {SEQ_LEN}")  # fmt: skip
    assert a.quick or a.data == "main" or statistics.median(lengths) < SEQ_LEN / 4
    rate: dict[str, list[float]] = {m: [] for m in METHODS}
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for i in range(repeats):
        for m in rotated(METHODS, i):
            if m.startswith("evertrain"):
                ends, targets = run_evertrain(cfgs[m], work / m)
            elif m == "hf_trainer":
                ends, targets = run_hf_trainer(model_dir, data, work, model != "tiny")
            else:
                ends, targets = run_plain(model_dir, data, model != "tiny", a.plain_steps)
            assert len(ends) == len(targets) >= 2, (m, len(ends), len(targets))
            seconds = ends[-1] - ends[0]  # steps 2..N: step 1 carries one-time costs
            runs[m].append({"seconds": seconds, "targets": sum(targets), "steps": len(ends),
                            "targets_after_step_1": sum(targets[1:])})  # fmt: skip
            rate[m].append(sum(targets[1:]) / seconds)
            print(f"  {m}: {len(ends)} steps, {sum(targets)} target tokens, steps 2..N "
                  f"{seconds:.1f} s", flush=True)  # fmt: skip
    counts = {m: {r["targets"] for r in runs[m]} for m in METHODS}
    peers = counts["hf_trainer"]
    # equal work: packing continues a split record with a one-token overlap, so it trains
    # every target the padded peers train (on the main job's data the peers truncate)
    assert len(peers) == 1 and all(
        (a.data == "main" and m != "evertrain_none") or counts[m] == peers for m in PACKING
    ), f"unequal work: target tokens {counts}"
    rows_out = [[m, median(rate[m]), median([r["steps"] for r in runs[m]]),
                 pairwise(rate[m], rate["hf_trainer"]), pairwise(rate[m], rate["plain"])]
                for m in METHODS]  # fmt: skip
    print_table(
        f"useful (target) tokens/s, one epoch of {len(rows)} {a.data} records, {model}, "
        f"seq_len {SEQ_LEN}, micro-batch {MICRO_BATCH} ({repeats} runs, pairwise ratios)",
        ["method", "targets/s", "steps", "x hf_trainer", "x plain"],
        rows_out,
    )
    write_json(
        "packing" if a.data == "short" else "packing_main",
        {
            "model": model,
            "data": a.data,
            "target_tokens_trained": {m: sorted(c) for m, c in counts.items()},
            "records": len(rows),
            "record_tokens": {"median": statistics.median(lengths), "max": max(lengths)},
            "seq_len": SEQ_LEN,
            "micro_batch": MICRO_BATCH,
            "repeats": repeats,
            "runs": runs,
            "target_tokens_per_s": {m: median(r) for m, r in rate.items()},
            "ratios": {
                "masked_vs_hf_trainer": pairwise(rate["evertrain_masked"], rate["hf_trainer"]),
                "masked_vs_plain": pairwise(rate["evertrain_masked"], rate["plain"]),
                "greedy_vs_hf_trainer": pairwise(rate["evertrain_greedy"], rate["hf_trainer"]),
                "masked_vs_greedy": pairwise(rate["evertrain_masked"], rate["evertrain_greedy"]),
                "none_vs_hf_trainer": pairwise(rate["evertrain_none"], rate["hf_trainer"]),
            },
        },
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
