"""Benchmark: costs that should stay flat as the work grows (issue 14, item 6).

Each row is the ratio of a per-call time in a *large* case to the same call in a *small*
case, both measured in the same process, case order rotated between repeats (so load from
other processes on a shared machine cancels), medians over repeats.

1. Daemon bookkeeping with a big ledger (``evertrain watch``). Three run directories whose
   ``ledger.sqlite`` is built through :class:`evertrain.daemon.ledger.Ledger` as the daemon
   builds it: each file is recorded the way intake does it (``insert`` of a ``queued`` row
   with id ``max_id() + 1``, size and content hash) and a finished one is then settled the
   way ``_settle`` does it (one ``update`` to ``done`` with its ``processed/`` path, finish
   time and training stats). Built once per run, untimed.

   - small: 10 done files + 1 queued (so there is a next file to pick);
   - history (diagnostic only): 10^4 done + 1 queued: the history grows, the queue not;
   - large: 10^4 done + 10^3 queued.

   Timed, per call, on the daemon's own read-write connection:

   - ``Ledger.next_pending()``: how ``Daemon._loop`` (daemon/loop.py) picks the next file;
   - ``Ledger.find_done(hash, id)``: the duplicate check ``_start_file`` makes before
     training a picked file (diagnostic, no target);
   - ``status_record(...)`` (daemon/status.py): the status document ``Daemon.status_dict``
     builds for every status.json write (it lists the queue, the last snapshot and the
     per-status counts from the ledger); trainer/plan None, so only the ledger part varies;
   - status.json write: ``status_record`` + ``StatusWriter.write`` (JSON, atomic replace
     with an fsync of the file), i.e. ``Daemon._write_status``;
   - diagnostics (no target): the two ledger queries inside ``status_record``,
     ``Ledger.counts()`` and ``Ledger.rows("queued", "validating", "training")``.

   Each timed row is reported twice: large vs small (the target) and history vs small
   (no target; separates what grows with the finished files from what grows with the
   queue, which status.json lists by name by design).

   Target: large / small <= 2 for each timed row with a target.

2. metrics.jsonl after months, through the dashboard's Starlette app
   (``evertrain.dashboard.app.create_app``, loopback, ``starlette.testclient.TestClient``).
   Two run directories whose metrics.jsonl has 10^3 (small) and 10^6 (large) train lines as
   the trainer writes them (``kind, global_step, loss, lr, grad_norm, tokens, examples,
   seconds, epoch``), plus, as the daemon writes, an ``eval`` and a ``file_end`` line after
   every 1000 steps (one data file). A third, diagnostic case has 10^4 lines (more than the
   page's 1000-point cap, so its first fetch is thinned like the large one's). Generated
   once per run, untimed. Requests, per repeat and case:

   - a fresh app: the page's first metrics fetch
     ``/api/metrics?since_step=-1&max_points=N`` (dashboard.js ``loadMetrics``,
     ``INITIAL_POINTS``) cold (a large file's history is sketched, see
     ``evertrain.dashboard.metrics_tail``); then, polling, the time until the exact
     history is served; then the same first fetch warm (mean of 10 requests), the page's
     2-second poll ``/api/metrics?since_step=<last_step - 1>`` (warm, mean of 30), plain
     ``/api/metrics`` (thinned by default, warm, mean of 10) and
     ``/api/metrics?max_points=0`` (every point, warm, one request);
   - another fresh app: plain ``/api/metrics`` cold; a third: ``max_points=0`` cold.

   Target: large / small <= 2 for the page's requests and plain ``/api/metrics``; every
   point (and the exact history) grows with the file by nature and has no target. The
   response size is reported too.

3. Tokenizing a 1 GB file (the issue's third "flat cost") is measured by
   ``bench_tokenize.py`` (each case needs a process of its own for its peak RSS).

Usage: ``python bench/bench_scaling.py [--repeats 3]``. Scratch files in
``$EVERTRAIN_BENCH_DIR/scaling`` (default /tmp/evertrain-bench; about 250 MB).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import median, pairwise, print_table, rotated, workdir, write_json

from evertrain.daemon.layout import RunLayout, stored_name
from evertrain.daemon.ledger import FileRow, Ledger
from evertrain.daemon.status import StatusWriter, StepMeter, status_record

SMALL_DONE, LARGE_DONE, LARGE_QUEUED = 10, 10_000, 1_000
SMALL_LINES, MID_LINES, LARGE_LINES = 1_000, 10_000, 1_000_000
STEPS_PER_FILE = 1000  # metrics: an eval + file_end line after this many train lines
INITIAL_POINTS = 1000  # dashboard.js: the first metrics fetch is thinned to this
TARGET = 2.0

# --------------------------------------------------------------------------- 1: ledger


def _arrive(ledger: Ledger, layout: RunLayout, i: int, now: float) -> FileRow:
    """Record a new queued file as intake's ``_take`` does (id = max_id() + 1)."""
    file_id = ledger.max_id() + 1
    name = f"notes-{i:06d}.jsonl"
    row = FileRow(
        id=file_id,
        name=name,
        path=layout.rel(layout.queue / stored_name(file_id, name)),
        content_hash=f"{random.Random(file_id).getrandbits(256):064x}",
        size=50_000 + file_id,
        status="queued",
        arrived_at=now,
    )
    return ledger.insert(row)


