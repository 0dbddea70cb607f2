"""What the dashboard can tell about a run without status.json: ``evertrain train`` runs.

Only ``evertrain watch`` writes ``status.json``. A run of ``evertrain train`` (or of a user's
own loop with the :class:`~evertrain.Checkpointer`) leaves ``metrics.jsonl``,
``checkpoints/step-N/`` and ``daemon.lock``; :func:`derive_status` builds a status from
those, and :class:`ConfigReader` reads the stored run config of the newest checkpoint. Like
the rest of the dashboard, nothing here writes into the run directory or takes its lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

from evertrain.dashboard.metrics_tail import MetricsTail, finite
from evertrain.runlock import LOCK_NAME

_PROC_LOCKS = Path("/proc/locks")


def _flock_pids(path: Path) -> list[int] | None:
    """Pids holding an ``flock``/``fcntl`` lock on ``path``, from ``/proc/locks`` (Linux);
    None where that file is not readable (another OS), so the caller falls back.

    Reading ``/proc/locks`` is the one way to see a lock without touching it: a trial
    ``flock(LOCK_SH | LOCK_NB)`` would, for its moment, make the trainer's own start fail.
    """
    try:
        st = os.stat(path)
        text = _PROC_LOCKS.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # line: "1: FLOCK  ADVISORY  WRITE 21995 fe:00:4416333 0 EOF"; waiters carry "->"
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in text.splitlines():
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[5] != dev:
            continue
        try:
            pids.append(int(parts[4]))
        except ValueError:
            continue
    return pids


def pid_alive(pid: Any) -> bool | None:
    """Whether process ``pid`` exists on this host; None if unknown (no pid)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def lock_holder(run_dir: Path) -> dict[str, Any]:
    """Whether a live process holds ``RUN/daemon.lock`` (see :mod:`evertrain.runlock`).

    Returns:
        ``{"held": bool | None, "pid", "host", "since" (unix s), "how"}``. ``held`` comes
        from ``/proc/locks`` where readable (``how`` ``"proc-locks"``; exact: the lock file
        keeps the last holder's pid after it exits, and that pid may be reused). Elsewhere
        it is whether the recorded pid is alive on this host (``"pid"``), or None when the
        recorded holder is on another host (``"other-host"``). No lock file: held False.
        ``pid``/``host``/``since`` are the file's record (None when unreadable).
    """
    path = Path(run_dir) / LOCK_NAME
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except FileNotFoundError:
        return {"held": False, "pid": None, "host": None, "since": None, "how": "no-lock-file"}
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    pid = info.get("pid") if isinstance(info.get("pid"), int) else None
    host = info.get("host") if isinstance(info.get("host"), str) else None
    out: dict[str, Any] = {"pid": pid, "host": host, "since": finite(info.get("since"))}
    pids = _flock_pids(path)
    if pids is not None:
        # the record is written just after the flock is taken: name the real holder
        if pids and pid not in pids:
            out["pid"] = pids[0]
        return {**out, "held": bool(pids), "how": "proc-locks"}
    if host is not None and host != socket.gethostname():
        return {**out, "held": None, "how": "other-host"}
    return {**out, "held": bool(pid_alive(pid)), "how": "pid"}


def newest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """``{"global_step", "path", "time"}`` of the newest committed checkpoint (a
    ``step-N`` directory with its manifest; ``*.tmp`` and uncommitted ones excluded), not
    verified; ``time`` (unix s) from the manifest summary, else the directory's mtime."""
    from evertrain.checkpoint import CheckpointManager, KeepLast

    for info in reversed(CheckpointManager(Path(run_dir) / "checkpoints", KeepLast(1)).committed()):
        t = finite(info.summary.get("time"))
        if t is None:
            try:
                t = info.path.stat().st_mtime
            except OSError:
                continue  # deleted by retention meanwhile
        return {"global_step": info.global_step, "path": str(info.path), "time": t}
    return None


