"""The states a resume hands each owner: read from the chosen checkpoint (sharded owners
lazily, each rank its own box), checked against the run (config, world size, library
versions, threads), and picked per rank."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from evertrain.checkpoint import CheckpointInfo, CheckpointManager
from evertrain.checkpoint.ranks import rank_owner
from evertrain.resume_checks import check_config, check_world_size, warn_threads, warn_versions
from evertrain.sharded import lazy_sharded, merge_sharded
from evertrain.state import StateError

RANK_SUFFIX = re.compile(r"_rank[0-9]+$")


def owner_states(
    manager: CheckpointManager,
    info: CheckpointInfo,
    owners: Mapping[str, Any],
    per_rank: Sequence[str],
    group: Any,
    rank_state: Callable[[str, Mapping[str, Any]], dict[str, Any]] | None,
    config: Any,
    allow_config_change: Any,
) -> dict[str, Any]:
    """``{owner name: its state}`` from checkpoint ``info`` for this rank of ``group``.

    Raises:
        ResumeError: the stored config differs in keys not allowed to change, or the world
            size differs from the checkpoint's (see :mod:`evertrain.resume_checks`).
        StateError: the checkpoint holds no state for an owner.
        CorruptCheckpointError: a file is damaged.
    """
    # a sharded owner of this run reads only its own box of each tensor (LazyShards);
    # anything else sharded (an FSDP2 checkpoint resumed unsharded) is merged whole
    lazy = lazy_sharded(info.path, [n for n, o in owners.items() if getattr(o, "sharded", False)])
    states: dict[str, Any] = manager.load(
        info, (lambda o: RANK_SUFFIX.sub("", o) not in lazy) if lazy else None
    ).states
    merge_sharded(states)
    states.update(lazy)
    check_config(config, states.get("config", {}).get("config"), info.path,
                 allow_config_change)  # fmt: skip
    check_world_size(states, info.path, group.world_size, rank_state is not None)
    warn_versions(states.get("versions", {}))
    warn_threads(info.summary.get("torch_threads"))
    sharded = {n for n, o in owners.items() if getattr(o, "sharded", False)}
    for name in per_rank:
        key = rank_owner(name, group.rank)
        if name not in sharded and key not in states and rank_state is not None:
            states[key] = rank_state(name, states)
    keys = {
        name: rank_owner(name, group.rank) if name in per_rank and name not in sharded else name
        for name in owners
    }
    for name, key in keys.items():
        if key not in states:
            raise StateError(
                f"{name}: {info.path} holds no state for it (it was written without "
                f"{name}=); pass the same owners as the run that wrote it"
            )
    return {name: states[key] for name, key in keys.items()}
