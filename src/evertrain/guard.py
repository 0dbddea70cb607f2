"""The divergence guard: what a step with a NaN/inf loss or gradient norm leads to.

Such a step is never applied (the trainer zeroes its gradients instead of stepping) and
nothing is saved from it. Then, per ``train.on_nonfinite``:

- ``stop`` (default): :class:`~evertrain.errors.DivergedError` naming the step and the last
  good checkpoint (``evertrain train`` and ``watch`` exit 3);
- ``skip``: the step's batches are dropped; the step counts as taken (global_step, the LR
  schedule and the data position move on) and is logged as skipped;
- ``rollback``: as ``skip``, and the model and optimizer are also reloaded from the newest
  checkpoint that verifies, so the updates that led up to the divergence are undone too
  (the remedy of large pretraining runs, e.g. PaLM, Chowdhery et al. 2022, section 5.1:
  restart from a checkpoint before the spike and skip the batches that led to it). The
  steps since that checkpoint count as skipped; the data position, RNG, global_step and
  LR schedule are *not* rolled back, so the batches of those steps are never seen again
  and the run still ends where it was planned to. :data:`MAX_ROLLBACKS` rollbacks to the
  same checkpoint raise :class:`~evertrain.errors.DivergedError` (the model diverges
  whatever the data: lower the LR).

Exactness is kept: the guard's decisions are a function of the (deterministic) losses, and
everything it changes is in the owners the next checkpoint saves; a run killed after a
rollback resumes from the checkpoint it rolled back to (or a later one) and repeats it.
"""

from __future__ import annotations

import logging
from typing import Any

from evertrain.errors import DivergedError
from evertrain.sharded import merge_sharded

log = logging.getLogger("evertrain")

POLICIES = ("stop", "skip", "rollback")
MAX_ROLLBACKS = 3
ROLLBACK_OWNERS = ("model", "optimizer")


class DivergenceGuard:
    """Applies ``policy`` (one of :data:`POLICIES`) to non-finite steps of one trainer.

    Args:
        policy: ``"stop"``, ``"skip"`` or ``"rollback"`` (see the module docstring).
        ckpt: the trainer's :class:`~evertrain.Checkpointer` (where a rollback reloads from).

    Raises:
        ValueError: an unknown policy.
    """

    def __init__(self, policy: str, ckpt: Any) -> None:
        if policy not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.ckpt = policy, ckpt
        self._rollbacks: dict[int, int] = {}  # checkpoint global_step -> rollbacks to it

    def nonfinite(self, global_step: int, loss: float, norm: float) -> int:
        """Handle optimizer step ``global_step`` (1-based, not applied) whose loss or
        gradient norm is not finite.

        Returns:
            Optimizer steps whose updates are now undone: 1 for ``skip``, the steps since
            the checkpoint reloaded for ``rollback`` (this one included).

        Raises:
            DivergedError: ``stop``; or ``rollback`` with no checkpoint to go back to, or
                :data:`MAX_ROLLBACKS` rollbacks to the same one. Collective under torchrun
                (every rank sees the same reduced loss, so all decide alike).
        """
        what = f"global_step {global_step}: loss {loss}, gradient norm {norm}"
        last = self.ckpt.last_checkpoint
        if self.policy == "stop":
            raise DivergedError(
                f"diverged at {what}; the step was not applied and nothing was saved from it. "
                f"Last good checkpoint: {last or 'none'}. Lower train.lr, check the data, or "
                f"set train.on_nonfinite: skip (or rollback)"
            )
        if self.policy == "skip":
            log.warning("non-finite %s: the step's batches are skipped (no update)", what)
            return 1
        return self._rollback(global_step, what)

    def _rollback(self, global_step: int, what: str) -> int:
        from evertrain.checkpoint.ranks import choose_checkpoint

        ckpt = self.ckpt
        ckpt.wait()  # a save in flight is the newest good state once committed
        info = choose_checkpoint(ckpt.run_dir / "checkpoints", ckpt.group, log.warning)
        if info is None or info.global_step >= global_step:
            raise DivergedError(
                f"diverged at {what}; train.on_nonfinite: rollback has no checkpoint before "
                f"this step to go back to. Save earlier (checkpoint.every_steps) or lower "
                f"train.lr"
            )
        done = self._rollbacks.get(info.global_step, 0)
        if done >= MAX_ROLLBACKS:
            raise DivergedError(
                f"diverged at {what}, after {done} rollbacks to {info.path} "
                f"(global_step {info.global_step}); the model diverges whatever the data: "
                f"lower train.lr"
            )
        self._rollbacks[info.global_step] = done + 1
        states = ckpt.manager.load(info).states
        merge_sharded(states)  # FSDP2: every rank's slices -> whole tensors
        for name in ROLLBACK_OWNERS:
            if name in ckpt.owners:
                ckpt.owners[name].load_state_dict(states[name])
        undone = global_step - info.global_step
        log.warning(
            "non-finite %s: rolled model and optimizer back to %s (global_step %d); the "
            "batches of the %d step(s) since are skipped",
            what,
            info.path.name,
            info.global_step,
            undone,
        )
        return undone
