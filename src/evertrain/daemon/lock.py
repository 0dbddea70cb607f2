"""The run directory's lock (see :mod:`evertrain.runlock`): the daemon takes it for its
whole life, and so does every other writer of a run directory."""

from evertrain.runlock import RunLock, RunLockedError, describe_holder

__all__ = ["RunLock", "RunLockedError", "describe_holder"]
