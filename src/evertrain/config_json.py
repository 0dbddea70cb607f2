"""A user's run config as plain JSON, for storing in checkpoints and comparing on resume.

Accepts a ``dict``, a dataclass instance, an OmegaConf ``DictConfig``/``ListConfig``
(interpolations resolved, via ``OmegaConf.to_container(cfg, resolve=True)``) or a pydantic
model (``model_dump(mode="json")``). The result holds only dicts with ``str`` keys, lists,
``str``, ``int``, finite ``float``, ``bool`` and ``None``: what ``json`` writes and reads back
unchanged, so a stored config compares equal to the one it was made from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection
from typing import Any


class ConfigTypeError(TypeError):
    """A config value cannot be stored as JSON (the message names the key path)."""


def config_to_json(config: Any) -> dict[str, Any]:
    """``config`` as a JSON tree (a new object; ``config`` is not changed).

    Raises:
        ConfigTypeError: ``config`` is not a mapping-like config, or a value at some key
            path is not JSON (a tuple is turned into a list; a set, an object, a NaN is not).
    """
    tree = _to_tree(config)
    if not isinstance(tree, dict):
        raise ConfigTypeError(
            f"config: a {type(config).__name__} is not a config; pass a dict, a dataclass, an "
            f"OmegaConf DictConfig or a pydantic model"
        )
    return _check(tree, "")  # type: ignore[no-any-return]


def refused_changes(
    diffs: list[tuple[str, Any, Any]], allow: bool | Collection[str] | Callable[[str], bool]
) -> list[tuple[str, Any, Any]]:
    """The ``(dotted key, old, new)`` differences a resume must refuse: none when
    ``allow`` is True, those whose key the predicate ``allow`` rejects, or those not under
    one of the dotted keys in ``allow`` (a key allows its sub-keys)."""
    if allow is True:
        return []
    if callable(allow):
        return [d for d in diffs if not allow(d[0])]
    keys = () if allow is False else tuple(allow)
    return [d for d in diffs if not any(d[0] == k or d[0].startswith(k + ".") for k in keys)]


def _to_tree(config: Any) -> Any:
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    dump = getattr(config, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    return config


def _check(node: Any, path: str) -> Any:
    where = path or "(top level)"
    if node is None or isinstance(node, (bool, int, str)):
        return node
    if isinstance(node, float):
        if not math.isfinite(node):
            raise ConfigTypeError(f"config: {where} is {node}; JSON has no NaN or infinity")
        return node
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if not isinstance(k, str):
                raise ConfigTypeError(
                    f"config: key {k!r} under {where} is a {type(k).__name__}; use str keys"
                )
            out[k] = _check(v, f"{path}.{k}" if path else k)
        return out
    if isinstance(node, (list, tuple)):
        return [_check(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return _check(dataclasses.asdict(node), path)
    raise ConfigTypeError(
        f"config: {where} is a {type(node).__name__}, which JSON cannot store; convert it "
        f"(e.g. to a str or a list) before passing the config"
    )
