"""Benchmark: training tokens/s at evertrain's default torch thread count (``model.num_threads``
unset: the cores per process less data-loader workers, ``evertrain.threads``) against every
fixed count from 1 to the number of cores, in the same run (issue 13, item 9).

Each setting is a fresh ``evertrain train`` process (the thread count is process-wide and
OpenMP reads it once), with ``OMP_NUM_THREADS`` unset; the order of the settings rotates
between repeats. Tokens/s = training tokens of steps 2..N over their seconds, from
``metrics.jsonl`` (start-up excluded). Jobs: the tiny Llama on ``examples/data/tiny.jsonl``
(micro-batch 8, 64 tokens) and, without ``--quick``, LoRA r=8 on the bundled SmolLM2-135M
(micro-batch 4, 128 tokens).

Usage: ``python bench/bench_threads.py [--repeats 3] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    median,
    print_table,
    rotated,
    steady_tokens_per_s,
    train_run,
    workdir,
    write_json,
)

from evertrain.threads import default_threads

DATA = ROOT.parent / "examples" / "data" / "tiny.jsonl"

JOBS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"source": "tiny", "dropout": 0.0},
        "data": {"files": [str(DATA)], "seq_len": 64, "val_fraction": 0.0},
        "train": {"micro_batch_size": 8, "max_steps": 60, "schedule": {"name": "constant"}},
    },
    "smollm2_lora": {
        "model": {"source": "smollm2-135m"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"files": [str(DATA)], "seq_len": 128, "val_fraction": 0.0},
        "train": {"micro_batch_size": 4, "max_steps": 8, "schedule": {"name": "constant"}},
    },
}


def tokens_per_s(job: str, threads: int | None, work: Path) -> float:
    cfg = json.loads(json.dumps(JOBS[job]))
    if threads is not None:
        cfg["model"]["num_threads"] = threads
    return steady_tokens_per_s(train_run(cfg, work, f"{job}-{threads}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    work = workdir("threads")
    cores = os.cpu_count() or 1
    settings: list[int | None] = [None, *range(1, cores + 1)]
    names = ["default", *(str(n) for n in range(1, cores + 1))]
    out: dict[str, Any] = {"default_threads": default_threads(), "jobs": {}}
    rows = []
    for job in ["tiny"] if a.quick else list(JOBS):
        got: dict[str, list[float]] = {n: [] for n in names}
        for i in range(a.repeats):
            for name in rotated(names, i):
                got[name].append(tokens_per_s(job, settings[names.index(name)], work))
        med = {n: median(v) for n, v in got.items()}
        best = max((n for n in names if n != "default"), key=lambda n: med[n])
        ratio = med["default"] / med[best]
        out["jobs"][job] = {"tokens_per_s": got, "median": med, "best": best,
                            "default_vs_best": ratio}  # fmt: skip
        rows.append([job, *(med[n] for n in names), best, ratio])
    print_table(
        f"tokens/s by torch threads (default = {default_threads()})",
        ["job", *names, "best", "default/best"],
        rows,
    )
    write_json("threads", out)


if __name__ == "__main__":
    main()
