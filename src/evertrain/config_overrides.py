"""``--set dotted.key=value`` overrides on a raw config (values read as YAML 1.2)."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from evertrain.config_yaml import UniqueKeyLoader
from evertrain.errors import ConfigError


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``--set dotted.key=value`` (value read as YAML: ``3``, ``1e-4``, ``[a, b]``).

    Raises:
        ConfigError: no ``=``, an empty key, or a value that is not valid YAML.
    """
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. train.lr=1e-4")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else None  # noqa: S506
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``dotted.key=value`` applied."""
    out = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out
