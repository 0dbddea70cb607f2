"""LR schedules as pure functions of global_step.

Because the learning rate is recomputed from global_step before every optimizer step (never
accumulated in a stateful scheduler object), a resume can never restart a warmup or reset a
decay, and a continuous stream of files never re-warms.

Formulas (``s`` = optimizer steps already taken, ``w`` = warmup_steps, ``T`` = total steps,
``m`` = min_lr_ratio; the result multiplies ``train.lr``):

- warmup (all schedules, ``s < w``): ``(s + 1) / w`` (linear warmup, as in
  ``transformers.get_linear_schedule_with_warmup``).
- ``constant``: 1.
- ``linear``: ``m + (1 - m) * (T - s) / (T - w)``, floored at ``m``.
- ``cosine``: ``m + (1 - m) * 0.5 * (1 + cos(pi * (s - w) / (T - w)))`` (Loshchilov & Hutter,
  SGDR, 2017).
- ``wsd`` (warmup-stable-decay, Hu et al., MiniCPM, 2024): 1 until ``T - decay_steps``, then
  linear to ``m`` at ``T``.
- ``inverse_sqrt``: ``sqrt(max(w, 1) / (s + 1))`` after warmup (Vaswani et al., 2017); needs
  no ``T``, so it suits open-ended streams.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from evertrain.config import ScheduleConfig
from evertrain.state import check_version

NEEDS_TOTAL = {"linear", "cosine", "wsd"}


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int | None) -> float:
    """Multiplier of the base LR for the optimizer step taken after ``step`` steps.

    Args:
        cfg: the schedule.
        step: optimizer steps already taken (global_step before this step), >= 0.
        total_steps: planned optimizer steps; required by linear, cosine and wsd.

    Raises:
        ValueError: ``total_steps`` missing for a schedule that needs it.
    """
    w, m = cfg.warmup_steps, cfg.min_lr_ratio
    if step < w:
        return (step + 1) / w
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "inverse_sqrt":
        return math.sqrt(max(w, 1) / (step + 1))
    if total_steps is None:
        raise ValueError(f"schedule {cfg.name!r} needs a total number of steps")
    t = max(total_steps, w + 1)
    if cfg.name == "linear":
        return max(m, m + (1 - m) * (t - step) / (t - w))
    if cfg.name == "cosine":
        progress = min(1.0, (step - w) / (t - w))
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd
    decay = cfg.decay_steps if cfg.decay_steps is not None else max(1, (t - w) // 10)
    start = t - decay
    if step < start:
        return 1.0
    return max(m, 1 - (1 - m) * (step - start) / max(decay, 1))


class LRScheduler:
    """Owner of the LR schedule: sets every param group's ``lr`` from global_step.

    Its state holds only the schedule's definition (for reporting changes on resume); the
    learning rate itself is derived, so there is nothing to drift. Not thread-safe.
    """

    VERSION = 1

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: ScheduleConfig,
        base_lr: float,
        total_steps: int | None,
    ) -> None:
        self.optimizer, self.cfg, self.base_lr, self.total_steps = (
            optimizer,
            cfg,
            base_lr,
            total_steps,
        )
        self.loaded_definition: dict[str, Any] | None = None

    def lr_at(self, step: int) -> float:
        """The learning rate (same unit as ``train.lr``) for the step after ``step`` steps."""
        return self.base_lr * lr_factor(self.cfg, step, self.total_steps)

    def apply(self, step: int) -> float:
        """Set ``lr`` on every param group for the next optimizer step; return it."""
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _definition(self) -> dict[str, Any]:
        return {
            "schedule": self.cfg.model_dump(),
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **self._definition()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_version(state, "scheduler", self.VERSION)
        # Keep what was stored so the caller can report a changed schedule; the config
        # check decides whether that change is allowed.
        self.loaded_definition = {k: state[k] for k in ("schedule", "base_lr", "total_steps")}

    def changes(self) -> list[str]:
        """Human-readable differences between the stored and the current schedule."""
        if self.loaded_definition is None:
            return []
        now = self._definition()
        return [
            f"{k}: {self.loaded_definition[k]!r} -> {now[k]!r}"
            for k in now
            if self.loaded_definition[k] != now[k]
        ]
