"""Sharded state (FSDP2's ``fully_shard``, any DTensor) in pickle-free checkpoints.

A model sharded with ``torch.distributed.fsdp.fully_shard`` holds each parameter (and so
each optimizer moment) as a ``DTensor``: every rank has one slice. Saving it whole would
need an all-gather of the model and optimizer on every save, and a rank's memory for all
of it; torch's own answer, DCP, writes each rank's slices but records the layout in a
pickled ``.metadata`` file. Here each rank saves its slices as an ordinary per-rank owner of
format v1 (``model_rank1.safetensors`` ...; see ``docs/checkpoint-format.md``), and the
layout goes into the owner's JSON next to them:

``"shards": {"world_size": W, "rank": R, "layout": {path: {"shape": [global shape],
"offset": [global offset of this rank's slice]}}}``

where ``path`` is the tensor leaf's key path (``weights/layers.0.mlp.up_proj.weight``,
``state/layers.0.q_proj.weight/exp_avg``), as in the owner's tensor references.

Reading is the reverse, on any world size: :func:`merge_shards` puts the slices of every
rank back into whole tensors (the state of an unsharded run, so a DDP run resumes an FSDP2
checkpoint and the other way round), and :class:`ShardedOwner` cuts out the slice each
rank holds now (``distribute_tensor`` with ``src_data_rank=None``: no communication),
handing the inner owner the DTensors that torch's ``set_model_state_dict`` /
``set_optimizer_state_dict`` expect. Same world size: the same slices come back, so a
resume is bit-exact.

Limits: one slice per rank per tensor (FSDP2's ``Shard(0)`` on a 1-D mesh, or any
placement whose local part is one contiguous box; replicated DTensors are saved by every
rank and read from rank 0); at load every rank assembles one whole tensor at a time in CPU
memory, and reads the checkpoint's files of every rank.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evertrain.checkpoint.format import TENSOR_REF
from evertrain.state import StateError, check_version

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

SHARDS_KEY = "shards"


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds DTensor parameters (``fully_shard`` or tensor parallel)."""
    # torch.distributed.tensor costs ~0.5 s of every start (issue 14, time to first step),
    # and a model can hold a DTensor only once something imported it
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def reshard(model: torch.nn.Module) -> None:
    """Free the whole parameters FSDP2 gathered for a forward pass without backward: the
    root module keeps them after forward (it expects the backward), so after an evaluation
    its ``parameters()`` would be plain whole tensors, which a save would then export
    (safetensors' numpy view makes their storage non-resizable, and the next all-gather
    into it fails with "Trying to resize storage that is not resizable")."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _walk(tree: Any, fn: Callable[[str, Any], Any], path: str = "") -> Any:
    if isinstance(tree, Mapping):
        return {k: _walk(v, fn, f"{path}/{k}" if path else str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_walk(v, fn, f"{path}/{i}" if path else str(i)) for i, v in enumerate(tree)]
    return fn(path, tree)


def _leaves(tree: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _walk(tree, lambda p, leaf: out.__setitem__(p, leaf))
    return out


def _offset(t: DTensor) -> tuple[list[int], list[int]]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return list(shape), list(offset)


def local_shards(state: Mapping[str, Any], world_size: int, rank: int) -> dict[str, Any]:
    """``state`` with every DTensor leaf replaced by this rank's slice (a contiguous CPU
    tensor) and the layout under :data:`SHARDS_KEY` (see the module docstring).

    Raises:
        StateError: a DTensor whose local part is not the one box its placement implies.
    """
    from torch.distributed.tensor import DTensor

    layout: dict[str, Any] = {}

    def cut(path: str, leaf: Any) -> Any:
        if not isinstance(leaf, DTensor):
            return leaf
        local = leaf.to_local().detach()
        shape, offset = _offset(leaf)
        if list(local.shape) != shape:
            raise StateError(
                f"{path}: local shard {list(local.shape)} is not the slice its placement "
                f"{leaf.placements} implies ({shape}); only one box per rank is supported"
            )
        layout[path] = {"shape": list(leaf.shape), "offset": offset}
        # a copy: the writer's numpy view must never pin FSDP's own storage
        return local.to("cpu", copy=True).contiguous()

    out = _walk(state, cut)
    out[SHARDS_KEY] = {"world_size": world_size, "rank": rank, "layout": layout}
    return dict(out)


def is_shard_state(state: Any) -> bool:
    """Whether ``state`` is one rank's part of a sharded owner (has :data:`SHARDS_KEY`)."""
    return isinstance(state, Mapping) and SHARDS_KEY in state


