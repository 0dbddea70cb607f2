"""Incremental reader of ``RUN/metrics.jsonl`` for the dashboard (format: docs/run-directory.md).

A run that trains for weeks writes millions of lines (10^6 train lines are ~200 MB); parsing
them all before the first answer took 7 s, and re-reading on every poll would cost that
each time. :class:`MetricsTail` keeps what it has parsed, in columns (about 60 bytes per
optimizer step), and on each :meth:`refresh` reads only the bytes appended since.

Cold start of a large file (over ``sketch_above_bytes``): the last ``_SKETCH_TAIL_BYTES``
are parsed exactly and everything before is *sketched*: one train record read at each of
``_SKETCH_SAMPLES`` evenly spaced byte offsets, which is what a thinned chart of the whole
history shows anyway. A background thread then parses the history exactly (yielding the
interpreter between chunks so requests are not starved) and swaps it in;
:attr:`generation` is incremented so clients reload, and ``complete`` in :meth:`query`
says which of the two a client has. The first answer costs the same at 10^6 lines as at
10^3 (``bench/bench_scaling.py``).

The trainer rewinds the file to a checkpoint's offset on resume and then appends replayed
steps; a rewind is detected (file shorter, another inode, or the bytes just before the
last read offset changed) and answered by reading the file again, with :attr:`generation`
incremented so clients know to drop what they have.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Debiased exponential moving average (TensorBoard's scalar smoothing; the bias correction is
# that of Adam, Kingma & Ba 2015, sec. 3): ema_n = s*ema_{n-1} + (1-s)*x_n, shown as
# ema_n / (1 - s^n) so the first points are not pulled towards 0. Sketched records stand for
# the Δ steps since the previous one and decay by s^Δ.
SMOOTHING = 0.95
CHART_POINTS = 1000  # train points of a chart's first load: about one per pixel of its width
SKETCH_ABOVE_BYTES = 16 << 20  # smaller files are parsed whole at once (< ~0.5 s)
_SKETCH_TAIL_BYTES = 128 << 10  # parsed exactly at a cold start of a large file
_SKETCH_SAMPLES = 1000  # history records read at a cold start of a large file
_SKETCH_WINDOW = 2048  # bytes read at each sample offset (a record is ~200)
_BACKGROUND_DELAY = 1.0  # seconds before the exact history parse starts (first paint first)
_BACKGROUND_YIELD = 0.002  # seconds slept between chunks of the history parse
_TAIL_CHECK_BYTES = 64  # bytes before the read offset compared on each refresh (rewind check)
_MAX_PROBLEMS = 20
_READ_CHUNK = 4 << 20  # bytes
_HISTORY_CHUNK = 1 << 20  # bytes


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

    def extend(self, other: _Columns, start: int = 0) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name)[start:])


@dataclass
class _Records:
    """Records parsed in file order: train records as columns, eval/file_end as dicts."""

    name: str
    first_line: int | None = 1  # number of the region's first line; None: not known (sketch)
    cols: _Columns = field(default_factory=_Columns)
    evals: list[dict[str, Any]] = field(default_factory=list)
    file_ends: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lines: int = 0
    ema: float = 0.0
    weight: float = 0.0  # 1 - s^n after n consecutive steps: the EMA's debiasing divisor

    def smooth(self, loss: float | None, steps: int = 1) -> float:
        if loss is not None:
            decay = SMOOTHING**steps
            self.ema = decay * self.ema + (1 - decay) * loss
            self.weight = decay * self.weight + (1 - decay)
        return self.ema / self.weight if self.weight else math.nan

    def add_train(self, step: int, rec: dict[str, Any], steps: int = 1) -> None:
        """Append one train record standing for ``steps`` optimizer steps (1 unless sketched)."""
        c = self.cols
        loss = finite(rec.get("loss"))
        tokens, seconds = finite(rec.get("tokens")), finite(rec.get("seconds"))
        tps = tokens / seconds if tokens is not None and seconds else None
        fid = rec.get("file_id")
        c.step.append(step)
        c.loss.append(_nan_if_none(loss))
        c.smoothed.append(self.smooth(loss, steps))
        c.lr.append(_nan_if_none(finite(rec.get("lr"))))
        c.tps.append(_nan_if_none(tps))
        c.grad_norm.append(_nan_if_none(finite(rec.get("grad_norm"))))
        c.file_id.append(fid if isinstance(fid, int) and not isinstance(fid, bool) else -1)

    def parse_lines(self, data: bytes, base: int) -> None:
        """Parse complete lines (``data`` ends with a newline) read from byte ``base``."""
        pos = 0
        for line in data.split(b"\n")[:-1]:
            self.lines += 1
            if self.first_line is None:
                where = f"line at byte {base + pos}"
            else:
                where = f"line {self.first_line + self.lines - 1}"
            pos += len(line) + 1
            self._parse(line, where)

    def _problem(self, where: str, msg: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(f"{self.name} {where}: {msg}")

    def _parse(self, line: bytes, where: str) -> None:
        if not line.strip():
            return
        try:
            rec = json.loads(line)
        except ValueError as e:
            self._problem(where, f"not valid JSON ({e}); line skipped")
            return
        if not isinstance(rec, dict):
            self._problem(where, "not a JSON object; line skipped")
            return
        step = rec.get("global_step")
        if isinstance(step, bool) or not isinstance(step, int):
            self._problem(where, "no integer global_step; line skipped")
            return
        kind = rec.get("kind")
        if kind == "train":
            self.add_train(step, rec)
        elif kind == "eval":
            self.evals.append(rec)
        elif kind == "file_end":
            self.file_ends.append(rec)
        # other kinds: written by a newer evertrain; ignored rather than refused


class MetricsTail:
    """The parsed contents of one ``metrics.jsonl``, refreshed incrementally; thread-safe.

    Train records are kept as columns; ``eval`` and ``file_end`` records (a few per data
    file) as dicts. Lines that are not JSON objects are skipped and reported in the
    ``problems`` of :meth:`query` (``"metrics.jsonl line N: ..."``), never raised: one bad
    line must not take the dashboard down. A last line without its newline is left for the
    next refresh (the writer may be in the middle of it).

    Args:
        path: the ``metrics.jsonl`` file (it may not exist yet).
        sketch_above_bytes: a first read of a larger file sketches the history and parses
            it exactly in a background thread (see the module docstring).
    """

    def __init__(self, path: Path, sketch_above_bytes: int = SKETCH_ABOVE_BYTES) -> None:
        self.path = Path(path)
        self._sketch_above = sketch_above_bytes
        self._lock = threading.Lock()
        self.generation = 0
        self._reset()

    def _reset(self) -> None:
        self._rec = _Records(self.path.name)
        self._sketched = 0  # leading train entries that are a sample of the history
        self._offset = 0
        self._ino: int | None = None
        self._tail = b""
        self._token = object()  # a history parse started for another token is dropped
        self.complete = True
        self._completed = threading.Event()
        self._completed.set()

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
                big = max(self._sketch_above, 2 * _SKETCH_TAIL_BYTES)
                if self._ino is None and st.st_size > big:
                    self._sketch(f, st.st_size, st.st_ino)
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
                        self._rec.parse_lines(data[:end], self._offset)
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

    def _sketch(self, f: Any, size: int, ino: int) -> None:
        # the exact part starts at the first line that begins in the last _SKETCH_TAIL_BYTES
        f.seek(size - _SKETCH_TAIL_BYTES - 1)
        f.readline()
        start = f.tell()
        rec, last = self._rec, 0
        rec.first_line = None  # the exact part's line numbers are known after the history
        for i in range(_SKETCH_SAMPLES):
            at = start * i // _SKETCH_SAMPLES
            f.seek(at)
            window = f.read(min(_SKETCH_WINDOW, start - at))
            lines = window.split(b"\n")[:-1]  # complete lines only
            for line in lines[1:] if at else lines:  # the first may be a line's end
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a bad line is reported once the history is read exactly
                if not isinstance(r, dict) or r.get("kind") != "train":
                    continue
                step = r.get("global_step")
                if isinstance(step, int) and not isinstance(step, bool) and step > last:
                    rec.add_train(step, r, step - last if last else 1)
                    last = step
                    break
        self._sketched = len(rec.cols.step)
        self._offset = start
        f.seek(start - _TAIL_CHECK_BYTES)
        self._tail = f.read(_TAIL_CHECK_BYTES)
        self.complete = False
        self._completed = threading.Event()
        threading.Thread(
            target=self._read_history,
            args=(self._token, ino, start),
            name="evertrain-metrics-history",
            daemon=True,
        ).start()

    def _read_history(self, token: object, ino: int, end: int) -> None:
        time.sleep(_BACKGROUND_DELAY)
        history = _Records(self.path.name)
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_ino != ino:
                    return
                at, carry = 0, b""
                while at < end:
                    chunk = f.read(min(_HISTORY_CHUNK, end - at))
                    if not chunk:
                        return  # shrunk: the next refresh sees the rewind
                    data = carry + chunk
                    cut = data.rfind(b"\n") + 1
                    carry = data[cut:]
                    history.parse_lines(data[:cut], at + len(chunk) - len(data))
                    at += len(chunk)
                    if self._token is not token:
                        return
                    time.sleep(_BACKGROUND_YIELD)  # lets request threads take the GIL
        except OSError:
            return  # the sketch stays; the next rewind or restart reads again
        with self._lock:
            if self._token is token:
                self._take_history(history)

    def _take_history(self, history: _Records) -> None:
        now = self._rec
        c, n = now.cols, self._sketched
        for i in range(n, len(c.step)):  # the exact part, smoothed on from the exact history
            loss = c.loss[i]
            history.cols.step.append(c.step[i])
            history.cols.loss.append(loss)
            history.cols.smoothed.append(history.smooth(None if math.isnan(loss) else loss))
            history.cols.lr.append(c.lr[i])
            history.cols.tps.append(c.tps[i])
            history.cols.grad_norm.append(c.grad_norm[i])
            history.cols.file_id.append(c.file_id[i])
        history.evals += now.evals
        history.file_ends += now.file_ends
        history.problems = (history.problems + now.problems)[:_MAX_PROBLEMS]
        history.lines += now.lines
        self._rec, self._sketched, self.complete = history, 0, True
        self.generation += 1
        self._completed.set()

    def wait_complete(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the exact history; True once :meth:`query` has it.

        Only a sketched first read (a file over ``sketch_above_bytes``) has anything to wait
        for; a rewind while waiting starts a new read, which this does not wait for.
        """
        return self._completed.wait(timeout)

    def last_train(self) -> dict[str, Any] | None:
        """The newest train record's columns as a dict, or None if there is none."""
        with self._lock:
            c = self._rec.cols
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
                first load of a long run stays small; eval and file_end records are thinned
                the same way to at most ``max_points // 4`` each (a long watch run has one
                of each per data file). Smoothed loss is computed over every step before
                thinning.

        Returns:
            ``{"generation", "complete", "since_step", "last_step", "stride", "count",
            "train": {"global_step", "loss", "loss_smoothed", "lr", "tokens_per_second",
            "grad_norm", "file_id"}, "eval": [...], "file_end": [...], "problems"}``;
            losses in nats, lr unitless, tokens_per_second in tokens/s; non-finite values
            are null. ``complete`` is false while the history of a large file is a sketch
            (train points sampled, no eval/file_end records before the exact part); the
            generation changes when the exact history replaces it.
        """
        with self._lock:
            rec = self._rec
            c = rec.cols
            start = bisect.bisect_right(c.step, since_step)  # steps ascend within a generation
            n = len(c.step) - start
            stride = 1
            idx: range | list[int] = range(start, len(c.step))
            if max_points > 0 and n > max_points:
                stride = -(-n // max_points)
                idx = _thin(range(start, len(c.step)), stride)

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
                "complete": self.complete,
                "since_step": since_step,
                "last_step": c.step[-1] if c.step else None,
                "stride": stride,
                "count": n,
                "train": train,
                "eval": _since(rec.evals, since_step, max_points),
                "file_end": _since(rec.file_ends, since_step, max_points),
                "problems": list(rec.problems),
            }


def _thin(idx: range, stride: int) -> list[int]:
    out = list(idx[::stride])
    if out and out[-1] != idx[-1]:
        out.append(idx[-1])  # the newest point is always shown
    return out


def _since(records: list[dict[str, Any]], since_step: int, max_points: int) -> list[Any]:
    i = len(records)
    while i and records[i - 1]["global_step"] > since_step:  # newest at the end
        i -= 1
    keep = range(i, len(records))
    cap = max(1, max_points // 4)
    if max_points > 0 and len(keep) > cap:
        keep = _thin(keep, -(-len(keep) // cap))  # type: ignore[assignment]
    return [_clean(records[j]) for j in keep]


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else x


def _clean(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: (finite(v) if isinstance(v, float) else v) for k, v in rec.items()}
