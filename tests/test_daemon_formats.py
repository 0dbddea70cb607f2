"""The watch daemon trains Parquet, CSV and Alpaca JSONL files dropped into its inbox: each
is done, with as many examples as its records on the training side of the split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from daemon_util import SEED, VAL_FRACTION, drop, load_watch, rows, watch_config
from evertrain.daemon import Daemon
from evertrain.data import Document, is_validation
from evertrain.data.dialects import alpaca_prompt

N = 14  # records per file


def train_count(docs: list[Document]) -> int:
    """Records on the training side of the split: one row each with ``packing: false``."""
    return sum(not is_validation(d.content_key(), SEED, VAL_FRACTION) for d in docs)


def pc(prompt: str, completion: str) -> Document:
    return Document("", 0, "line", "prompt_completion", prompt=prompt, completion=completion)


def test_parquet_csv_and_alpaca_files_are_trained(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "src"
    src.mkdir()
    texts = [f"parquet row {i}: the quick brown fox" for i in range(N)]
    pq.write_table(pa.table({"text": texts, "id": list(range(N))}), src / "a.parquet")
    pairs = [(f"csv q{i}, ", f"answer {i * 7}") for i in range(N)]
    with (src / "b.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerows(pairs)
    alpaca = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(N)]
    (src / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca), "utf-8")
    expected = {
        "a.parquet": train_count([Document("", 0, "row", "text", text=t) for t in texts]),
        "b.csv": train_count([pc(p, c) for p, c in pairs]),
        "c.jsonl": train_count([pc(alpaca_prompt(r["instruction"]), r["output"]) for r in alpaca]),
    }
    assert all(n >= 8 for n in expected.values()), expected  # a few steps each

    # long enough for an Alpaca prompt (bytes: ByT5) so no row is cut before its target
    cfg = load_watch(watch_config(tmp_path, data={"seq_len": 160}))
    run = tmp_path / "run"
    for name in ("a.parquet", "b.csv", "c.jsonl"):
        drop(src / name, run / "inbox")
    assert Daemon(run, cfg, once=True).run() == 0

    ledger = rows(run)
    assert sorted(r.name for r in ledger) == sorted(expected)
    for r in ledger:
        assert r.status == "done", (r.name, r.status, r.error)
        assert r.examples == expected[r.name], r.name
        assert r.steps and r.steps > 0
