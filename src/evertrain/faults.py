"""Fault injection for crash tests: kill this process with SIGKILL at a named point.

Set ``EVERTRAIN_FAULT=point@step`` (several separated by commas), e.g.
``micro@12:1`` (after micro-batch 1 of optimizer step 12), ``save@40`` (while checkpoint 40
is half written), ``commit@40`` (manifest written, directory not yet renamed),
``epoch@2`` (right after the step that entered epoch 2); ``trainerror@N`` raises instead
(:func:`maybe_raise`). The crash
tests use it to hit windows too narrow for an external ``kill -9`` to land on reliably.
Unset (the default), :func:`maybe_crash` costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("EVERTRAIN_FAULT", "")
_POINTS = {p.strip() for p in _SPEC.split(",") if p.strip()}


def poisoned(step: int, kind: str = "nan") -> bool:
    """True if ``nan@step`` (or ``gradinf@step``) was requested: the trainer then makes that
    step's loss NaN (or, with a finite loss, its gradients infinite): the divergence guard's
    tests; a real divergence needs no help."""
    return bool(_POINTS) and f"{kind}@{step}" in _POINTS


def maybe_raise(point: str, key: int) -> None:
    """Raise a RuntimeError if ``point@key`` was requested (an unexpected error of the code
    that handles a file, e.g. ``trainerror@1`` when the daemon starts training file 1)."""
    if _POINTS and f"{point}@{key}" in _POINTS:
        raise RuntimeError(f"injected error {point}@{key} (EVERTRAIN_FAULT)")


def maybe_crash(point: str, step: int, sub: int | None = None) -> None:
    """SIGKILL this process if ``point@step`` (or ``point@step:sub``) was requested."""
    if not _POINTS:
        return
    key = f"{point}@{step}" if sub is None else f"{point}@{step}:{sub}"
    if key in _POINTS:
        os.kill(os.getpid(), signal.SIGKILL)
