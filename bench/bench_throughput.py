"""Benchmark 5: training throughput with asynchronous checkpoints every 50 steps against a
plain PyTorch loop that never checkpoints.

Model: the built-in tiny Llama (hidden 64, 2 layers, 131k parameters; weights + AdamW
moments = 1.6 MB per checkpoint), one torch thread (on a loaded 2-core machine OpenMP's
spinning threads make a step 15x slower with 2). Data: the bundled
``examples/data/tiny.jsonl`` packed into rows of 64 tokens, micro-batch 8. Optimizer: AdamW,
lr 1e-3 constant, gradient clipping at 1.0 on both sides.

- ``plain``: forward, backward, ``clip_grad_norm_``, ``step``, ``zero_grad``, ``loss.item()``
  over a shuffling ``DataLoader`` of the same rows; no checkpoint, no metrics file.
- ``evertrain_async``: ``Trainer.fit`` with ``checkpoint: {every_steps: 50, async: true}``.
- ``evertrain_sync`` (with ``--with-sync``): the same with synchronous checkpoints.
- ``evertrain_nockpt``: the same without periodic checkpoints (the trainer's own overhead).

Throughput = steps 2..N over the time from the end of step 1 to the end of step N (so the
window holds the checkpoints at 50, 100, ... below N and no start-up cost). Ratios are taken
pairwise within each repeat.

Usage: ``python bench/bench_throughput.py [--repeats 9] [--steps 300] [--with-sync]``
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from common import ROOT, median, pairwise, print_table, rotated, workdir, write_json

from evertrain.config import load_config
from evertrain.recipe import build_trainer

DATA = ROOT.parent / "examples" / "data" / "tiny.jsonl"


def config(work: Path, steps: int, every: int | None, async_save: bool) -> Any:
    return load_config(
        {
            "seed": 3,
            "model": {
                "source": "tiny",
                "dropout": 0.0,
                "num_threads": 1,
            },
            "data": {"files": [str(DATA)], "seq_len": 64, "val_fraction": 0.0},
            "train": {
                "micro_batch_size": 8,
                "max_steps": steps,
                "lr": 1e-3,
                "schedule": {"name": "constant"},
                "max_grad_norm": 1.0,
            },
            "checkpoint": {"every_steps": every, "keep_last": 2, "async": async_save},
        }
    )


def run_evertrain(cfg: Any, run: Path) -> tuple[float, int]:
    shutil.rmtree(run, ignore_errors=True)
    tr = build_trainer(cfg, run)
    tr.resume()
    ends: list[float] = []
    tr.on_step.append(lambda s: ends.append(time.perf_counter()))
    tr.fit()
    tr.close()
    return ends[-1] - ends[0], len(ends) - 1


def run_plain(cfg: Any, work: Path) -> tuple[float, int]:
    """The plain loop, on the model, rows and optimizer settings the trainer builds."""
    tr = build_trainer(cfg, work / "plain-setup")
    tr.resume()  # only to build the same model and rows
    model, ds = tr.model, tr.train_ds
    tr.close()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=8, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    model.train()
    steps, ends = cfg.train.max_steps, []
    while len(ends) < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            ends.append(time.perf_counter())
            if len(ends) == steps:
                break
    shutil.rmtree(work / "plain-setup")
    return ends[-1] - ends[0], len(ends) - 1


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--with-sync", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    work = workdir("throughput")
    cfgs = {
        "plain": config(work, a.steps, None, False),
        "evertrain_async": config(work, a.steps, a.every, True),
        "evertrain_nockpt": config(work, a.steps, None, False),
    }
    if a.with_sync:
        cfgs["evertrain_sync"] = config(work, a.steps, a.every, False)
    rate: dict[str, list[float]] = {m: [] for m in cfgs}
    ckpt_stats: list[dict[str, Any]] = []
    for i in range(a.repeats):
        for m in rotated(list(cfgs), i):
            if m == "plain":
                seconds, steps = run_plain(cfgs[m], work)
            else:
                seconds, steps = run_evertrain(cfgs[m], work / m)
                if m == "evertrain_async":
                    from evertrain.metrics import read_metrics

                    ckpt_stats += read_metrics(work / m / "metrics.jsonl", "checkpoint")
            rate[m].append(steps / seconds)
    rows = [[m, median(r), pairwise(r, rate["plain"])] for m, r in rate.items()]
    print_table(
        f"5. training throughput, checkpoint every {a.every} steps "
        f"({a.repeats} runs of {a.steps} steps; ratio = steps/s / plain loop's, pairwise)",
        ["loop", "steps/s", "x plain"],
        rows,
    )
    stall = median([s["stall_s"] for s in ckpt_stats])
    write_s = median([s["write_s"] for s in ckpt_stats])
    ckpt_bytes = median([s["bytes"] for s in ckpt_stats])
    print(
        f"  async checkpoints: {ckpt_bytes / 1e6:.1f} MB, stall {stall * 1e3:.1f} ms, "
        f"background write {write_s * 1e3:.1f} ms"
    )
    ratios = {m: pairwise(rate[m], rate["plain"]) for m in rate if m != "plain"}
    ratios["async_vs_nockpt"] = pairwise(rate["evertrain_async"], rate["evertrain_nockpt"])
    print(f"  evertrain_async / evertrain_nockpt: {ratios['async_vs_nockpt']:.3f}")
    write_json(
        "throughput",
        {
            "repeats": a.repeats,
            "steps": a.steps,
            "every": a.every,
            "steps_per_s": {m: {"median": median(r), "runs": r} for m, r in rate.items()},
            "ratios_vs_plain": ratios,
            "async_checkpoint": {"bytes": ckpt_bytes, "stall_s": stall, "write_s": write_s},
        },
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
