"""Benchmark: what ``train.gradient_checkpointing`` saves in peak memory and costs in
time, on LoRA r=8 of the bundled SmolLM2-135M (issue 13, item 5).

Each setting is a fresh ``evertrain train`` process (one torch thread, micro-batch
``--micro``, ``--seq-len`` tokens, no packing: full rows of real text from
``examples/data/tiny.jsonl`` repeated, so every row is ``seq_len`` tokens), ``--steps``
optimizer steps, no evaluation, no checkpoint until the end. Peak memory is the process's
peak resident set (``ru_maxrss`` from ``os.wait4``): the model (540 MB in float32) plus
activations plus everything else, the same on both sides except the activations.
Tokens/s = tokens of steps 2..N over their seconds (``metrics.jsonl``). The order of the
two settings rotates between repeats; the ratios are medians of per-repeat ratios.

Usage: ``python bench/bench_memory.py [--repeats 2] [--steps 3] [--micro 4] [--seq-len 256]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from common import ROOT, median, pairwise, print_table, rotated, workdir, write_json

TEXT = ROOT.parent / "examples" / "data" / "tiny.jsonl"


def data_file(work: Path, seq_len: int) -> Path:
    """Records long enough to fill ``seq_len`` tokens each (real text, repeated)."""
    texts = [json.loads(line)["text"] for line in TEXT.read_text().splitlines() if line.strip()]
    blob = " ".join(texts)
    out = work / "long.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for i in range(64):
            start = (i * 997) % len(blob)
            f.write(json.dumps({"text": (blob[start:] + blob)[: seq_len * 6]}) + "\n")
    return out


def run_once(
    work: Path, data: Path, checkpointing: bool, a: argparse.Namespace
) -> dict[str, float]:
    cfg: dict[str, Any] = {
        "model": {"source": "smollm2-135m", "num_threads": 1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"files": [str(data)], "seq_len": a.seq_len, "packing": False,
                 "val_fraction": 0.0, "cache_dir": str(work / "cache")},
        "train": {"micro_batch_size": a.micro, "max_steps": a.steps,
                  "schedule": {"name": "constant"}, "gradient_checkpointing": checkpointing},
    }  # fmt: skip
    name = "ckpt" if checkpointing else "plain"
    run = work / f"run-{name}"
    shutil.rmtree(run, ignore_errors=True)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "evertrain", "train", str(path), "--run-dir", str(run)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise RuntimeError(f"evertrain train exited {status}:\n{err[-3000:]}")
    steps = [
        rec
        for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if rec.get("kind") == "train" and rec["global_step"] >= 2
    ]
    return {
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
        "tokens_per_s": sum(r["tokens"] for r in steps) / sum(r["seconds"] for r in steps),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    a = p.parse_args()
    work = workdir("memory")
    data = data_file(work, a.seq_len)
    got: dict[str, list[dict[str, float]]] = {"plain": [], "ckpt": []}
    for i in range(a.repeats):
        for name in rotated(["plain", "ckpt"], i):
            got[name].append(run_once(work, data, name == "ckpt", a))
    rss = {n: [r["peak_rss_mb"] for r in v] for n, v in got.items()}
    tps = {n: [r["tokens_per_s"] for r in v] for n, v in got.items()}
    ratios = {
        "peak_rss_ckpt_vs_plain": pairwise(rss["ckpt"], rss["plain"]),
        "tokens_per_s_ckpt_vs_plain": pairwise(tps["ckpt"], tps["plain"]),
    }
    print_table(
        f"gradient checkpointing, SmolLM2 LoRA, micro-batch {a.micro} x {a.seq_len} tokens",
        ["setting", "peak RSS MB", "tokens/s"],
        [[n, median(rss[n]), median(tps[n])] for n in ("plain", "ckpt")],
    )
    print(ratios)
    write_json("memory", {"settings": vars(a), "runs": got, "ratios": ratios})


if __name__ == "__main__":
    main()