def _settle_done(ledger: Ledger, layout: RunLayout, row: FileRow, step: int) -> None:
    """Settle ``row`` as done, with the values ``_finish_file`` / ``_settle`` give it."""
    ledger.update(
        row.id,
        status="done",
        path=layout.rel(layout.folder("done") / stored_name(row.id, row.name)),
        finished_at=time.time(),
        attempts=0,
        attempt_step=None,
        started_at=time.time(),
        examples=400,
        tokens=400 * 512,
        steps=50,
        global_step_start=step + 1,
        global_step_end=step + 50,
        loss_start=2.5,
        loss_end=2.1,
        val_loss_before=2.4,
        val_loss_after=2.2,
        skipped_steps=0,
    )


def build_ledger(root: Path, done: int, queued: int, start: int = 0) -> None:
    """Add ``done`` settled files, then ``queued`` waiting ones, to ``root``'s ledger."""
    layout = RunLayout(root)
    layout.create()
    ledger = Ledger(layout.ledger)
    try:
        now = time.time()
        for i in range(start, start + done):
            row = _arrive(ledger, layout, i, now)
            _settle_done(ledger, layout, row, 50 * i)
        for i in range(start + done, start + done + queued):
            _arrive(ledger, layout, i, now)
    finally:
        ledger.close()


