"""Incremental reader of ``RUN/metrics.jsonl`` for the dashboard (format: docs/run-directory.md).

A run that trains for weeks writes millions of lines; re-reading the whole file on every
poll would cost seconds of CPU each time. :class:`MetricsTail` keeps what it has parsed, in
columns (about 60 bytes per optimizer step), and on each :meth:`refresh` reads only the bytes
appended since. The trainer rewinds the file to a checkpoint's offset on resume and then
appends replayed steps; a rewind is detected (file shorter, another inode, or the bytes just
before the last read offset changed) and answered by parsing the file again from the start,
with :attr:`generation` incremented so clients know to drop what they have.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import threading
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Debiased exponential moving average (TensorBoard's scalar smoothing; the bias correction is
# that of Adam, Kingma & Ba 2015, sec. 3): ema_n = s*ema_{n-1} + (1-s)*x_n, shown as
# ema_n / (1 - s^n) so the first points are not pulled towards 0.
SMOOTHING = 0.95
_TAIL_CHECK_BYTES = 64  # bytes before the read offset compared on each refresh (rewind check)
_MAX_PROBLEMS = 20
_READ_CHUNK = 4 << 20  # bytes


def finite(x: Any) -> float | None:
    """``x`` as a float, or None if it is missing, not a number, NaN or infinite.

    JSON has no NaN/Infinity (browsers reject them), and a diverged step must not break the
    whole response, so non-finite values travel as null.
    """
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


@dataclass
class _Columns:
    step: array = field(default_factory=lambda: array("q"))
    loss: array = field(default_factory=lambda: array("d"))
    smoothed: array = field(default_factory=lambda: array("d"))
    lr: array = field(default_factory=lambda: array("d"))
    tps: array = field(default_factory=lambda: array("d"))
    grad_norm: array = field(default_factory=lambda: array("d"))
    file_id: array = field(default_factory=lambda: array("q"))  # -1: none


class MetricsTail:
    """The parsed contents of one ``metrics.jsonl``, refreshed incrementally; thread-safe.

    Train records are kept as columns; ``eval`` and ``file_end`` records (a few per data
    file) as dicts. Lines that are not JSON objects are skipped and reported in
    :attr:`problems` (``"metrics.jsonl line N: ..."``), never raised: one bad line must not
    take the dashboard down. A last line without its newline is left for the next refresh
    (the writer may be in the middle of it).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.generation = 0
        self._reset()

    def _reset(self) -> None:
        self._cols = _Columns()
        self.evals: list[dict[str, Any]] = []
        self.file_ends: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self._offset = 0
        self._line_no = 0
        self._ino: int | None = None
        self._tail = b""
        self._ema = 0.0
        self._ema_n = 0

    def refresh(self) -> None:
        """Read what was appended since the last call (or everything after a rewind)."""
        with self._lock:
            try:
                f = open(self.path, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                if self._offset:
                    self.generation += 1
                self._reset()
                return
            with f:
                st = os.fstat(f.fileno())
                if self._rewound(f, st):
                    self.generation += 1
                    self._reset()
                self._ino = st.st_ino
                f.seek(self._offset)
                # bounded chunks: a weeks-long log is hundreds of MB, and reading it whole
                # (plus one bytes object per line) would cost a multiple of that in memory
                carry = b""
                while chunk := f.read(_READ_CHUNK):
                    data = carry + chunk
                    end = data.rfind(b"\n") + 1
                    carry = data[end:]
                    if end:
                        for line in data[:end].split(b"\n")[:-1]:
                            self._line_no += 1
                            self._parse(line)
                        self._offset += end
                        self._tail = (self._tail + data[:end])[-_TAIL_CHECK_BYTES:]
                # a line without its newline is left for the next refresh (being written)

    def _rewound(self, f: Any, st: os.stat_result) -> bool:
        if self._ino is None:
            return False
        if st.st_ino != self._ino or st.st_size < self._offset:
            return True
        if self._tail:
            f.seek(self._offset - len(self._tail))
            return bool(f.read(len(self._tail)) != self._tail)
        return False

    def _problem(self, msg: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(f"{self.path.name} line {self._line_no}: {msg}")

    def _parse(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            rec = json.loads(line)
        except ValueError as e:
            self._problem(f"not valid JSON ({e}); line skipped")
            return
        if not isinstance(rec, dict):
            self._problem("not a JSON object; line skipped")
            return
        step = rec.get("global_step")
        if isinstance(step, bool) or not isinstance(step, int):
            self._problem("no integer global_step; line skipped")
            return
        kind = rec.get("kind")
        if kind == "train":
            self._add_train(step, rec)
        elif kind == "eval":
            self.evals.append(rec)
        elif kind == "file_end":
            self.file_ends.append(rec)
        # other kinds: written by a newer evertrain; ignored rather than refused

    def _add_train(self, step: int, rec: dict[str, Any]) -> None:
        c = self._cols
        loss = finite(rec.get("loss"))
        if loss is not None:
            self._ema = SMOOTHING * self._ema + (1 - SMOOTHING) * loss
            self._ema_n += 1
        smoothed = self._ema / (1 - SMOOTHING**self._ema_n) if self._ema_n else math.nan
        tokens, seconds = finite(rec.get("tokens")), finite(rec.get("seconds"))
        tps = tokens / seconds if tokens is not None and seconds else None
        fid = rec.get("file_id")
        c.step.append(step)
        c.loss.append(math.nan if loss is None else loss)
        c.smoothed.append(smoothed)
        c.lr.append(_nan_if_none(finite(rec.get("lr"))))
        c.tps.append(math.nan if tps is None else tps)
        c.grad_norm.append(_nan_if_none(finite(rec.get("grad_norm"))))
        c.file_id.append(fid if isinstance(fid, int) and not isinstance(fid, bool) else -1)

    def last_train(self) -> dict[str, Any] | None:
        """The newest train record's columns as a dict, or None if there is none."""
        with self._lock:
            c = self._cols
            if not c.step:
                return None
            return {
                "global_step": c.step[-1],
                "loss": finite(c.loss[-1]),
                "loss_smoothed": finite(c.smoothed[-1]),
                "lr": finite(c.lr[-1]),
                "tokens_per_second": finite(c.tps[-1]),
                "grad_norm": finite(c.grad_norm[-1]),
            }

    def query(self, since_step: int = -1, max_points: int = 0) -> dict[str, Any]:
        """Records with ``global_step > since_step``, train records as columns.

        Args:
            since_step: optimizer steps already held by the caller; ``-1`` for everything.
            max_points: if > 0 and more train records match, keep every k-th one (k the
                smallest stride that fits, reported as ``stride``) plus the newest, so a
                first load of a long run stays small. Smoothed loss is computed over every
                step before thinning.

        Returns:
            ``{"generation", "since_step", "last_step", "stride", "count", "train":
            {"global_step", "loss", "loss_smoothed", "lr", "tokens_per_second",
            "grad_norm", "file_id"}, "eval": [...], "file_end": [...], "problems"}``;
            losses in nats, lr unitless, tokens_per_second in tokens/s; non-finite values
            are null.
        """
        with self._lock:
            c = self._cols
            start = bisect.bisect_right(c.step, since_step)  # steps ascend within a generation
            n = len(c.step) - start
            stride = 1
            idx: range | list[int] = range(start, len(c.step))
            if max_points > 0 and n > max_points:
                stride = -(-n // max_points)
                idx = list(range(start, len(c.step), stride))
                if idx[-1] != len(c.step) - 1:
                    idx.append(len(c.step) - 1)

            def col(a: array) -> list[float | None]:
                return [finite(a[i]) for i in idx]

            train = {
                "global_step": [c.step[i] for i in idx],
                "loss": col(c.loss),
                "loss_smoothed": col(c.smoothed),
                "lr": col(c.lr),
                "tokens_per_second": col(c.tps),
                "grad_norm": col(c.grad_norm),
                "file_id": [c.file_id[i] if c.file_id[i] >= 0 else None for i in idx],
            }
            return {
                "generation": self.generation,
                "since_step": since_step,
                "last_step": c.step[-1] if c.step else None,
                "stride": stride,
                "count": n,
                "train": train,
                "eval": [_clean(r) for r in self.evals if r["global_step"] > since_step],
                "file_end": [_clean(r) for r in self.file_ends if r["global_step"] > since_step],
                "problems": list(self.problems),
            }


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else x


def _clean(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: (finite(v) if isinstance(v, float) else v) for k, v in rec.items()}
