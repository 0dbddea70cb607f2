"""What a resume checks before it restores anything: the stored config, the world size, the
library versions. A refused resume leaves the run directory as it was."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from evertrain import precision
from evertrain.checkpoint.ranks import saved_world_size
from evertrain.config_diff import diff_configs
from evertrain.config_json import refused_changes
from evertrain.versions import versions

log = logging.getLogger("evertrain")


class ResumeError(RuntimeError):
    """A run directory cannot be resumed as asked (the message says why and what to do)."""


def check_config(
    config: Any,
    stored: Any,
    path: Path,
    allow: bool | Collection[str] | Callable[[str], bool],
) -> None:
    """Warn about every difference between ``stored`` (the checkpoint's config) and
    ``config``; refuse those ``allow`` does not allow.

    Raises:
        ResumeError: a refused change (up to 5 named, with old and new values).
    """
    if config is None or stored is None:
        return
    diffs = diff_configs(stored, config)
    device = (config.get("train") or {}).get("device", "auto") if isinstance(config, dict) else None
    refused = [  # bf16 -> auto where bf16 is native (the examples' configs moved so)
        (k, old, new) for k, old, new in refused_changes(diffs, allow)
        if not (k == "train.precision" and isinstance(device, str)
                and precision.equivalent(old, new, device))
    ]  # fmt: skip
    for key, old, new in diffs:
        log.warning("config changed since %s: %s: %r -> %r", path.name, key, old, new)
    if refused:
        shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in refused[:5])
        raise ResumeError(
            f"{path}: config differs from the checkpoint's: {shown}; restore those values, "
            f"or pass allow_config_change=[...their keys] (True for any)"
        )


def check_world_size(
    states: Mapping[str, Any], path: Path, world_size: int, can_reshard: bool
) -> None:
    """Refuse a checkpoint of another number of processes unless per-rank state can be
    made for the new ranks (``can_reshard``: a ``rank_state`` was given).

    Raises:
        ResumeError: the numbers differ and per-rank state cannot be resharded.
    """
    saved = saved_world_size(states)
    if saved != world_size and not can_reshard:
        raise ResumeError(
            f"{path}: written by {saved} process(es), this run has {world_size}; a user "
            f"loop's data and RNG state are per rank and cannot be resharded: resume with "
            f"torchrun --nproc-per-node {saved}"
        )


def warn_versions(stored: Mapping[str, Any]) -> None:
    """Warn when torch (or another library but evertrain and transformers) differs from
    the checkpoint's: a resumed run may then not be bit-identical."""
    now = versions()
    differ = {
        k: (stored.get(k), now.get(k))
        for k in set(stored) | set(now)
        if k not in ("evertrain", "transformers") and stored.get(k) != now.get(k)
    }
    if differ:
        log.warning(
            "library versions differ from the checkpoint's (%s): the resumed run may not "
            "be bit-identical",
            ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(differ.items())),
        )


def warn_threads(saved: Any) -> None:
    """Warn when torch's intra-op thread count differs from the one the checkpoint was
    saved with (``summary.torch_threads``): CPU kernels may split sums differently, so the
    resumed run may differ from an uninterrupted one in the last bits."""
    import torch

    now = torch.get_num_threads()
    if isinstance(saved, int) and saved != now:
        log.warning(
            "the checkpoint was saved with %d torch threads, this process has %d: the resumed "
            "run may not be bit-identical on CPU (set model.num_threads: %d, or "
            "torch.set_num_threads(%d), for an exact resume)",
            saved, now, saved, saved,
        )  # fmt: skip
