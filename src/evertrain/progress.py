"""Owner of the training counters: global_step, micro-batches, examples, tokens, best metric."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from evertrain.state import check_version

RECENT = 100  # losses kept for smoothing/status after a resume


@dataclass
class Progress:
    """Training counters (all cumulative over the whole run, never reset per file).

    Attributes:
        global_step: optimizer steps taken.
        micro_step: micro-batches consumed (global_step * grad_accum_steps when aligned).
        examples_seen: training examples (sequences) consumed, all ranks.
        tokens_seen: non-padding input tokens consumed, all ranks.
        best_metric / best_step: best eval value so far (per ``checkpoint.best_mode``).
        recent_losses: the last 100 per-step training losses.
        skipped_steps: optimizer steps whose updates the divergence guard dropped or
            rolled back (:mod:`evertrain.guard`); absent in checkpoints written before it
            existed, which read as 0.
    """

    VERSION = 1
    global_step: int = 0
    micro_step: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    recent_losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0

    def record_loss(self, loss: float) -> None:
        self.recent_losses = (self.recent_losses + [loss])[-RECENT:]

    def track_best(self, value: float | None, mode: str) -> None:
        """Record ``value`` (an eval metric at :attr:`global_step`) as the best so far if it
        is better (``mode`` ``"min"`` or ``"max"``) than :attr:`best_metric`."""
        if value is None:
            return
        best = self.best_metric
        if best is None or (value < best if mode == "min" else value > best):
            self.best_metric, self.best_step = value, self.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **asdict(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_version(state, "progress", self.VERSION)
        optional = {"skipped_steps": 0}
        for k in asdict(self):
            setattr(self, k, state[k] if k not in optional else state.get(k, optional[k]))