def query_plans(path: Path) -> dict[str, str]:
    """SQLite's plan for the ledger queries behind the timed calls (read-only connection)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    pend = "('queued', 'validating', 'training')"
    queries = {
        # Ledger.pending_names (next_pending, the status queue): one per pending status
        "pending_names (per status)": "SELECT id, name FROM files WHERE status = 'queued' "
        "ORDER BY id LIMIT 51",
        "rows(queued, validating, training)": f"SELECT * FROM files WHERE status IN {pend} "
        "ORDER BY id",
        "counts": "SELECT status, COUNT(*) FROM files GROUP BY status",
        "find_done": "SELECT * FROM files WHERE content_hash = 'x' AND status = 'done' "
        "AND id < 5 ORDER BY id LIMIT 1",
        "snapshots": "SELECT * FROM snapshots ORDER BY id",
    }
    try:
        return {
            k: "; ".join(r[-1] for r in db.execute("EXPLAIN QUERY PLAN " + q))
            for k, q in queries.items()
        }
    finally:
        db.close()


def per_call(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call of ``fn``, over ``calls`` calls (one warm-up call first)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def ledger_ops(ledger: Ledger, root: Path) -> dict[str, tuple[Callable[[], Any], int]]:
    first = ledger.next_pending()
    assert first is not None and first.status == "queued"
    done_row = ledger.rows("done")[0]
    writer = StatusWriter(root / "status.json", every_seconds=5.0)
    meter = StepMeter()

    def record() -> dict[str, Any]:
        return status_record(
            state="idle",
            trainer=None,
            plan=None,
            meter=meter,
            ledger=ledger,
            scanner=None,
            watcher=None,
            last_checkpoint=None,
            warning=None,
        )

    return {
        "next_pending": (ledger.next_pending, 200),
        "find_done": (lambda: ledger.find_done(done_row.content_hash or "", first.id), 200),
        "status_record": (record, 50),
        "counts": (ledger.counts, 50),
        "rows_pending": (lambda: ledger.rows("queued", "validating", "training"), 50),
        "status_write": (lambda: writer.write(record()), 20),
    }


def bench_ledger(work: Path, repeats: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    t0 = time.perf_counter()
    small, history, large = work / "ledger-small", work / "ledger-history", work / "ledger-large"
    build_ledger(small, SMALL_DONE, 1)
    build_ledger(history, LARGE_DONE, 1)
    # the large ledger = the history one plus 999 more queued files (every row still
    # written through the Ledger API; the copy only saves building the history twice)
    shutil.copytree(history, large)
    build_ledger(large, 0, LARGE_QUEUED - 1, start=LARGE_DONE + 1)
    build_s = time.perf_counter() - t0
    cases = {"small": small, "history": history, "large": large}
    ledgers = {c: Ledger(RunLayout(p).ledger) for c, p in cases.items()}
    info = {
        "build_seconds": build_s,
        "counts": {c: ledgers[c].counts() for c in cases},
        "ledger_bytes": {c: RunLayout(p).ledger.stat().st_size for c, p in cases.items()},
        "query_plans": query_plans(RunLayout(large).ledger),
    }
    print(f"ledgers built in {build_s:.0f} s: " + json.dumps(info["counts"]))
    ops = {c: ledger_ops(ledgers[c], p) for c, p in cases.items()}
    times: dict[str, dict[str, list[float]]] = {c: {o: [] for o in ops[c]} for c in cases}
    for i in range(repeats):
        for case in rotated(list(cases), i):
            for op, (fn, calls) in ops[case].items():
                times[case][op].append(per_call(fn, calls))
    sizes = {c: len((p / "status.json").read_bytes()) for c, p in cases.items()}
    info["status_json_bytes"] = sizes
    for lg in ledgers.values():
        lg.close()

    names = {
        "next_pending": "pick next file: Ledger.next_pending",
        "find_done": "duplicate check: Ledger.find_done",
        "status_record": "status document: status_record",
        "status_write": "status.json write: status_record + StatusWriter.write",
        "counts": "  part of status_record: Ledger.counts",
        "rows_pending": "  part of status_record: Ledger.rows(queued, validating, training)",
    }
    rows = []
    for op, name in names.items():
        has_target = op in ("next_pending", "status_record", "status_write")
        rows.append(
            _row(
                f"{name} (10^4 done + 10^3 queued vs 10 done + 1 queued)",
                times["small"][op],
                times["large"][op],
                TARGET if has_target else None,
                group="ledger",
            )
        )
        rows.append(
            _row(
                f"{name} (history only: 10^4 done + 1 queued vs 10 done + 1 queued)",
                times["small"][op],
                times["history"][op],
                None,
                group="ledger",
            )
        )
    return rows, info


# --------------------------------------------------------------------------- 2: metrics


def write_metrics(path: Path, lines: int) -> int:
    """``lines`` train records (and an eval + file_end per STEPS_PER_FILE) into ``path``."""
    rnd = random.Random(0)
    with open(path, "w") as f:
        buf = []
        for step in range(1, lines + 1):
            loss = 2.0 + 1.5 * math.exp(-step / 50_000) + 0.2 * (rnd.random() - 0.5)
            rec = {
                "kind": "train",
                "global_step": step,
                "loss": loss,
                "lr": 3e-4 * min(1.0, step / 2000) * (0.5 + 0.5 * math.cos(step / lines)),
                "grad_norm": 0.5 + rnd.random(),
                "tokens": 4096 - rnd.randrange(256),
                "examples": 8,
                "seconds": 0.4 + 0.1 * rnd.random(),
                "epoch": 0,
            }
            buf.append(json.dumps(rec))
            if step % STEPS_PER_FILE == 0:
                fid = step // STEPS_PER_FILE
                val = loss + 0.1
                buf.append(
                    json.dumps(
                        {
                            "kind": "eval",
                            "global_step": step,
                            "val_loss": val,
                            "val_ppl": math.exp(val),
                            "file_id": fid,
                            "scope": "file",
                        }
                    )
                )
                buf.append(
                    json.dumps(
                        {
                            "kind": "file_end",
                            "global_step": step,
                            "file_id": fid,
                            "name": f"notes-{fid:06d}.jsonl",
                        }
                    )
                )
            if len(buf) >= 10_000:
                f.write("\n".join(buf) + "\n")
                buf = []
        if buf:
            f.write("\n".join(buf) + "\n")
    return path.stat().st_size


def _client(run: Path) -> Any:
    from starlette.testclient import TestClient

    from evertrain.dashboard.app import create_app
    from evertrain.dashboard.auth import load_or_create_token

    token, _ = load_or_create_token(run)
    app = create_app(run, token=token, loopback=True, port=8765, max_upload_bytes=1 << 20)
    return TestClient(app, base_url="http://127.0.0.1:8765")


def _get(client: Any, url: str) -> tuple[float, int, Any]:
    t0 = time.perf_counter()
    r = client.get(url)
    s = time.perf_counter() - t0
    assert r.status_code == 200, (url, r.status_code, r.text[:200])
    return s, len(r.content), r


def _get_warm(client: Any, url: str, calls: int) -> tuple[float, int]:
    """Mean seconds of ``calls`` warm requests for ``url``, and the response size."""
    t0 = time.perf_counter()
    for _ in range(calls):
        _, n, _ = _get(client, url)
    return (time.perf_counter() - t0) / calls, n


def metrics_requests(run: Path) -> dict[str, tuple[float, int]]:
    first = f"/api/metrics?since_step=-1&max_points={INITIAL_POINTS}"
    out: dict[str, tuple[float, int]] = {}
    c = _client(run)
    s, n, r = _get(c, first)
    out["first_cold"] = (s, n)
    last = r.json()["last_step"]
    # a large file's history is a sketch at first and parsed exactly in the background: the
    # warm rows measure the steady state, after it has been swapped in
    t0 = time.perf_counter()
    while not _get(c, f"/api/metrics?since_step={last}")[2].json()["complete"]:
        time.sleep(0.05)
    out["exact"] = (s + time.perf_counter() - t0, 0)
    out["first_warm"] = _get_warm(c, first, 10)
    out["poll_warm"] = _get_warm(c, f"/api/metrics?since_step={last - 1}", 30)
    out["default_warm"] = _get_warm(c, "/api/metrics", 10)
    out["all_warm"] = _get_warm(c, "/api/metrics?max_points=0", 1)
    c.close()
    c = _client(run)
    s, n, _ = _get(c, "/api/metrics")
    out["default_cold"] = (s, n)
    c.close()
    c = _client(run)
    s, n, _ = _get(c, "/api/metrics?max_points=0")
    out["all_cold"] = (s, n)
    c.close()
    return out


def bench_metrics(work: Path, repeats: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    t0 = time.perf_counter()
    cases = {
        "small": (work / "metrics-small", SMALL_LINES),
        "mid": (work / "metrics-mid", MID_LINES),
        "large": (work / "metrics-large", LARGE_LINES),
    }
    file_bytes = {}
    for case, (run, lines) in cases.items():
        run.mkdir()
        file_bytes[case] = write_metrics(run / "metrics.jsonl", lines)
    gen_s = time.perf_counter() - t0
    print(f"metrics.jsonl written in {gen_s:.0f} s: {file_bytes} bytes")
    warmup = work / "metrics-warmup"  # one-time imports must not land on the first case
    warmup.mkdir()
    write_metrics(warmup / "metrics.jsonl", 10)
    metrics_requests(warmup)
    times: dict[str, dict[str, list[float]]] = {c: {} for c in cases}
    sizes: dict[str, dict[str, int]] = {c: {} for c in cases}
    for i in range(repeats):
        for case in rotated(list(cases), i):
            for k, (s, n) in metrics_requests(cases[case][0]).items():
                times[case].setdefault(k, []).append(s)
                sizes[case][k] = n
    names = {
        "first_cold": f"first page metrics fetch, cold (max_points={INITIAL_POINTS})",
        "first_warm": f"first page metrics fetch, warm (max_points={INITIAL_POINTS})",
        "poll_warm": "page poll /api/metrics?since_step=last-1, warm",
        "default_cold": "/api/metrics (default thinning), cold",
        "default_warm": "/api/metrics (default thinning), warm",
    }
    untargeted = {  # every point, or every line parsed: in proportion to the file by nature
        "exact": "cold start until the exact history is served (background parse)",
        "all_cold": "/api/metrics?max_points=0 (every point), cold",
        "all_warm": "/api/metrics?max_points=0 (every point), warm",
    }
    rows = [
        _row(
            f"{name} (10^6 vs 10^3 train lines)",
            times["small"][k],
            times["large"][k],
            TARGET if k in names else None,
            group="metrics",
            response_bytes={"small": sizes["small"][k], "large": sizes["large"][k]},
        )
        for k, name in {**names, **untargeted}.items()
    ]
    rows += [
        _row(
            f"{names[k]} (10^6 vs 10^4 train lines: both past the {INITIAL_POINTS}-point cap)",
            times["mid"][k],
            times["large"][k],
            None,
            group="metrics",
            response_bytes={"mid": sizes["mid"][k], "large": sizes["large"][k]},
        )
        for k in ("first_warm", "poll_warm")
    ]
    return rows, {"generate_seconds": gen_s, "metrics_jsonl_bytes": file_bytes}


# --------------------------------------------------------------------------- output


def _row(
    name: str,
    small: list[float],
    large: list[float],
    target: float | None,
    *,
    group: str,
    **extra: Any,
) -> dict[str, Any]:
    ratio = pairwise(large, small)
    return {
        "name": name,
        "group": group,
        "small_seconds": median(small),
        "large_seconds": median(large),
        "small_seconds_all": small,
        "large_seconds_all": large,
        "ratio": ratio,
        "target": None if target is None else f"<= {target:g}",
        "met": None if target is None else ratio <= target,
        **extra,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=("ledger", "metrics"), default=None, help="run one group only")
    a = p.parse_args()
    work = workdir("scaling")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    setup: dict[str, Any] = {}
    if a.only in (None, "ledger"):
        got, setup["ledger"] = bench_ledger(work, a.repeats)
        rows += got
    if a.only in (None, "metrics"):
        got, setup["metrics"] = bench_metrics(work, a.repeats)
        rows += got
    table = [
        [
            r["name"],
            r["small_seconds"],
            r["large_seconds"],
            round(r["ratio"], 2),
            r["target"] or "-",
            "-" if r["met"] is None else ("met" if r["met"] else "MISSED"),
        ]
        for r in rows
    ]
    print_table(
        f"Flat costs as the work grows (medians of {a.repeats} repeats; ratio = large / small)",
        ["row", "small s", "large s", "ratio", "target", "met"],
        table,
    )
    for row in rows:
        if "response_bytes" in row:
            b = ", ".join(f"{k} {v}" for k, v in row["response_bytes"].items())
            print(f"  response bytes, {row['name']}: {b}")
    total = time.perf_counter() - t0
    print(f"total {total:.0f} s")
    write_json(
        "scaling",
        {
            "repeats": a.repeats,
            "total_seconds": total,
            "setup": setup,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