def merge_shards(parts: list[Mapping[str, Any]], owner: str) -> dict[str, Any]:
    """The whole state from every rank's part (as :func:`local_shards` wrote them, in any
    order): each sharded leaf assembled into one tensor of its global shape; every other
    leaf taken from rank 0's part. The result has no :data:`SHARDS_KEY`.

    Raises:
        StateError: parts missing or duplicated, disagreeing on world size or layout, or
            slices that do not tile their tensor exactly (a damaged or mixed checkpoint).
    """
    by_rank = {int(p[SHARDS_KEY]["rank"]): p for p in parts}
    world = {int(p[SHARDS_KEY]["world_size"]) for p in parts}
    if len(world) != 1 or sorted(by_rank) != list(range(next(iter(world)))):
        raise StateError(
            f"{owner}: shards of ranks {sorted(by_rank)} for world sizes {sorted(world)}; "
            f"a sharded checkpoint needs the part of every rank that wrote it"
        )
    layouts = [by_rank[r][SHARDS_KEY]["layout"] for r in sorted(by_rank)]
    if any(set(lay) != set(layouts[0]) for lay in layouts):
        raise StateError(f"{owner}: the ranks' parts shard different tensors")
    leaves = [_leaves({k: v for k, v in by_rank[r].items() if k != SHARDS_KEY}) for r in by_rank]
    whole: dict[str, torch.Tensor] = {}
    for path, spec in layouts[0].items():
        first = leaves[0][path]
        full = torch.empty(spec["shape"], dtype=first.dtype)
        covered = 0
        for r, lay in enumerate(layouts):
            piece = leaves[r][path]
            index = tuple(
                slice(o, o + n) for o, n in zip(lay[path]["offset"], piece.shape, strict=True)
            )
            full[index] = piece
            covered += piece.numel()
        if covered != full.numel():
            raise StateError(
                f"{owner}: {path}: the ranks' slices hold {covered} elements, the tensor "
                f"{spec['shape']} has {full.numel()}"
            )
        whole[path] = full
    base = {k: v for k, v in by_rank[0].items() if k != SHARDS_KEY}
    return dict(_walk(base, lambda path, leaf: whole.get(path, leaf)))


