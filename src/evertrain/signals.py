"""Install SIGTERM/SIGINT handlers for the length of a block, then restore the old ones."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``handler(signum, frame)`` inside the block.

    Python allows handlers only in the main thread; elsewhere (a daemon run in a test
    thread) nothing is installed and the block runs as is. The previous handlers come back
    on exit, so a library call never leaves the process deaf to Ctrl-C.
    """
    old: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
