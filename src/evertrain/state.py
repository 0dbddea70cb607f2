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
