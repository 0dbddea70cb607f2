"""Benchmark: time to the first optimizer step, from process start, on the SmolLM2-135M
LoRA job (issue 14, item 1).

Measured: wall-clock seconds from just before the process is spawned to the end of the
first optimizer step it takes, for

- ``evertrain_fresh``: ``python -m evertrain train CFG --run-dir NEW`` (new run directory
  and a new, empty ``data.cache_dir`` each time: the tokenised-data cache is cold);
- ``evertrain_restart``: the same command on a run directory holding a checkpoint at step 1
  (written beforehand by the same command with ``--max-steps 1``) and its warm data cache,
  as after a real restart: the first step it takes is step 2;
- ``hf_trainer``: ``bench/startup_baselines.py hf_trainer``, ``transformers.Trainer`` with
  ``max_steps=1`` (no eval, no save);
- ``plain``: ``bench/startup_baselines.py plain``, a hand-written PyTorch + PEFT step;
- ``floor`` (a bound): ``startup_baselines.py floor``, ``plain`` tokenising only the rows
  of its one step: imports, model, LoRA and one step, what no fresh process training this
  model with these libraries can skip. ``floor / hf_trainer`` is the least a restart can
  reach here.

Same job everywhere: SmolLM2-135M-Instruct float32 from evertrain's converted-model cache
(the same ``model.safetensors`` and tokenizer; the cache stays warm), LoRA r=8, alpha 16,
dropout 0 on evertrain's default targets for llama, every document of the same JSONL file
tokenised in the process (about 420 KB of CPython's documentation, one paragraph per
document, written by this script), one document per row truncated to 128 tokens
(evertrain's ``data.packing: false``), micro-batch 4, one step of AdamW with clipping, fp32,
one torch thread (``OMP_NUM_THREADS=1`` for every process).

End of the first step, detected the same way for every method: the process appends a
``{"kind": "train", "global_step": N, ...}`` line to ``metrics.jsonl`` right after its
optimizer step (evertrain's own metrics line; the baselines write one in the same place:
after ``optimizer.step``, ``zero_grad`` and reading the loss back), the parent polls the
file every 2 ms and, when the line is there, takes the time and kills the process group
(SIGKILL). The line's ``global_step`` is checked (1, or 2 for the restart) and its loss must
be finite: each method really trained one step. The baselines also write their own
``time.time()`` into the line; ``detect_lag_s_max`` (seen minus written) shows that the
polling adds milliseconds at most. Every line also has ``seconds``, the step's own time
(evertrain's field; the baselines time the same span: batch in hand to the line), so the
table also splits the total into the step and what comes before it.

Before each restart, ``metrics.jsonl`` is put back as the preparing run left it (evertrain's
resume then cuts it back to the checkpoint's offset itself), so the previous repeat's step-2
line cannot be taken for this one's. One warm-up round of all four methods (discarded) comes
first, so every method finds the same warm page cache (model file, Python modules). Methods
run in rotated order; ratios are medians of per-repeat ratios (see ``common.py``).

Usage: ``python bench/bench_startup.py [--repeats 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from common import ROOT, machine, median, pairwise, print_table, rotated, workdir, write_json

from evertrain.models.cache import cache_root
from evertrain.models.lora import default_target_modules
from evertrain.models.sources import SMOLLM2

METHODS = ["evertrain_fresh", "evertrain_restart", "hf_trainer", "plain", "floor"]
BASELINES = ("hf_trainer", "plain", "floor")
SEQ_LEN, MICRO_BATCH, LORA_R, LORA_ALPHA = 128, 4, 8, 16
POLL_S = 0.002
TIMEOUT_S = 600


def make_data(path: Path) -> int:
    """Write one JSONL document per paragraph of CPython's documentation (``pydoc_data``);
    return how many."""
    from pydoc_data.topics import topics

    docs = [" ".join(para.split()) for key in sorted(topics) for para in topics[key].split("\n\n")]
    docs = [d for d in docs if len(d) >= 40]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return len(docs)


def write_config(path: Path, data: Path, cache_dir: Path) -> Path:
    """evertrain's config for the job (as examples/smollm2.yaml, without eval)."""
    cfg = {
        "seed": 1234,
        "model": {"source": SMOLLM2, "dtype": "float32", "num_threads": 1},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0},
        "data": {
            "files": [str(data)],
            "format": "text",
            "seq_len": SEQ_LEN,
            "packing": False,
            "val_fraction": 0.0,
            "cache_dir": str(cache_dir),
            # the baselines compute on full seq_len rows: the same work, not less
            "trim_padding": False,
        },
        "train": {
            "micro_batch_size": MICRO_BATCH,
            "grad_accum_steps": 1,
            "max_steps": 100,
            "schedule": {"name": "constant"},
            "precision": "fp32",
            "device": "cpu",
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_line(metrics: Path, step: int) -> dict[str, Any] | None:
    """The complete ``kind: train`` line of ``global_step == step`` in ``metrics``, if any."""
    try:
        text = metrics.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            rec = json.loads(line)
            if rec.get("kind") == "train" and rec.get("global_step") == step:
                return rec
    return None


def time_to_step(cmd: list[str], metrics: Path, step: int, log: Path) -> tuple[float, dict]:
    """Spawn ``cmd`` (own process group, output to ``log``); return the seconds from just
    before the spawn until ``metrics`` holds the train line of ``step``, and that line. The
    process group is SIGKILLed as soon as the line is seen."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            while (rec := train_line(metrics, step)) is None:
                if proc.poll() is not None or time.time() - t0 > TIMEOUT_S:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(
                        f"{cmd} gave no step-{step} line (exit {proc.returncode}):\n{tail}"
                    )
                time.sleep(POLL_S)
            seen = time.time()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if rec.get("loss") is None or not math.isfinite(rec["loss"]):
        raise RuntimeError(f"{cmd}: step {step} has no finite loss: {rec}")
    return seen - t0, {**rec, "seen": seen}


class Job:
    """The four methods' commands, run directories and the restart run's preparation."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.data = work / "data.jsonl"
        self.documents = make_data(self.data)
        self.model_dir = cache_root(None) / f"{SMOLLM2}-float32"
        model_type = json.loads((self.model_dir / "config.json").read_text())["model_type"]
        self.targets = ",".join(default_target_modules(model_type))
        self.runs = 0
        restart = work / "restart"
        restart.mkdir()
        self.restart_cfg = write_config(restart / "config.yaml", self.data, restart / "data-cache")
        self.restart_run = restart / "run"
        subprocess.run(
            [*self.evertrain(self.restart_cfg, self.restart_run), "--max-steps", "1"],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True,
        )  # fmt: skip
        self.metrics_after_prep = (self.restart_run / "metrics.jsonl").read_bytes()

    @staticmethod
    def evertrain(cfg: Path, run: Path) -> list[str]:
        return [sys.executable, "-m", "evertrain", "train", str(cfg), "--run-dir", str(run)]

    def measure(self, method: str) -> tuple[float, dict]:
        """One measurement of ``method``: seconds to the end of its first step, and its line."""
        self.runs += 1
        new = self.work / f"{self.runs:02d}-{method}"
        new.mkdir()
        if method == "evertrain_fresh":
            cfg = write_config(new / "config.yaml", self.data, new / "data-cache")
            cmd, metrics, step = self.evertrain(cfg, new / "run"), new / "run/metrics.jsonl", 1
        elif method == "evertrain_restart":
            metrics = self.restart_run / "metrics.jsonl"
            metrics.write_bytes(self.metrics_after_prep)
            cmd, step = self.evertrain(self.restart_cfg, self.restart_run), 2
        else:
            cmd = [
                sys.executable, str(ROOT / "startup_baselines.py"), method,
                str(self.model_dir), str(self.data), str(new), "--targets", self.targets,
                "--seq-len", str(SEQ_LEN), "--micro-batch", str(MICRO_BATCH),
                "--r", str(LORA_R), "--alpha", str(LORA_ALPHA),
            ]  # fmt: skip
            metrics, step = new / "metrics.jsonl", 1
        return time_to_step(cmd, metrics, step, new / "output.log")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    load_at_start = machine()["load_avg_at_start"]
    job = Job(workdir("startup"))
    for m in METHODS:  # warm-up round, discarded
        job.measure(m)
    secs: dict[str, list[float]] = {m: [] for m in METHODS}
    lines: dict[str, list[dict]] = {m: [] for m in METHODS}
    for i in range(a.repeats):
        for m in rotated(METHODS, i):
            s, line = job.measure(m)
            secs[m].append(s)
            lines[m].append(line)
            print(f"repeat {i} {m}: {s:.2f} s (global_step {line['global_step']})", flush=True)

    step = {m: [ln["seconds"] for ln in lines[m]] for m in METHODS}
    before = {m: [t - u for t, u in zip(secs[m], step[m], strict=True)] for m in METHODS}
    pairs = [(ours, base) for ours in METHODS[:2] for base in ("hf_trainer", "plain")]
    pairs.append(("floor", "hf_trainer"))
    ratios = {f"{x}_vs_{y}": pairwise(secs[x], secs[y]) for x, y in pairs}
    before_ratios = {f"{x}_vs_{y}": pairwise(before[x], before[y]) for x, y in pairs}
    lag = [ln["seen"] - ln["time"] for m in BASELINES for ln in lines[m]]
    print_table(
        f"seconds from process start to the end of the first optimizer step (median of "
        f"{a.repeats}); 'step' = that step's own time, 'before' = total - step",
        ["method", "total", "runs", "step", "before", "x hf_trainer", "first step"],
        [
            [
                m, median(secs[m]), " ".join(f"{s:.2f}" for s in secs[m]), median(step[m]),
                median(before[m]), pairwise(secs[m], secs["hf_trainer"]),
                lines[m][0]["global_step"],
            ]
            for m in METHODS
        ],
    )  # fmt: skip
    targets = {
        "evertrain_fresh_vs_hf_trainer": "<= 0.8",
        "evertrain_restart_vs_hf_trainer": "<= 0.5",
    }
    print_table(
        "ratios (median of per-repeat ratios)",
        ["ratio", "total", "before the step", "target (total)"],
        [
            [k.replace("_vs_", " / "), ratios[k], before_ratios[k], targets.get(k, "")]
            for k in ratios
        ],
    )
    print(f"\npolling lag (baselines): max {max(lag) * 1000:.1f} ms; "
          f"load average at start {load_at_start}")  # fmt: skip
    write_json(
        "startup",
        {
            "job": {
                "model": f"{SMOLLM2} float32, LoRA r={LORA_R} alpha={LORA_ALPHA} on {job.targets}",
                "data": f"{job.documents} documents, {job.data.stat().st_size} bytes",
                "seq_len": SEQ_LEN,
                "micro_batch_size": MICRO_BATCH,
            },
            "repeats": a.repeats,
            "seconds": {
                m: {
                    "median": median(secs[m]),
                    "runs": secs[m],
                    "step_median": median(step[m]),
                    "before_step_median": median(before[m]),
                }
                for m in METHODS
            },
            "first_step_lines": lines,
            "ratios": ratios,
            "ratios_before_step": before_ratios,
            "detect_lag_s_max": max(lag),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": os.getloadavg(),
        },
    )


if __name__ == "__main__":
    main()
