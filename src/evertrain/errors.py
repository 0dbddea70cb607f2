"""Errors of a training run as a whole (importable without torch, for the CLI)."""


class ConfigError(ValueError):
    """A configuration is invalid; the message names the key path and the reason.
    (Defined here, below every config module; ``evertrain.config`` re-exports it.)"""


class DivergedError(RuntimeError):
    """A step's loss or gradient norm was not finite and ``train.on_nonfinite`` is
    ``"stop"``: the step was not applied and nothing was saved from it (the message gives
    the global_step and the last good checkpoint). The CLI exits 3."""
