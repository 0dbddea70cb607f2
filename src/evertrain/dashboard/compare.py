"""Several runs' loss curves side by side: ``evertrain ui RUN --compare OTHER``.

A *run directory* here is one with ``metrics.jsonl`` or ``checkpoints/`` (what ``evertrain
train`` and ``evertrain watch`` create). Each compared run gets its own incremental
:class:`~evertrain.dashboard.metrics_tail.MetricsTail`, so polling a weeks-long run stays
cheap. Read-only, like the rest of the dashboard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evertrain.dashboard.metrics_tail import MetricsTail

DEFAULT_MAX_POINTS = 2000  # per run: a chart is a few hundred pixels wide


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a run directory (has metrics.jsonl or checkpoints/)."""
    return (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir()


def child_runs(path: Path) -> list[Path]:
    """The run directories directly inside ``path``, sorted by name (hidden ones skipped)."""
    try:
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    except OSError:
        return []
    return [path / n for n in names if (path / n).is_dir() and is_run_dir(path / n)]


def expand_runs(paths: list[Path]) -> list[Path]:
    """``paths`` with each parent of runs replaced by the runs inside it, duplicates dropped.

    A path that is a run directory stays itself; one that is not, but holds run
    directories, becomes those (sorted); any other path stays, and shows as a run without
    metrics (its ``problems`` say so) rather than vanishing silently.
    """
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        found = [p] if is_run_dir(p) else child_runs(p) or [p]
        for r in found:
            if all(os.path.realpath(r) != os.path.realpath(q) for q in out):
                out.append(r)
    return out


def compared_runs(run_dir: Path, compare: list[Path]) -> list[Path]:
    """The runs of the compare chart: ``run_dir`` (or, when it is not a run directory but
    holds some, the runs inside it) followed by :func:`expand_runs` of ``compare``."""
    run_dir = Path(run_dir)
    own = child_runs(run_dir) if not is_run_dir(run_dir) else []
    return expand_runs([*(own or [run_dir]), *compare])


def run_names(paths: list[Path]) -> list[str]:
    """Series names: each directory's name, with parent names added until they are unique."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    depth = 1
    while True:
        names = ["/".join(pp[-depth:]) for pp in parts]
        if len(set(names)) == len(names) or depth >= max((len(pp) for pp in parts), default=1):
            return names
        depth += 1


class CompareRuns:
    """The runs shown together in the dashboard's compare chart, the dashboard's own first.

    Args:
        runs: run directories (already expanded, see :func:`expand_runs`).
        tails: reuse these readers for some of them (the main run's), by path.
    """

    def __init__(self, runs: list[Path], tails: dict[Path, MetricsTail] | None = None) -> None:
        tails = tails or {}
        self.runs = [Path(r) for r in runs]
        self.names = run_names(self.runs)
        self.tails = [tails.get(r) or MetricsTail(r / "metrics.jsonl") for r in self.runs]

    def query(self, max_points: int = DEFAULT_MAX_POINTS) -> dict[str, Any]:
        """Every run's training loss.

        Args:
            max_points: per run, thin to about this many points (see
                :meth:`MetricsTail.query`; the newest step is always kept); 0 keeps all.

        Returns:
            ``{"runs": [{"name", "path", "generation", "last_step", "count", "stride",
            "global_step": [...], "loss": [...], "loss_smoothed": [...], "problems":
            [...]}]}`` in the order given; losses in nats, non-finite ones null. A run
            without metrics.jsonl has empty lists and a problem saying so.
        """
        out = []
        for name, path, tail in zip(self.names, self.runs, self.tails, strict=True):
            tail.refresh()
            q = tail.query(-1, max_points)
            problems = list(q["problems"])
            if not tail.path.is_file():
                why = "no metrics.jsonl (not a run directory, or no step yet)"
                problems.insert(0, f"{path}: {why}")
            out.append(
                {
                    "name": name,
                    "path": str(path),
                    "generation": q["generation"],
                    "last_step": q["last_step"],
                    "count": q["count"],
                    "stride": q["stride"],
                    "global_step": q["train"]["global_step"],
                    "loss": q["train"]["loss"],
                    "loss_smoothed": q["train"]["loss_smoothed"],
                    "problems": problems,
                }
            )
        return {"runs": out}
