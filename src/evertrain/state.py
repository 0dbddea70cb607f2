"""The contract every owner of training state implements.

Modelled on torchtitan's components: one owner per piece of state, each with
``state_dict()`` / ``load_state_dict()``. A state dict is a nested ``dict`` whose leaves are
JSON scalars (``None``, ``bool``, ``int``, ``float``, ``str``), lists of them, or CPU
``torch.Tensor`` objects; the checkpoint writer puts tensors into safetensors files and
everything else into JSON, so nothing is ever pickled.

Every state dict carries an integer ``"version"``; loading a different version raises
:class:`StateVersionError` instead of misapplying the state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


class StateError(ValueError):
    """A saved state cannot be applied to the current object (what and why in the message)."""


class StateVersionError(StateError):
    """A saved state was written by a different version of its owner."""


@runtime_checkable
class Stateful(Protocol):
    """An owner of one piece of training state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_version(state: dict[str, Any], owner: str, expected: int) -> None:
    """Raise :class:`StateVersionError` unless ``state["version"] == expected``.

    Args:
        state: a state dict read from a checkpoint.
        owner: the owner's name, used in the message (e.g. ``"optimizer"``).
        expected: the version this code writes and reads.
    """
    found = state.get("version")
    if found != expected:
        raise StateVersionError(
            f"{owner} state has version {found!r}, this evertrain reads version {expected}; "
            f"resume with the evertrain version that wrote the checkpoint, or start a new run"
        )


def check_tensors_fit(
    owner: str, saved: Mapping[str, Any], target: Mapping[str, Any], fix: str
) -> None:
    """Raise :class:`StateError` unless ``saved`` (name -> tensor, from a checkpoint) has
    exactly ``target``'s names (the live tensors), each with the same shape and dtype: no
    silent cast or partial load, either would break exactness.

    Args:
        owner: the owner's name, first in the message.
        saved, target: name -> tensor.
        fix: what the user should do, ending the message.

    Raises:
        StateError: names missing or unexpected (up to 5 of each), or the first tensor whose
            shape or dtype differs.
    """
    missing, unexpected = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    if missing or unexpected:
        raise StateError(
            f"{owner}: the checkpoint's weights do not fit this model: missing "
            f"{missing[:5]}{' …' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{' …' if len(unexpected) > 5 else ''}; {fix}"
        )
    for n, dst in target.items():
        src = saved[n]
        if src.shape != dst.shape or src.dtype != dst.dtype:
            raise StateError(
                f"{owner}: {n} is {src.dtype}{list(src.shape)} in the checkpoint but "
                f"{dst.dtype}{list(dst.shape)} in the model; {fix}"
            )
