"""The continuous training daemon behind ``evertrain watch`` (see :mod:`.loop`).

Modules, each owning one thing: :mod:`.layout` (the run directory's folders and names),
:mod:`.lock` (one daemon per run), :mod:`.intake` (the inbox), :mod:`.ledger` (SQLite record
of every file), :mod:`.stream` (the checkpointed stream position), :mod:`.replay`,
:mod:`.filedata` (per-file datasets), :mod:`.schedule` (the LR on an open-ended stream),
:mod:`.settings` (watch-mode config rules), :mod:`.reconcile` (crash recovery),
:mod:`.snapshots`, :mod:`.status`, :mod:`.control`, :mod:`.files` (one file's way through the
daemon) and :mod:`.loop` (the daemon).

Names are imported on first use, so readers (``evertrain status``, the dashboard) that need
only the ledger, the status or the control record do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evertrain.daemon.control import Control, write_control
    from evertrain.daemon.ledger import FileRow, Ledger, LedgerError
    from evertrain.daemon.lock import RunLock, RunLockedError
    from evertrain.daemon.loop import Daemon, DaemonError
    from evertrain.daemon.reconcile import ReconcileError
    from evertrain.daemon.settings import prepare_watch_config, resolve_watch_config
    from evertrain.daemon.status import read_status

_WHERE = {
    "Control": "control",
    "write_control": "control",
    "FileRow": "ledger",
    "Ledger": "ledger",
    "LedgerError": "ledger",
    "RunLock": "lock",
    "RunLockedError": "lock",
    "Daemon": "loop",
    "DaemonError": "loop",
    "ReconcileError": "reconcile",
    "prepare_watch_config": "settings",
    "resolve_watch_config": "settings",
    "read_status": "status",
}

__all__ = [
    "Control",
    "Daemon",
    "DaemonError",
    "FileRow",
    "Ledger",
    "LedgerError",
    "ReconcileError",
    "RunLock",
    "RunLockedError",
    "prepare_watch_config",
    "read_status",
    "resolve_watch_config",
    "write_control",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'evertrain.daemon' has no attribute {name!r}")
    return getattr(importlib.import_module(f"evertrain.daemon.{module}"), name)
