"""``RUN/metrics.jsonl``: one JSON object per optimizer step (and per eval).

Process-safety: one writer per run directory (the trainer). Readers (status, dashboard)
may read concurrently; every line is written whole and flushed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only metrics file that can be rewound to a checkpoint's byte offset.

    Lines: ``{"kind": "train", "global_step": int, "loss": float, "lr": float,
    "grad_norm": float, "tokens": int, "examples": int, "seconds": float, ...}`` and
    ``{"kind": "eval", "global_step": int, "val_loss": float, "val_ppl": float}``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "ab")  # noqa: SIM115 - lives as long as the trainer

    def rewind(self, offset: int) -> None:
        """Drop everything after ``offset`` bytes: steps after the resumed checkpoint will
        be replayed, and logging them twice would make the log disagree with the model."""
        size = self.path.stat().st_size
        if offset > size:
            raise ValueError(
                f"{self.path}: checkpoint expects {offset} bytes of metrics, file "
                f"has {size} (was it truncated or replaced?)"
            )
        self._f.truncate(offset)
        self._f.seek(offset)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write((json.dumps(record) + "\n").encode())
        self._f.flush()

    def offset(self) -> int:
        """Bytes written so far."""
        return self._f.tell()

    def sync(self) -> None:
        """fsync, so a checkpoint never points past data the OS could lose."""
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of ``path`` (optionally of one ``kind``), in order; [] if absent."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if kind is None or rec.get("kind") == kind:
                    out.append(rec)
    return out
