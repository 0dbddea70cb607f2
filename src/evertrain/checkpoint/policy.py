"""When to save (:class:`SavePolicy`) and which checkpoints to keep (retention policies).

A retention policy maps the committed, verified checkpoints to the set of global_steps it
wants kept; :class:`~evertrain.checkpoint.CheckpointManager` deletes the rest, except the
newest valid checkpoint and protected steps. Combine policies with ``|`` (union).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from evertrain.config import CheckpointConfig

if TYPE_CHECKING:
    from evertrain.checkpoint.manager import CheckpointInfo


class SavePolicy:
    """Save every ``every_steps`` optimizer steps and/or every ``every_seconds`` seconds.

    Step saves land on multiples of ``every_steps`` (so :class:`KeepEvery` can rely on them);
    the time clock starts at the first :meth:`should_save` call and restarts at every
    :meth:`mark_saved`. ``now`` is any monotonic clock in seconds (``time.monotonic()``).

    Raises:
        ValueError: a non-positive interval.
    """

    def __init__(self, every_steps: int | None = None, every_seconds: float | None = None):
        if (every_steps is not None and every_steps <= 0) or (
            every_seconds is not None and every_seconds <= 0
        ):
            raise ValueError(
                f"SavePolicy intervals must be > 0, got every_steps={every_steps}, "
                f"every_seconds={every_seconds}"
            )
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self._last_step: int | None = None
        self._last_time: float | None = None

    @classmethod
    def from_config(cls, cfg: CheckpointConfig) -> SavePolicy:
        return cls(cfg.every_steps, cfg.every_seconds)

    def should_save(self, global_step: int, now: float) -> bool:
        """Whether to save after ``global_step`` optimizer steps at time ``now`` (seconds)."""
        if global_step == self._last_step:
            return False  # already saved this step (e.g. the one we resumed from)
        if self._last_time is None:
            self._last_time = now
        if self.every_steps and global_step > 0 and global_step % self.every_steps == 0:
            return True
        return self.every_seconds is not None and now - self._last_time >= self.every_seconds

    def mark_saved(self, global_step: int, now: float) -> None:
        """Record a save (or a resume) at ``global_step``, time ``now`` (seconds)."""
        self._last_step = global_step
        self._last_time = now


class RetentionPolicy(ABC):
    """Chooses which checkpoints to keep."""

    @abstractmethod
    def keep(self, infos: list[CheckpointInfo]) -> set[int]:
        """global_steps to keep among ``infos`` (committed, valid, sorted by step)."""

    def __or__(self, other: RetentionPolicy) -> RetentionPolicy:
        return KeepUnion((self, other))


@dataclass(frozen=True)
class KeepLast(RetentionPolicy):
    """The ``k`` newest checkpoints."""

    k: int

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"KeepLast: k must be >= 0, got {self.k}")

    def keep(self, infos: list[CheckpointInfo]) -> set[int]:
        steps = sorted(i.global_step for i in infos)
        return set(steps[max(0, len(steps) - self.k) :]) if self.k else set()


@dataclass(frozen=True)
class KeepBest(RetentionPolicy):
    """The ``k`` checkpoints with the best ``summary["metrics"][metric]`` (ties: newer wins).

    Checkpoints without the metric, or with a non-finite / non-numeric value, are ignored.
    """

    metric: str
    k: int
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if self.k < 0 or self.mode not in ("min", "max"):
            raise ValueError(
                f"KeepBest: need k >= 0 and mode 'min'/'max', got k={self.k}, mode={self.mode!r}"
            )

    def keep(self, infos: list[CheckpointInfo]) -> set[int]:
        sign = 1.0 if self.mode == "min" else -1.0
        scored = []
        for i in infos:
            metrics = i.summary.get("metrics")
            v = metrics.get(self.metric) if isinstance(metrics, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                scored.append((sign * v, -i.global_step))
        return {-neg_step for _, neg_step in sorted(scored)[: self.k]}


@dataclass(frozen=True)
class KeepEvery(RetentionPolicy):
    """Checkpoints whose global_step is a multiple of ``n`` (long-term snapshots)."""

    n: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"KeepEvery: n must be > 0, got {self.n}")

    def keep(self, infos: list[CheckpointInfo]) -> set[int]:
        return {i.global_step for i in infos if i.global_step % self.n == 0}


@dataclass(frozen=True)
class KeepPinned(RetentionPolicy):
    """Checkpoints at the listed global_steps."""

    steps: frozenset[int]

    def __init__(self, steps: frozenset[int] | list[int] | set[int] | tuple[int, ...]) -> None:
        object.__setattr__(self, "steps", frozenset(steps))

    def keep(self, infos: list[CheckpointInfo]) -> set[int]:
        return {i.global_step for i in infos if i.global_step in self.steps}


@dataclass(frozen=True)
class KeepUnion(RetentionPolicy):
    """Keeps what any of ``policies`` keeps."""

    policies: tuple[RetentionPolicy, ...]

    def keep(self, infos: list[CheckpointInfo]) -> set[int]:
        return set().union(*(p.keep(infos) for p in self.policies))


def retention_from_config(cfg: CheckpointConfig) -> RetentionPolicy:
    """``keep_last`` | ``keep_best`` (if > 0) | ``keep_every_steps`` (if set) | ``pinned``."""
    policy: RetentionPolicy = KeepLast(cfg.keep_last)
    if cfg.keep_best:
        policy = policy | KeepBest(cfg.best_metric, cfg.keep_best, cfg.best_mode)
    if cfg.keep_every_steps:
        policy = policy | KeepEvery(cfg.keep_every_steps)
    if cfg.pinned:
        policy = policy | KeepPinned(cfg.pinned)
    return policy
