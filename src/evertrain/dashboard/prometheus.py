"""Prometheus text exposition of a run (format 0.0.4:
https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format).

Gauges only: global_step goes back when a run resumes from an older checkpoint, which a
counter must never do. A value that is unknown (no status yet, a diverged loss) is left out,
as the format expects, rather than exported as NaN.
"""

from __future__ import annotations

import time
from typing import Any

from evertrain.dashboard.metrics_tail import finite
from evertrain.dashboard.rundir import STATUSES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    return repr(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def render(
    status: dict[str, Any] | None,
    status_age: float | None,
    last_train: dict[str, Any] | None,
    counts: dict[str, int],
    last_checkpoint_time: float | None,
    paused: bool,
) -> str:
    """The exposition text.

    Args:
        status: status.json (or None); its values win over ``last_train``.
        status_age: seconds since status.json's ``updated``.
        last_train: the newest metrics.jsonl train record (used while there is no status).
        counts: ledger files by status.
        last_checkpoint_time: unix seconds of the newest committed checkpoint.
        paused: control.json's ``paused`` (requested, not necessarily reached).
    """
    st = status or {}
    lt = last_train or {}
    now = time.time()
    gauges: list[tuple[str, str, float | None]] = [
        ("evertrain_global_step", "Optimizer steps completed.", _pick(st, lt, "global_step")),
        ("evertrain_loss", "Training loss, smoothed (nats per token).", _loss(st, lt)),
        ("evertrain_learning_rate", "Learning rate of the last step.", _pick(st, lt, "lr")),
        (
            "evertrain_tokens_per_second",
            "Training throughput (non-padding input tokens per second).",
            finite(st.get("tokens_per_second"))
            if "tokens_per_second" in st
            else finite(lt.get("tokens_per_second")),
        ),
        (
            "evertrain_last_checkpoint_age_seconds",
            "Seconds since the newest committed checkpoint was written.",
            None if last_checkpoint_time is None else max(0.0, now - last_checkpoint_time),
        ),
        (
            "evertrain_status_age_seconds",
            "Seconds since the daemon last wrote status.json.",
            status_age,
        ),
        ("evertrain_pause_requested", "1 if control.json asks the daemon to pause.", paused),
    ]
    lines = []
    for name, help_, value in gauges:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
        if value is not None:
            lines.append(f"{name} {_fmt(float(value))}")
    lines += [
        "# HELP evertrain_files Data files in the ledger, by status.",
        "# TYPE evertrain_files gauge",
    ]
    for s in sorted(set(STATUSES) | set(counts)):
        lines.append(f'evertrain_files{{status="{_escape(s)}"}} {int(counts.get(s, 0))}')
    state = st.get("state")
    lines += [
        "# HELP evertrain_state 1 for the daemon's current state (status.json).",
        "# TYPE evertrain_state gauge",
    ]
    if isinstance(state, str):
        lines.append(f'evertrain_state{{state="{_escape(state)}"}} 1')
    return "\n".join(lines) + "\n"


def _pick(st: dict[str, Any], lt: dict[str, Any], key: str) -> float | None:
    return finite(st.get(key)) if key in st else finite(lt.get(key))


def _loss(st: dict[str, Any], lt: dict[str, Any]) -> float | None:
    return finite(st.get("loss")) if "loss" in st else finite(lt.get("loss_smoothed"))
