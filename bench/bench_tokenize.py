"""Benchmark: tokenising and packing a large JSONL file (issue 14, item 6: flat costs).

Data: a JSONL file of ``{"text": ...}`` records generated from the bundled text (CPython's
pydoc topics, cut into records of at most 4000 characters as ``evertrain data pydoc`` does,
each prefixed with its index so no two records are equal), repeated until the file reaches
the size asked for: by default 100 MB (small) and 1 GB (large).

Methods, each in a fresh process (so its peak RSS is its own), timed from the call that
starts the work to its end (imports and loading the tokenizer are not counted; the data
file is in the page cache for both):

- ``evertrain``: :func:`evertrain.data.build_datasets` with the data cache on (a fresh
  directory): read the file as a stream, validate each record, split train/val, tokenise,
  pack into rows of ``seq_len`` (``packing: greedy``, the default) and write the rows to the
  cache's files, which the returned data set memory-maps.
- ``datasets``: Hugging Face ``datasets``, the way its language-modelling example does it
  (transformers/examples/pytorch/language-modeling/run_clm.py): ``load_dataset("json")``,
  ``map(tokenize, batched=True, num_proc=2)`` (eos appended per record), then
  ``map(group_texts, batched=True, num_proc=2)`` into blocks of ``seq_len`` (which drops the
  remainder and makes no labels of its own: less work than evertrain's). Its Arrow cache
  goes to a fresh directory. ``TOKENIZERS_PARALLELISM=false`` for it (its faster setting
  with two workers on two cores); evertrain runs with the library's default.

Same fast tokenizer (SmolLM2's, from the converted bundled model) on both sides. Rows:

- throughput, evertrain / datasets (bytes of JSONL per second, large file): target >= 1;
- peak RSS of the evertrain process, large / small: target <= 1.2 (flat memory);
- the same for the datasets process (diagnostic: its main process; the map workers are
  separate processes).

Usage: ``python bench/bench_tokenize.py [--small-mb 100 --large-mb 1000] [--repeats 1]``.
Scratch in ``$EVERTRAIN_BENCH_DIR/tokenize`` (about 3x the large file's size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import check_free_disk, median, rotated, workdir, write_json  # noqa: E402

SEQ_LEN = 1024
METHODS = ["evertrain", "datasets"]


def make_data(path: Path, megabytes: float) -> int:
    """Write ``path`` (about ``megabytes`` MB of JSONL); returns its size in bytes."""
    from evertrain.data.pydoc import pydoc_records

    texts = [p for _topic, pieces in pydoc_records() for p in pieces]
    target = int(megabytes * 1e6)
    size, i = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            line = json.dumps({"text": f"[{i}] {texts[i % len(texts)]}"}) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            i += 1
    return path.stat().st_size


def model_dir() -> Path:
    """The converted SmolLM2 directory (converting the bundled GGUF once if needed)."""
    from evertrain.config import ModelConfig
    from evertrain.models import load_model
    from evertrain.models.cache import cache_root
    from evertrain.models.sources import SMOLLM2

    load_model(ModelConfig(source=SMOLLM2), None)
    return cache_root(None) / f"{SMOLLM2}-float32"


def child_evertrain(data: Path, work: Path, tok_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from evertrain.config import DataConfig
    from evertrain.data import build_datasets

    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    cfg = DataConfig(files=[str(data)], seq_len=SEQ_LEN, cache_dir=str(work / "cache"))
    t0 = time.perf_counter()
    train, val, report = build_datasets(cfg, tok, seed=0)
    seconds = time.perf_counter() - t0
    assert report.cache == "miss"
    return {"seconds": seconds, "rows": len(train) + len(val),
            "tokens": report.train.tokens + report.val.tokens}  # fmt: skip


def child_datasets(data: Path, work: Path, tok_dir: Path) -> dict[str, Any]:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    eos = tok.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    def group_texts(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        flat = [t for x in batch["input_ids"] for t in x]
        n = len(flat) // SEQ_LEN * SEQ_LEN
        return {"input_ids": [flat[i : i + SEQ_LEN] for i in range(0, n, SEQ_LEN)]}

    t0 = time.perf_counter()
    ds = load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf"))
    ds = ds.map(tokenize, batched=True, num_proc=2, remove_columns=["text"])
    ds = ds.map(group_texts, batched=True, num_proc=2)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": len(ds), "tokens": len(ds) * SEQ_LEN}


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``): unlike ``ru_maxrss``, which a child inherits
    from its parent across fork and exec, it starts afresh with the new program."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(method: str, data: Path, work: Path, tok_dir: Path) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # evertrain as a user runs it: the tokenizers library's default threading (common.py
    # turns it off for the training benchmarks), which spreads a batch over both cores;
    # datasets' two map workers with it off, their faster setting here (two workers with
    # two tokenizer threads each fight over two cores: 1.19x the time on 30 MB)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["TOKENIZERS_PARALLELISM"] = "default" if method == "evertrain" else "false"
    cmd = [sys.executable, __file__, "--child", method, str(data), str(work), str(tok_dir)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    shutil.rmtree(work, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--small-mb", type=float, default=100)
    p.add_argument("--large-mb", type=float, default=1000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        if os.environ.get("TOKENIZERS_PARALLELISM") == "default":
            os.environ.pop("TOKENIZERS_PARALLELISM")  # (common.py's setdefault saw it set)
        method, data, work, tok_dir = a.child
        fn = child_evertrain if method == "evertrain" else child_datasets
        res = fn(Path(data), Path(work), Path(tok_dir))
        res["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(res))
        return

    work = workdir("tokenize")
    check_free_disk(work, 3.5 * a.large_mb * 1e6)
    tok_dir = model_dir()
    files = {}
    for case, mb in (("small", a.small_mb), ("large", a.large_mb)):
        files[case] = work / f"{case}.jsonl"
        size = make_data(files[case], mb)
        print(f"{case}: {size / 1e6:.0f} MB of JSONL")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        c: {m: [] for m in METHODS} for c in files
    }
    for i in range(a.repeats):
        for case in ("small", "large"):
            for m in rotated(METHODS, i):
                r = run_child(m, files[case], work / f"out-{m}", tok_dir)
                r["bytes"] = files[case].stat().st_size
                results[case][m].append(r)
                rate = r["bytes"] / r["seconds"] / 1e6
                print(f"  {case} {m}: {r['seconds']:.1f} s, {rate:.2f} MB/s, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB, {r['tokens']:,} tokens")  # fmt: skip

    def med(case: str, m: str, key: str) -> float:
        return median([r[key] for r in results[case][m]])

    ratios = {
        "throughput_evertrain_over_datasets_large": median(
            [d["seconds"] / e["seconds"] for e, d in zip(
                results["large"]["evertrain"], results["large"]["datasets"], strict=True)]
        ),  # fmt: skip
        "throughput_evertrain_over_datasets_small": median(
            [d["seconds"] / e["seconds"] for e, d in zip(
                results["small"]["evertrain"], results["small"]["datasets"], strict=True)]
        ),  # fmt: skip
        "peak_rss_large_over_small_evertrain": med("large", "evertrain", "peak_rss_mb")
        / med("small", "evertrain", "peak_rss_mb"),
        "peak_rss_large_over_small_datasets": med("large", "datasets", "peak_rss_mb")
        / med("small", "datasets", "peak_rss_mb"),
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    sizes = {c: files[c].stat().st_size for c in files}
    for f in files.values():
        f.unlink()
    write_json("tokenize", {"seq_len": SEQ_LEN, "file_bytes": sizes, "results": results,
                            "ratios": ratios, "repeats": a.repeats})  # fmt: skip


if __name__ == "__main__":
    main()
