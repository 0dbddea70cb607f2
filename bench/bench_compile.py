"""Benchmark: ``model.compile: true`` (``torch.compile``, inductor on CPU) against eager, in
the same run (issue 14, item 4).

Each setting is a fresh ``evertrain train`` process with one torch thread; the order rotates
between repeats. Reported per job: steady tokens/s (steps 2..N: step 1 carries the
compilation) and the seconds of step 1 (start-up of the step: compilation for ``compile``),
and the ratio compiled / eager of each, medians of per-repeat ratios. Jobs: the tiny Llama
(micro-batch 8 x 64 tokens, 40 steps) and, without ``--quick``, LoRA r=8 on the bundled
SmolLM2-135M (micro-batch 4 x 128 tokens, 6 steps).

Usage: ``python bench/bench_compile.py [--repeats 2] [--quick]``
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from common import (
    ROOT,
    median,
    pairwise,
    print_table,
    rotated,
    steady_tokens_per_s,
    train_run,
    workdir,
    write_json,
)

DATA = ROOT.parent / "examples" / "data" / "tiny.jsonl"
JOBS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"source": "tiny", "dropout": 0.0, "num_threads": 1},
        "data": {"files": [str(DATA)], "seq_len": 64, "val_fraction": 0.0},
        "train": {"micro_batch_size": 8, "max_steps": 40, "schedule": {"name": "constant"}},
    },
    "smollm2_lora": {
        "model": {"source": "smollm2-135m", "num_threads": 1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"files": [str(DATA)], "seq_len": 128, "val_fraction": 0.0},
        "train": {"micro_batch_size": 4, "max_steps": 6, "schedule": {"name": "constant"}},
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    work = workdir("compile")
    out: dict[str, Any] = {"jobs": {}}
    rows = []
    for job in ["tiny"] if a.quick else list(JOBS):
        tps: dict[str, list[float]] = {"eager": [], "compile": []}
        first: dict[str, list[float]] = {"eager": [], "compile": []}
        for i in range(a.repeats):
            for mode in rotated(["eager", "compile"], i):
                cfg = json.loads(json.dumps(JOBS[job]))
                cfg["model"]["compile"] = mode == "compile"
                records = train_run(cfg, work, f"{job}-{mode}")
                tps[mode].append(steady_tokens_per_s(records))
                first[mode].append(records[0]["seconds"])
        ratio = pairwise(tps["compile"], tps["eager"])
        out["jobs"][job] = {"tokens_per_s": tps, "first_step_s": first,
                            "compile_vs_eager_tokens_per_s": ratio,
                            "compile_vs_eager_first_step": pairwise(first["compile"],
                                                                    first["eager"])}  # fmt: skip
        rows.append([job, median(tps["eager"]), median(tps["compile"]), ratio,
                     median(first["eager"]), median(first["compile"])])  # fmt: skip
    print_table(
        "torch.compile vs eager (steady = steps 2..N)",
        ["job", "eager tok/s", "compile tok/s", "compile/eager", "step 1 s eager", "compiled"],
        rows,
    )
    write_json("compile", out)


if __name__ == "__main__":
    main()
