"""Helpers of the watch-daemon tests (tests/test_daemon_*.py): data files of exact sizes, a
small tiny-model watch config, dropping files into an inbox, reading the ledger."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from evertrain.config import RunConfig, load_config
from evertrain.daemon import FileRow, Ledger, prepare_watch_config
from evertrain.data import Document, is_validation

SEED = 7
VAL_FRACTION = 0.2


def text_doc(text: str) -> Document:
    return Document(file="", line=0, unit="line", kind="text", text=text)


def equal_files(
    out: Path, n_files: int, train_rows: int, val_rows: int, seed: int = SEED
) -> list[Path]:
    """``n_files`` JSONL text files, each with exactly ``train_rows`` documents on the
    training side of the split and ``val_rows`` held out (for ``seed`` and
    ``VAL_FRACTION``; one row per document with ``packing: false``)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for k in range(n_files):
        train: list[str] = []
        val: list[str] = []
        i = 0
        while len(train) < train_rows or len(val) < val_rows:
            text = f"file {k} doc {i}: " + " ".join(
                words[(i + j * k) % len(words)] for j in range(6)
            )
            side = val if is_validation(text_doc(text).content_key(), seed, VAL_FRACTION) else train
            want = val_rows if side is val else train_rows
            if len(side) < want:
                side.append(text)
            i += 1
        lines = [json.dumps({"text": t}) for t in train + val]
        p = out / f"part-{k}.jsonl"
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(p)
    return paths


def watch_config(tmp: Path, name: str = "watch.yaml", **sections: Any) -> Path:
    """A tiny-model LoRA watch config (small model, one row per document), with sections
    merged key by key, written to ``tmp/name``."""
    cfg: dict[str, Any] = {
        "seed": SEED,
        "model": {
            "source": "tiny",
            "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        },
        "lora": {"r": 4, "alpha": 8.0, "dropout": 0.1},
        "data": {"seq_len": 48, "packing": False, "val_fraction": VAL_FRACTION},
        "train": {
            "micro_batch_size": 4,
            "grad_accum_steps": 2,
            "lr": 1.0e-2,
            "schedule": {"name": "inverse_sqrt", "warmup_steps": 2},
        },
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "watch": {
            "settle_seconds": 0.0,
            "poll_seconds": 0.1,
            "status_every_seconds": 0.2,
            "eval_earlier_files": 2,
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def load_watch(path: Path) -> RunConfig:
    return prepare_watch_config(load_config(path), str(path))


def drop(src: Path, inbox: Path, name: str | None = None, mtime: float | None = None) -> Path:
    """Put ``src`` into ``inbox`` the documented way: write ``.NAME.part``, then rename."""
    inbox.mkdir(parents=True, exist_ok=True)
    name = name or src.name
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(src.read_bytes())
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    final = inbox / name
    os.rename(tmp, final)
    return final


def rows(run: Path) -> list[FileRow]:
    """The ledger's rows ([] before the daemon created it)."""
    if not (run / "ledger.sqlite").exists():
        return []
    led = Ledger(run / "ledger.sqlite", readonly=True)
    try:
        return led.rows()
    finally:
        led.close()


def wait_for(cond: Callable[[], bool], timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
