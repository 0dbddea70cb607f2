"""Errors raised while resolving, converting or loading a model."""

from __future__ import annotations


class ModelSourceError(ValueError):
    """``model.source`` cannot be loaded; the message names the path and what to do."""


class ModelCacheError(RuntimeError):
    """A converted-model cache could not be built or verified (nothing was published)."""