class ShardedOwner:
    """Wraps an owner whose state holds DTensors (the model's weights, the optimizer's
    moments under FSDP2) so that each rank saves only its own slices (see the module
    docstring). The :class:`~evertrain.Checkpointer` saves it per rank and hands
    :meth:`load_state_dict` the merged, whole state (from any world size, sharded or not).

    Args:
        inner: the owner (``state_dict()`` with DTensor leaves; ``load_state_dict()``
            taking DTensors of the same placements).
        rank / world_size: this process's place in the group the DTensors are spread over.
    """

    sharded = True

    def __init__(self, inner: Any, rank: int, world_size: int) -> None:
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def state_dict(self) -> dict[str, Any]:
        return local_shards(self.inner.state_dict(), self.world_size, self.rank)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a whole (merged or unsharded) state: each tensor whose live counterpart is
        a DTensor is cut to this rank's slice first.

        Raises:
            StateError: ``state`` is one rank's part (merge every part first), or a tensor's
                shape differs from the live one's; the inner owner's own errors.
        """
        if is_shard_state(state):
            raise StateError(
                "sharded owner: got one rank's part; merge every rank's part with "
                "evertrain.sharded.merge_shards first"
            )
        from torch.distributed.tensor import DTensor, distribute_tensor

        lazy = state if isinstance(state, LazyShards) else None
        tree = lazy.base() if lazy is not None else dict(state)
        live = {p: t for p, t in _leaves(self.inner.state_dict()).items() if isinstance(t, DTensor)}

        def place(path: str, leaf: Any) -> Any:
            target = live.get(path)
            if isinstance(leaf, ShardRef):
                assert lazy is not None
                if target is None:  # not sharded here: the whole tensor
                    return lazy.read_box(path, [0] * len(leaf.shape), leaf.shape)
                if list(target.shape) != leaf.shape:
                    raise StateError(
                        f"{path}: checkpoint has shape {leaf.shape}, the model "
                        f"{list(target.shape)}; resume with the model that wrote it"
                    )
                shape, offset = _offset(target)
                local = lazy.read_box(path, offset, shape).to(target.to_local().device)
                return DTensor.from_local(
                    local,
                    target.device_mesh,
                    target.placements,
                    run_check=False,
                    shape=target.shape,
                    stride=target.stride(),
                )
            if target is None or not isinstance(leaf, torch.Tensor):
                return leaf
            if tuple(leaf.shape) != tuple(target.shape):
                raise StateError(
                    f"{path}: checkpoint has shape {list(leaf.shape)}, the model "
                    f"{list(target.shape)}; resume with the model that wrote it"
                )
            return distribute_tensor(  # a dtype mismatch is refused by the inner owner
                leaf,
                target.device_mesh,
                target.placements,
                src_data_rank=None,  # every rank has the whole tensor: no communication
            )

        self.inner.load_state_dict(_walk(tree, place))


class DCPOptimizerState:
    """Owner of an optimizer's state through torch's ``get_optimizer_state_dict`` /
    ``set_optimizer_state_dict`` (keyed by parameter FQN; DTensor moments under FSDP2).

    State: ``{"version": 1, "class": name, "param_groups": [...], "state": {fqn: {...}}}``,
    the layout of :class:`~evertrain.optim.OptimizerState`, so an FSDP2 checkpoint's
    merged optimizer state loads into a DDP run and the other way round.

    Args:
        model: the (sharded) model the optimizer trains.
        optimizer: its optimizer.
    """

    VERSION = 1

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd: Any = get_optimizer_state_dict(self.model, self.optimizer)
        groups = [
            {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
            for g in osd["param_groups"]
        ]
        return {
            "version": self.VERSION,
            "class": type(self.optimizer).__name__,
            "param_groups": groups,
            "state": {k: dict(v) for k, v in osd["state"].items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Apply a saved state (whole tensors or DTensors of this run's placements).

        Raises:
            StateError: another optimizer class, or parameter names torch refuses.
        """
        check_version(dict(state), "optimizer", self.VERSION)
        cls = type(self.optimizer).__name__
        if state["class"] != cls:
            raise StateError(f"optimizer: checkpoint has {state['class']}, this run has {cls}")
        groups = [
            {k: tuple(v) if k == "betas" else v for k, v in g.items()}
            for g in state["param_groups"]
        ]
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        try:
            set_optimizer_state_dict(
                self.model,
                self.optimizer,
                {"state": dict(state["state"]), "param_groups": groups},
                options=StateDictOptions(strict=True),
            )
        except (KeyError, ValueError, RuntimeError) as e:
            raise StateError(
                f"optimizer: the checkpoint's state does not fit this model's parameters "
                f"({type(e).__name__}: {e}); resume with the model that wrote it"
            ) from e


def merge_sharded(states: dict[str, Any]) -> None:
    """Replace, in a checkpoint's owner states (as read, every rank's owners included),
    each sharded owner's rank-0 part under its plain name by the merged whole state
    (:func:`merge_shards` over ``name``, ``name_rank1``, ...).

    Raises:
        StateError: as :func:`merge_shards`.
    """
    from evertrain.checkpoint.ranks import rank_owner

    for name in [n for n, s in states.items() if is_shard_state(s) and s[SHARDS_KEY]["rank"] == 0]:
        world = int(states[name][SHARDS_KEY]["world_size"])
        missing = [rank_owner(name, r) for r in range(world) if rank_owner(name, r) not in states]
        if missing:
            raise StateError(f"{name}: the checkpoint lacks the sharded parts {missing}")
        states[name] = merge_shards([states[rank_owner(name, r)] for r in range(world)], name)


class ShardRef:
    """A sharded tensor leaf of a :class:`LazyShards` tree, read only when placed."""

    def __init__(self, path: str, shape: list[int]) -> None:
        self.path, self.shape = path, shape


