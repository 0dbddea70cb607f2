"""The LR schedule on an open-ended stream of files.

The learning rate stays a pure function of global_step and the file being trained, so a
restart, a crash or a new file can never restart a warmup or reset a decay:

- warmup (any schedule): ``(s + 1) / warmup_steps`` for the first ``warmup_steps`` optimizer
  steps of the *run* (never per file);
- ``constant``: 1 afterwards;
- ``inverse_sqrt``: ``sqrt(max(w, 1) / (s + 1))`` (Vaswani et al., 2017), continuing across
  files;
- ``wsd`` (warmup-stable-decay, Hu et al., MiniCPM, 2024) on a stream: stable at 1, and
  decaying linearly towards ``min_lr_ratio`` over the last ``decay_steps`` optimizer steps of
  *each file* (default: the last 10% of the file's steps, at least 1). Each file therefore
  ends annealed, which is the state the end-of-file checkpoint and snapshots export, and the
  next file resumes at the stable rate (no warmup). The decay is the engine's formula
  (:func:`evertrain.schedule.lr_factor`) with the file's last step as the total.

``linear`` and ``cosine`` need the run's total length, which a stream does not have; watch
mode refuses them (:mod:`evertrain.daemon.settings`).
"""

from __future__ import annotations

import torch

from evertrain.config import ScheduleConfig
from evertrain.schedule import LRScheduler, lr_factor

STREAM_SCHEDULES = ("constant", "inverse_sqrt", "wsd")


class StreamScheduler(LRScheduler):
    """:class:`~evertrain.schedule.LRScheduler` for the watch daemon (same checkpoint state:
    the definition, with ``total_steps`` None).

    Attributes:
        window: ``(global_step at the file's first step, global_step after its last step)``
            of the file being trained; needed by ``wsd`` only.

    Raises:
        ValueError: a schedule other than constant, inverse_sqrt or wsd; or ``wsd`` asked
            for an LR with no file window set.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float):
        if cfg.name not in STREAM_SCHEDULES:
            raise ValueError(f"schedule {cfg.name!r} is not usable on an open-ended stream")
        super().__init__(optimizer, cfg, base_lr, None)
        self.window: tuple[int, int] | None = None

    def lr_at(self, step: int) -> float:
        return self.base_lr * stream_lr_factor(self.cfg, step, self.window)


def stream_lr_factor(cfg: ScheduleConfig, step: int, window: tuple[int, int] | None) -> float:
    """Multiplier of the base LR for the optimizer step taken after ``step`` steps.

    Args:
        cfg: the schedule (constant, inverse_sqrt or wsd).
        step: global_step before this step (>= 0).
        window: the current file's ``(start, end)`` global_steps (wsd only).

    Raises:
        ValueError: wsd without ``window``, or another schedule.
    """
    if step < cfg.warmup_steps or cfg.name in ("constant", "inverse_sqrt"):
        return lr_factor(cfg, step, None)  # neither needs a total length
    if cfg.name != "wsd":
        raise ValueError(f"schedule {cfg.name!r} is not usable on an open-ended stream")
    if window is None:
        raise ValueError("wsd on a stream needs the current file's step window")
    start, end = window
    n = max(end - start, 1)
    decay = min(cfg.decay_steps if cfg.decay_steps is not None else max(1, n // 10), n)
    # The engine's wsd with the file's last step as the total and this file's decay length.
    # Same as a per-file formula for every step < end (end > step >= warmup_steps, so the
    # engine's floor of the total at warmup_steps + 1 never applies).
    return lr_factor(cfg.model_copy(update={"decay_steps": decay}), step, end)
