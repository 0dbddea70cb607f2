"""Run every checkpoint benchmark, each in a fresh process, and print the targets' ratios.

Usage: ``.venv/bin/python bench/run_all.py [--quick] [--load] [--write-readme]``
(``--quick``: fewer repeats; ``--load``: one core kept busy by a background loop for the
whole run). Results land in ``bench/results/*.json``, or ``bench/results-load/*.json`` with
``--load``; ``--write-readme`` puts both into bench/README.md's table. Scratch files in
``$EVERTRAIN_BENCH_DIR`` (default ``/tmp/evertrain-bench``, about 8 GB free needed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


RESULT_DIRS = {"quiet": HERE / "results", "load": HERE / "results-load"}


def run_one(script: str, *args: str, results: Path = RESULT_DIRS["quiet"]) -> None:
    t0 = time.perf_counter()
    print(f"\n===== {script} {' '.join(args)}", flush=True)
    env = {**os.environ, "EVERTRAIN_BENCH_RESULTS": str(results)}
    subprocess.run([sys.executable, str(HERE / script), *args], check=True, env=env)
    print(f"===== {script}: {time.perf_counter() - t0:.0f} s", flush=True)


def summary(results: Path = RESULT_DIRS["quiet"]) -> list[tuple[str, float, str]]:
    """(measure, value, target) of every result in ``results``, printed as a table."""
    r = {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}
    rows = []
    if "save_full" in r:
        q = r["save_full"]["ratios"]
        rows += [
            (
                "save throughput / disk raw write (full FT)",
                q["evertrain_vs_disk_throughput"],
                ">= 0.8",
            ),
            ("save speed-up vs torch.save (full FT)", q["speedup_vs_torch_save"], ">= 1.5"),
            ("save speed-up vs HF Trainer (full FT, +fsync)", q["speedup_vs_hf_trainer"], ">= 1.5"),
            (
                "save speed-up vs HF Trainer (full FT, its own no-fsync save)",
                q["speedup_vs_hf_trainer_nofsync"],
                "",
            ),
        ]
    if "save_lora" in r:
        q = r["save_lora"]["ratios"]
        rows += [
            (
                "save throughput / disk raw write (LoRA)",
                q["evertrain_vs_disk_throughput"],
                ">= 0.8",
            ),
            ("save speed-up vs torch.save (LoRA)", q["speedup_vs_torch_save"], ">= 1.5"),
            ("save speed-up vs HF Trainer (LoRA, +fsync)", q["speedup_vs_hf_trainer"], ">= 1.5"),
            (
                "LoRA checkpoint size / (adapter + moments)",
                r["save_lora"]["lora"]["size_ratio"],
                "<= 1.05",
            ),
        ]
    if "load" in r:
        for cache in ("cold", "warm"):
            q = r["load"][cache]["ratios"]
            rows += [
                (
                    f"load throughput / disk raw read ({cache})",
                    q["evertrain_vs_disk_read_throughput"],
                    "",
                ),
                (f"load speed-up vs torch.load ({cache})", q["speedup_vs_torch_load"], ""),
            ]
    if "stall" in r:
        q = r["stall"]["ratios"]
        rows += [
            ("async stall / in-memory copy (clone)", q["async_vs_clone"], "<= 1.5"),
            (
                "async stall / copy into preallocated buffers",
                q["async_vs_copy_into_preallocated"],
                "",
            ),
            ("async stall / sync save", q["async_vs_sync"], "<= 0.1"),
        ]
    if "resume" in r:
        q = r["resume"]
        rows += [
            (
                "resume@1e6 / resume@0 (evertrain)",
                q["evertrain@1000000"]["vs_position_0"],
                "<= 1.2",
            ),
            (
                "resume@1e6 / resume@0 (HF Trainer, iterable)",
                q["hf_trainer@1000000"]["vs_position_0"],
                "",
            ),
            ("HF Trainer / evertrain resume time @1e6", q["hf_over_evertrain@1000000"], ""),
        ]
    if "throughput" in r:
        q = r["throughput"]["ratios_vs_plain"]
        rows += [
            ("throughput, async ckpt every 50 / plain loop", q["evertrain_async"], ">= 0.97"),
            ("throughput, evertrain no ckpt / plain loop", q["evertrain_nockpt"], ""),
        ]
    if "hash" in r:
        q = r["hash"]["ratios"]
        rows += [
            ("xxh3-128 throughput / disk write", q["hash_vs_disk_write_throughput"], ""),
            ("xxh3-128 throughput / disk read (cold)", q["hash_vs_disk_read_throughput"], ""),
        ]
    if "sharded" in r:
        q = r["sharded"]["ratios"]
        rows += [
            ("sharded save (FSDP2, 2 ranks) speed-up vs DCP", q["save_speedup_vs_dcp"], ">= 1.2"),
            ("sharded save throughput / raw write", q["save_throughput_vs_raw_write"], ">= 0.8"),
            ("sharded load 2->3 ranks speed-up vs DCP", q["load_2to3_speedup_vs_dcp"], ""),
        ]
    if "startup" in r:
        q = r["startup"]["ratios"]
        rows += [
            (
                "time to first step, evertrain fresh / HF Trainer",
                q["evertrain_fresh_vs_hf_trainer"],
                "<= 0.8",
            ),
            (
                "time to first step, evertrain restart / HF Trainer",
                q["evertrain_restart_vs_hf_trainer"],
                "<= 0.5",
            ),
            ("time to first step, evertrain fresh / plain loop", q["evertrain_fresh_vs_plain"], ""),
        ]
        if "floor_vs_hf_trainer" in q:  # startup.json files written before the floor method
            rows.append(
                (
                    "time to first step, floor (imports, model, one step; no data) / HF "
                    "Trainer: the least any restart can reach",
                    q["floor_vs_hf_trainer"],
                    "",
                )
            )
    if "compile" in r:
        for job, q in r["compile"]["jobs"].items():
            rows.append(
                (
                    f"tokens/s, torch.compile / eager ({job})",
                    q["compile_vs_eager_tokens_per_s"],
                    ">= 1.1 to be the default",
                )  # fmt: skip
            )
    if "memory" in r:
        q = r["memory"]["ratios"]
        rows += [
            ("peak RSS, gradient checkpointing / none (SmolLM2 LoRA)",
             q["peak_rss_ckpt_vs_plain"], ""),
            ("tokens/s, gradient checkpointing / none (SmolLM2 LoRA)",
             q["tokens_per_s_ckpt_vs_plain"], ""),
        ]  # fmt: skip
    if "packing" in r:
        q, model = r["packing"]["ratios"], r["packing"]["model"]
        rows += [
            (f"target tokens/s, packing masked / HF Trainer padded (short records, {model})",
             q["masked_vs_hf_trainer"], ">= 1.3"),
            (f"target tokens/s, packing masked / plain loop padded to seq_len ({model})",
             q["masked_vs_plain"], ""),
            (f"target tokens/s, packing masked / greedy ({model})", q["masked_vs_greedy"], ""),
        ]  # fmt: skip
        if "none_vs_hf_trainer" in q:  # packing none, each micro-batch cut to its longest row
            rows.append((f"target tokens/s, packing none (trimmed) / HF Trainer padded "
                         f"(short records, {model})", q["none_vs_hf_trainer"], ""))  # fmt: skip
    if "packing_main" in r:
        q, model = r["packing_main"]["ratios"], r["packing_main"]["model"]
        rows += [
            ("target tokens/s, packing masked / HF Trainer truncated+padded "
             f"(main job's data, {model})", q["masked_vs_hf_trainer"], ""),
        ]  # fmt: skip
    if "scaling" in r:
        for row in r["scaling"]["rows"]:
            if row.get("target"):
                rows.append((f"scaling: {row['name']}", row["ratio"], row["target"]))
    if "tokenize" in r:
        # sizes out of the names: a --quick or --load run's files are smaller (the sizes
        # are in its JSON), and its row must still land beside the full run's
        q = r["tokenize"]["ratios"]
        rows += [
            ("tokenize+pack JSONL bytes/s, evertrain / datasets.map num_proc=2 (large file)",
             q["throughput_evertrain_over_datasets_large"], ">= 1"),
            ("tokenize+pack peak RSS, large / small file (evertrain)",
             q["peak_rss_large_over_small_evertrain"], "<= 1.2"),
            ("tokenize+pack peak RSS, large / small file (datasets main process)",
             q["peak_rss_large_over_small_datasets"], ""),
        ]  # fmt: skip
    if "threads" in r:
        for job, q in r["threads"]["jobs"].items():
            rows.append(
                (f"tokens/s at the default threads / best count ({job})", q["default_vs_best"], "")
            )
    if not rows:
        return rows
    width = max(len(n) for n, _, _ in rows)
    print(f"\nTargets (pairwise medians), {results.name}/:")
    for name, value, target in rows:
        print(f"  {name.ljust(width)}  {value:8.3f}  {target}  {verdict(value, target)}")
    return rows


def verdict(value: float, target: str) -> str:
    """``met``/``missed`` for a target written ``<= x`` or ``>= x`` (else empty)."""
    parts = target.split()
    if len(parts) < 2 or parts[0] not in ("<=", ">="):
        return ""
    bound = float(parts[1])
    ok = value <= bound if parts[0] == "<=" else value >= bound
    return "met" if ok else "missed"


BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _loads(results: Path) -> str:
    loads = sorted(
        {tuple(json.loads(p.read_text())["machine"].get("load_avg_at_start", ()))[:1]
         for p in results.glob("*.json")}
    )  # fmt: skip
    return ", ".join(f"{x[0]:.1f}" for x in loads if x) or "-"


def write_readme(quiet: list[tuple[str, float, str]], load: list[tuple[str, float, str]]) -> None:
    """Replace the table between the markers in bench/README.md with the rows of the quiet
    run and of the ``--load`` run (from bench/results*/*.json, never typed by hand) and the
    machine's load when they ran."""
    loaded = {n: v for n, v, _ in load}
    lines = [
        BEGIN,
        "",
        "| measure | quiet | | under `--load` | | target |",
        "|---|---|---|---|---|---|",
        *(
            f"| {n} | {v:.3g} | {verdict(v, t)} | "
            + (f"{loaded[n]:.3g} | {verdict(loaded[n], t)}" if n in loaded else "not run | ")
            + f" | {t} |"
            for n, v, t in quiet
        ),
        "",
        f"1-minute load averages when the benchmarks started: quiet {_loads(RESULT_DIRS['quiet'])};"
        f" under `--load` {_loads(RESULT_DIRS['load'])} (2 vCPUs).",
        "",
        END,
    ]
    readme = HERE / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: add the markers {BEGIN} and {END} first")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + "\n".join(lines) + tail)
    print(f"wrote the results table into {readme}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--write-readme", action="store_true", help="put the table into bench/README.md")
    p.add_argument(
        "--load",
        action="store_true",
        help="run every benchmark with one busy background process (a core kept busy by a "
        "spinning Python loop), started before and stopped after",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated script names without bench_/.py (e.g. checkpoint,throughput): "
        "run only these, the others' results stay as they are",
    )
    a = p.parse_args()
    only = {f"bench_{n.strip()}.py" for n in a.only.split(",") if n.strip()}
    if unknown := sorted(n for n in only if not (HERE / n).is_file()):
        p.error(f"--only: no such benchmark {', '.join(unknown)} (see bench/)")
    busy = None
    if a.load and not a.summary_only:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        print(f"--load: background busy loop pid {busy.pid}", flush=True)
    try:
        if not a.summary_only:
            t0 = time.perf_counter()
            out = RESULT_DIRS["load" if a.load else "quiet"]
            every = functools.partial(run_one, results=out)

            def run(script: str, *args: str) -> None:
                if not only or script in only:
                    every(script, *args)

            run("bench_checkpoint.py", "--repeats", "2" if a.quick else "7")
            run("bench_resume.py", "--repeats", "1" if a.quick else "3")
            run(
                "bench_throughput.py",
                "--repeats",
                "1" if a.quick else "9",
                *(["--steps", "100"] if a.quick else []),
            )
            run("bench_sharded.py", "--repeats", "1" if a.quick else "3")
            run("bench_threads.py", "--repeats", "1" if a.quick else "3", *(["--quick"] * a.quick))
            run("bench_startup.py", "--repeats", "1" if a.quick else "3")
            run("bench_compile.py", "--repeats", "1" if a.quick else "2", *(["--quick"] * a.quick))
            run(
                "bench_packing.py",
                *(["--repeats", "1", "--records", "120", "--plain-steps", "6"] if a.quick
                  else ["--repeats", "3"]),
            )  # fmt: skip
            run(
                "bench_packing.py", "--data", "main",
                *(["--quick", "--records", "8", "--plain-steps", "4"] if a.quick
                  else ["--repeats", "2", "--records", "60"]),
            )  # fmt: skip
            run("bench_scaling.py", "--repeats", "1" if a.quick else "3")
            run(
                "bench_tokenize.py",
                *(["--small-mb", "20", "--large-mb", "200"] if a.quick else ["--repeats", "2"]),
            )
            if not a.quick:
                run("bench_memory.py", "--repeats", "2")
            print(f"\nall benchmarks: {time.perf_counter() - t0:.0f} s")
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    rows = summary(RESULT_DIRS["quiet"])
    load_rows = summary(RESULT_DIRS["load"])
    if a.write_readme:
        write_readme(rows, load_rows)


if __name__ == "__main__":
    main()