def derive_status(run_dir: Path, metrics: MetricsTail) -> dict[str, Any] | None:
    """A status for a run without ``status.json``, shaped like it (docs/run-directory.md).

    Args:
        run_dir: the run directory.
        metrics: its refreshed ``metrics.jsonl`` reader.

    Returns:
        None for a directory with no metrics, checkpoint or lock file (nothing to show);
        else ``{"derived": True, "kind": "train" | "watch" (has a ledger), "state":
        "training" | "stopped" | "unknown", "pid", "host", "since", "lock": "proc-locks" |
        "pid" | "other-host" | "no-lock-file",
        "updated" (unix s: metrics.jsonl's mtime), "global_step", "loss" (smoothed, nats),
        "loss_last" (nats), "lr", "grad_norm", "tokens_per_second", "last_checkpoint":
        None | {"global_step", "path", "time"}}``. ``state`` is ``training`` while a live
        process holds ``daemon.lock``, ``unknown`` when its holder is on another host.
    """
    run_dir = Path(run_dir)
    holder = lock_holder(run_dir)
    last = metrics.last_train()
    newest = newest_checkpoint(run_dir)
    if last is None and newest is None and holder["how"] == "no-lock-file":
        return None
    try:
        updated: float | None = (run_dir / "metrics.jsonl").stat().st_mtime
    except OSError:
        updated = None
    held = holder["held"]
    lt = last or {}
    return {
        "derived": True,
        # a watch daemon also lacks status.json for its first seconds
        "kind": "watch" if (run_dir / "ledger.sqlite").exists() else "train",
        "state": "training" if held else ("unknown" if held is None else "stopped"),
        "pid": holder["pid"],
        "host": holder["host"],
        "since": holder["since"],
        "lock": holder["how"],
        "updated": updated,
        "global_step": lt.get("global_step", newest["global_step"] if newest else None),
        "loss": lt.get("loss_smoothed"),
        "loss_last": lt.get("loss"),
        "lr": lt.get("lr"),
        "grad_norm": lt.get("grad_norm"),
        "tokens_per_second": lt.get("tokens_per_second"),
        "last_checkpoint": newest,
    }


class ConfigReader:
    """The stored run config (owner ``config``) of a run's newest committed checkpoint.

    Read through :func:`evertrain.checkpoint.read_checkpoint` restricted to that owner: the
    manifest is checked and ``config.json`` hashed and parsed as JSON (no pickle is ever
    opened; the model and optimizer files are not read). Cached per checkpoint commit.
    """

    def __init__(self, run_dir: Path) -> None:
        self.root = Path(run_dir)
        self._lock = threading.Lock()
        self._cache: tuple[tuple[str, int, int], dict[str, Any]] | None = None

    def read(self) -> dict[str, Any]:
        """The newest checkpoint's config.

        Returns:
            ``{"checkpoint": name | None, "global_step": int | None, "config": dict | None,
            "problem": str | None}``. ``config`` is None when there is no checkpoint yet, the
            checkpoint has no config owner (a user's loop may save none), or it is damaged
            (``problem`` says which file and why). Never raises for the run's contents.
        """
        from evertrain.checkpoint import CheckpointManager, KeepLast
        from evertrain.checkpoint.errors import CorruptCheckpointError
        from evertrain.checkpoint.verify import read_checkpoint

        infos = CheckpointManager(self.root / "checkpoints", KeepLast(1)).committed()
        if not infos:
            return {"checkpoint": None, "global_step": None, "config": None, "problem": None}
        info = infos[-1]
        try:
            st = (info.path / "manifest.json").stat()
        except OSError:  # deleted by retention meanwhile: read again next time
            return {"checkpoint": None, "global_step": None, "config": None, "problem": None}
        key = (info.path.name, st.st_ino, st.st_mtime_ns)
        with self._lock:
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            out: dict[str, Any] = {
                "checkpoint": info.path.name,
                "global_step": info.global_step,
                "config": None,
                "problem": None,
            }
            try:
                loaded = read_checkpoint(info.path, owners=lambda owner: owner == "config")
            except CorruptCheckpointError as e:
                out["problem"] = f"checkpoints/{info.path.name}: {e}"
            except OSError as e:
                out["problem"] = f"checkpoints/{info.path.name}: unreadable ({e})"
            else:
                state = loaded.states.get("config")
                cfg = state.get("config") if isinstance(state, dict) else None
                if isinstance(cfg, dict):
                    out["config"] = cfg
                elif state is not None:
                    out["problem"] = f"checkpoints/{info.path.name}/config.json: no config"
            self._cache = (key, out)
            return out