class LazyShards:
    """A sharded owner's parts of every rank in a checkpoint, read lazily: the JSON trees at
    once (small), of the tensors only the box each rank needs (safetensors slices), so a
    resharding resume reads about its own share of the bytes, not every rank's.

    Integrity: the caller has verified the whole checkpoint (every file's size and XXH3-128
    digest, :func:`~evertrain.checkpoint.ranks.choose_checkpoint`) just before; the slices
    are read from those files unhashed.

    Args:
        directory: the ``step-N`` directory.
        name: the owner (``model``, ``optimizer``...).
        world_size: ranks that wrote it (``shards.world_size`` of rank 0's part).
    """

    def __init__(self, directory: Path, name: str, world_size: int) -> None:
        from evertrain.checkpoint.ranks import rank_owner

        self.name = name
        self.parts: list[tuple[dict[str, Any], dict[str, Any], Path]] = []
        for r in range(world_size):
            owner = rank_owner(name, r)
            tree = json.loads((directory / f"{owner}.json").read_text(encoding="utf-8"))
            layout = tree.get(SHARDS_KEY, {}).get("layout")
            if layout is None or tree[SHARDS_KEY].get("rank") != r:
                raise StateError(f"{directory / owner}.json: not rank {r}'s sharded part")
            self.parts.append((tree, layout, directory / f"{owner}.safetensors"))
        self._open: dict[int, Any] = {}

    def _file(self, rank: int) -> Any:
        from safetensors import safe_open

        if rank not in self._open:
            self._open[rank] = safe_open(str(self.parts[rank][2]), framework="pt")
        return self._open[rank]

    def base(self) -> dict[str, Any]:
        """Rank 0's tree: sharded leaves as :class:`ShardRef`, other tensors read whole."""
        tree, layout, _ = self.parts[0]

        def leaf(node: Any, path: str) -> Any:
            if isinstance(node, dict) and set(node) == {TENSOR_REF}:
                if path in layout:
                    return ShardRef(path, list(layout[path]["shape"]))
                return self._file(0).get_tensor(node[TENSOR_REF])
            if isinstance(node, dict):
                return {k: leaf(v, f"{path}/{k}" if path else k) for k, v in node.items()}
            if isinstance(node, list):
                return [leaf(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(node)]
            return node

        return dict(leaf({k: v for k, v in tree.items() if k != SHARDS_KEY}, ""))

    def read_box(self, path: str, offset: list[int], shape: list[int]) -> torch.Tensor:
        """The box ``[offset, offset + shape)`` of sharded tensor ``path``, from the slices
        of the ranks that hold part of it.

        Raises:
            StateError: the slices leave part of the box uncovered.
        """
        out: torch.Tensor | None = None
        covered = 0
        for r, (_, layout, _) in enumerate(self.parts):
            sl = self._file(r).get_slice(path)
            extent = list(sl.get_shape())
            lo = layout[path]["offset"]
            src, dst = [], []
            for o, n, p, e in zip(offset, shape, lo, extent, strict=True):
                a, b = max(o, p), min(o + n, p + e)
                if a >= b:
                    break
                src.append(slice(a - p, b - p))
                dst.append(slice(a - o, b - o))
            else:
                piece = sl[tuple(src)] if src else sl[:]
                if out is None:
                    out = torch.empty(shape, dtype=piece.dtype)
                out[tuple(dst)] = piece
                covered += piece.numel()
        if out is None:  # an empty box (a rank holding no rows of a small tensor)
            out = torch.empty(
                shape, dtype=self._file(0).get_slice(path)[tuple(slice(0, 0) for _ in shape)].dtype
            )
        if covered != out.numel():
            raise StateError(f"{self.name}: {path}: the slices cover {covered} of {out.numel()}")
        return out


def lazy_sharded(directory: Path, names: Collection[str]) -> dict[str, LazyShards]:
    """The owners among ``names`` that checkpoint ``directory`` holds sharded (their rank-0
    JSON has :data:`SHARDS_KEY`), as :class:`LazyShards`."""
    out = {}
    for name in names:
        path = directory / f"{name}.json"
        if not path.is_file():
            continue
        head = json.loads(path.read_text(encoding="utf-8")).get(SHARDS_KEY)
        if head is not None:
            out[name] = LazyShards(directory, name, int(head["world_size"]))
    return out
