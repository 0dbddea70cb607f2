"""Read-only views of a run directory for the dashboard (layout: docs/run-directory.md).

Nothing here writes into the run directory or takes the daemon's lock: the dashboard must
work while the daemon is stopped and must never slow it down or block it. Every reader
tolerates a file that does not exist yet (a fresh run) and reports a damaged one in its
result instead of raising, so one bad file cannot take the whole page down.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from evertrain.dashboard.metrics_tail import MetricsTail, finite
from evertrain.dashboard.runinfo import ConfigReader, derive_status, pid_alive

STATUSES = ("queued", "validating", "training", "done", "rejected", "duplicate")
STALE_AFTER_SECONDS = 30.0  # status.json is replaced "every few seconds" by a live daemon
_SNAPSHOT_RE = re.compile(r"(\d{8}-\d{6})-step-(\d+)")
_STEP_DIR_RE = re.compile(r"step-(\d{8,})")  # as evertrain.checkpoint.format.STEP_DIR_RE
# names the writer of inbox/ uses while a file is incomplete (docs/run-directory.md)
_INCOMPLETE_SUFFIXES = (".part", ".tmp")


def dir_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (recursive; symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # removed meanwhile (retention)
            total += st.st_size
    return total


def read_json_file(path: Path) -> tuple[Any, str | None]:
    """(parsed JSON or None, problem or None); a missing file is (None, None)."""
    try:
        return json.loads(path.read_bytes()), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return None, f"{path.name}: unreadable or not valid JSON ({e})"


class RunDirectory:
    """The dashboard's read-only access to ``root`` (a run directory).

    Args:
        root: the run directory (``RUN``).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.metrics = MetricsTail(self.root / "metrics.jsonl")
        self.config = ConfigReader(self.root)
        self._verify_lock = threading.Lock()
        # checkpoint dir name -> (manifest (ino, mtime_ns), result); see verify()
        self._verified: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}

    # status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``status.json`` plus what the dashboard derives from it.

        Returns:
            ``{"status": dict | None, "status_age_seconds": float | None, "stale": bool,
            "daemon_running": bool | None, "control": dict | None, "inbox": [names],
            "queue": [names], "problems": [str]}``. ``stale``: the status is older than
            30 s while its state is not ``stopped`` (the daemon died or hangs).
            ``daemon_running``: whether the pid in status.json exists on this host.
            Without status.json (an ``evertrain train`` run) there is also ``"derived"``:
            :func:`~evertrain.dashboard.runinfo.derive_status` (call
            ``self.metrics.refresh()`` first), and ``daemon_running`` says whether a live
            process holds ``daemon.lock``.
        """
        problems = []
        status, p = read_json_file(self.root / "status.json")
        if p:
            problems.append(p)
        if status is not None and not isinstance(status, dict):
            problems.append("status.json: top level is not a JSON object")
            status = None
        control, p = read_json_file(self.root / "control.json")
        if p:
            problems.append(p)
        age = None
        running = None
        if status is not None:
            updated = finite(status.get("updated"))
            age = max(0.0, time.time() - updated) if updated is not None else None
            running = pid_alive(status.get("pid"))
            if status.get("state") == "stopped":
                running = False if running is None else running
        stale = bool(
            status is not None
            and status.get("state") != "stopped"
            and (age is None or age > STALE_AFTER_SECONDS or running is False)
        )
        queue = status.get("queue") if status else None
        if not isinstance(queue, list):
            queue = self.queue_dir()
        derived = None
        if status is None:
            derived = derive_status(self.root, self.metrics)
            if derived is not None and derived["state"] != "unknown":
                running = derived["state"] == "training"
        return {
            "status": status,
            "derived": derived,
            "status_age_seconds": age,
            "stale": stale,
            "daemon_running": running,
            "control": control if isinstance(control, dict) else None,
            "inbox": self.inbox(),
            "queue": queue,
            "problems": problems,
        }

    def inbox(self) -> list[dict[str, Any]]:
        """Complete files waiting in ``inbox/`` (temp names excluded): name, size, mtime."""
        out = []
        try:
            entries = list(os.scandir(self.root / "inbox"))
        except OSError:
            return []
        for e in entries:
            if e.name.startswith(".") or e.name.lower().endswith(_INCOMPLETE_SUFFIXES):
                continue
            try:
                st = e.stat()
            except OSError:
                continue
            if e.is_file():
                out.append({"name": e.name, "size_bytes": st.st_size, "mtime": st.st_mtime})
        return sorted(out, key=lambda d: (d["mtime"], d["name"]))

    def queue_dir(self) -> list[str]:
        """Names in ``queue/`` (``<id>-<name>``), sorted; used when status.json has none."""
        try:
            return sorted(n for n in os.listdir(self.root / "queue") if not n.startswith("."))
        except OSError:
            return []

    # ledger -----------------------------------------------------------------------------

    def files(self, limit: int = 1000) -> dict[str, Any]:
        """Rows of the ledger's ``files`` table, newest ``limit`` by id, in id order.

        Opened read-only (``mode=ro``): a missing ledger is reported, never created.

        Returns:
            ``{"files": [row dicts, columns as in docs/run-directory.md], "counts":
            {status: n}, "total": n, "problem": str | None}``.
        """
        path = self.root / "ledger.sqlite"
        empty: dict[str, Any] = {"files": [], "counts": {}, "total": 0, "problem": None}
        if not path.exists():
            return empty
        try:
            con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error as e:
            return {**empty, "problem": f"ledger.sqlite: cannot open ({e})"}
        try:
            con.row_factory = sqlite3.Row
            rows = con.execute(
                "SELECT * FROM (SELECT * FROM files ORDER BY id DESC LIMIT ?) ORDER BY id",
                (max(0, limit),),
            ).fetchall()
            counts = dict(con.execute("SELECT status, COUNT(*) FROM files GROUP BY status"))
        except sqlite3.Error as e:
            return {**empty, "problem": f"ledger.sqlite: cannot read table files ({e})"}
        finally:
            con.close()
        files = [{k: _json_value(r[k]) for k in r.keys()} for r in rows]  # noqa: SIM118
        return {"files": files, "counts": counts, "total": sum(counts.values()), "problem": None}

    # checkpoints and snapshots ----------------------------------------------------------

    def checkpoints(self) -> list[dict[str, Any]]:
        """Committed checkpoints (``CheckpointManager.committed()``), oldest first.

        Each: ``{"name", "global_step", "path", "size_bytes", "time" (unix s, from the
        manifest summary, else the directory's mtime), "summary", "verify": None |
        {"ok", "problems", "checked_at", "seconds"}}``. ``verify`` is the result of the
        last :meth:`verify` of this exact commit (full verification reads every byte, so
        listing never verifies).
        """
        from evertrain.checkpoint import CheckpointManager, KeepLast

        # retention is never applied: committed() only reads manifests
        infos = CheckpointManager(self.root / "checkpoints", KeepLast(1)).committed()
        out = []
        for info in infos:
            summary = {k: _json_value(v) for k, v in info.summary.items()}
            t = finite(summary.get("time"))
            try:
                mtime = info.path.stat().st_mtime
            except OSError:
                continue  # deleted by retention meanwhile
            result = self._verified.get(info.path.name)
            out.append(
                {
                    "name": info.path.name,
                    "global_step": info.global_step,
                    "path": str(info.path),
                    "size_bytes": dir_size(info.path),
                    "time": t if t is not None else mtime,
                    "summary": summary,
                    "verify": result[1] if result and result[0] == _commit_id(info.path) else None,
                }
            )
        return out

    def verify(self, name: str) -> dict[str, Any]:
        """Fully verify checkpoint ``checkpoints/<name>`` (every byte hashed; see
        :func:`evertrain.checkpoint.verify_checkpoint`). One at a time per dashboard.

        Raises:
            FileNotFoundError: ``name`` is not a committed checkpoint directory of this run,
                or retention deleted it during verification.
        """
        from evertrain.checkpoint import verify_checkpoint

        path = self.root / "checkpoints" / name
        if not _STEP_DIR_RE.fullmatch(name) or not (path / "manifest.json").is_file():
            raise FileNotFoundError(
                f"checkpoints/{name}: no such committed checkpoint (names look like "
                "step-00000120; see GET /api/checkpoints)"
            )
        with self._verify_lock:
            commit = _commit_id(path)
            t0 = time.perf_counter()
            problems = verify_checkpoint(path)
            if not (path / "manifest.json").is_file():
                # retention removed it meanwhile: its files vanishing is not damage
                raise FileNotFoundError(
                    f"checkpoints/{name}: deleted (checkpoint retention) while it was being "
                    "verified"
                )
            result = {
                "ok": not any(p.fatal for p in problems),
                "problems": [
                    {"file": p.file, "message": p.message, "fatal": p.fatal} for p in problems
                ],
                "checked_at": time.time(),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            self._verified[name] = (commit, result)
        return result

    def snapshots(self) -> list[dict[str, Any]]:
        """``snapshots/<YYYYmmdd-HHMMSS>-step-<N>/`` directories, oldest first.

        Each: ``{"name", "global_step", "path", "size_bytes", "time" (unix s, the
        directory's mtime), "files": [top-level names]}``; other names are skipped.
        """
        root = self.root / "snapshots"
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError:
            return []
        out = []
        for e in entries:
            m = _SNAPSHOT_RE.fullmatch(e.name)
            if not m or not e.is_dir():
                continue
            try:
                mtime = e.stat().st_mtime
                names = sorted(os.listdir(e.path))
            except OSError:
                continue
            out.append(
                {
                    "name": e.name,
                    "global_step": int(m.group(2)),
                    "path": e.path,
                    "size_bytes": dir_size(Path(e.path)),
                    "time": mtime,
                    "files": names,
                }
            )
        return out


def _commit_id(path: Path) -> tuple[int, int]:
    """Identity of one commit of a step dir: a re-save of the same step is a new manifest."""
    try:
        st = (path / "manifest.json").stat()
    except OSError:
        return (0, 0)
    return (st.st_ino, st.st_mtime_ns)


def _json_value(v: Any) -> Any:
    """``v`` made JSON-safe: non-finite floats become None (JSON has no NaN), bytes hex."""
    if isinstance(v, float):
        return finite(v)
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    return v
