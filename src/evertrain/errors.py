"""Errors of a training run as a whole (importable without torch, for the CLI)."""


class DivergedError(RuntimeError):
    """A step's loss or gradient norm was not finite and ``train.on_nonfinite`` is
    ``"stop"``: the step was not applied and nothing was saved from it (the message gives
    the global_step and the last good checkpoint). The CLI exits 3."""
