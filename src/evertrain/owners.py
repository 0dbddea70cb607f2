"""State owners for objects a user brings: any ``nn.Module``, torch optimizer, LR scheduler,
and anything with ``state_dict()``/``load_state_dict()`` (a torchdata ``StatefulDataLoader``,
a loss tracker).

Each wraps its object in the owner contract of :mod:`evertrain.state` (a versioned state
dict whose leaves are JSON values or CPU tensors), so :class:`evertrain.Checkpointer` can
store it pickle-free. Names never depend on wrappers: weights and optimizer moments are
keyed by the fully qualified parameter names that torch's own
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` reports, which strips
``DistributedDataParallel``'s ``module.`` and ``torch.compile``'s ``_orig_mod.`` (so a
checkpoint of a compiled DDP model loads into a plain one and back).

Thread-safety: none; call between optimizer steps, from the training thread.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from evertrain.optim import OptimizerState
from evertrain.state import StateError, check_tensors_fit, check_version


def is_stateful(obj: Any) -> bool:
    """Whether ``obj`` has callable ``state_dict`` and ``load_state_dict`` methods."""
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def check_loader_rng(data: Any) -> None:
    """Refuse a ``torch.utils.data.DataLoader`` (``StatefulDataLoader`` included) that would
    make a resumed run differ from an uninterrupted one.

    Each ``iter()`` of a DataLoader draws a seed from its ``generator``, or from the global
    torch RNG when it has none; a resumed run calls ``iter()`` at another point of the RNG
    stream than the uninterrupted run did, so dropout masks would differ after a resume.
    A shuffling sampler sharing the loader's generator is refused for the same reason
    (the restored shuffle state and the seed draws interleave differently).

    Raises:
        TypeError: ``generator=`` missing, or shared with the sampler; the message says
            what to pass.
    """
    if not isinstance(data, torch.utils.data.DataLoader):
        return
    if data.generator is None:
        raise TypeError(
            "data: the DataLoader has no generator=, so every iter() draws from the global "
            "torch RNG and a resumed run would get other dropout masks; pass "
            "generator=torch.Generator()"
        )
    if getattr(data.sampler, "generator", None) is data.generator:
        raise TypeError(
            "data: the DataLoader's sampler shares its generator; give the sampler its own, "
            "e.g. sampler=torchdata.stateful_dataloader.sampler.RandomSampler(ds, "
            "generator=torch.Generator().manual_seed(seed)), generator=torch.Generator()"
        )


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # full_state_dict/cpu_offload stay off: a plain or DDP model's state is already whole on
    # every rank, and these are views of the live parameters (no copy per save).
    # Imported here: torch's DCP package costs ~0.6 s of every start (issue 14, first step)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=StateDictOptions()))


def named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameter name (as stored in checkpoints) -> the live parameter.

    A tied weight (one parameter under two names) maps from its first name only.
    """
    by_storage: dict[tuple[int, tuple[int, ...]], torch.nn.Parameter] = {}
    for p in model.parameters():
        by_storage.setdefault((p.data_ptr(), tuple(p.shape)), p)
    out: dict[str, torch.nn.Parameter] = {}
    taken: set[int] = set()
    for name, t in _model_tensors(model).items():
        hit = by_storage.get((t.data_ptr(), tuple(t.shape)))
        if hit is not None and id(hit) not in taken:
            out[name] = hit
            taken.add(id(hit))
    return out


class ModuleState:
    """Owner of every parameter and persistent buffer of a user's ``nn.Module``.

    State: ``{"version": 1, "weights": {name: tensor}}``, names as in the unwrapped
    module's ``state_dict()`` (a tied weight is stored under each of its names). Loading
    copies in place, so parameters keep their identity and an optimizer built on them
    stays valid.

    Args:
        model: the model, plain or wrapped in ``DistributedDataParallel`` and/or
            ``torch.compile`` (any nesting).
        name: the owner's name in error messages.
    """

    VERSION = 1

    def __init__(self, model: torch.nn.Module, name: str = "model") -> None:
        self.model, self.name = model, name

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "weights": {n: t.detach().cpu() for n, t in _model_tensors(self.model).items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy the saved weights into the model.

        Raises:
            StateError: names missing or unexpected (up to 5 of each), or a shape or dtype
                differing from the model's (no silent cast: it would break exactness). The
                model is unchanged when this is raised.
        """
        check_version(state, self.name, self.VERSION)
        saved: dict[str, Any] = state["weights"]
        fix = "resume with the model that wrote it, or use a new run directory"
        check_tensors_fit(self.name, saved, _model_tensors(self.model), fix)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, dict(saved), options=StateDictOptions(strict=True))


def optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module | None,
    params: dict[str, torch.nn.Parameter] | None = None,
    name: str = "optimizer",
) -> OptimizerState:
    """The owner of ``optimizer``'s state, keyed by parameter name: ``params`` (name ->
    parameter, e.g. a PEFT adapter's names), default ``model``'s :func:`named_parameters`.

    Raises:
        TypeError: no model was given (moments are stored by parameter name), or the
            optimizer holds a parameter that is not one of the model's.
    """
    if model is None and params is None:
        raise TypeError(
            f"{name}: pass model= too: optimizer state is stored by parameter name, so that a "
            f"changed model is refused on resume instead of getting the wrong moments"
        )
    try:
        named = params if params is not None else named_parameters(model)  # type: ignore[arg-type]
        return OptimizerState(optimizer, named)
    except ValueError:
        raise TypeError(
            f"{name}: the optimizer holds a parameter that is not in model=; build it from "
            f"model.parameters()"
        ) from None


def model_owner(model: torch.nn.Module) -> Any:
    """The owner of ``model``'s weights: :class:`ModuleState`, wrapped in a
    :class:`~evertrain.sharded.ShardedOwner` when the model is sharded (``fully_shard``),
    so each rank saves only its slices."""
    from evertrain.sharded import ShardedOwner, is_sharded_model

    if is_sharded_model(model):
        return ShardedOwner(ModuleState(model), *_rank_and_size())
    return ModuleState(model)


def optimizer_owner(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module | None,
    params: dict[str, torch.nn.Parameter] | None = None,
) -> Any:
    """The owner of ``optimizer``'s state: :func:`optimizer_state`, or for a sharded
    model torch's ``get/set_optimizer_state_dict`` per rank (:mod:`evertrain.sharded`).

    Raises:
        TypeError: as :func:`optimizer_state`.
    """
    from evertrain.sharded import DCPOptimizerState, ShardedOwner, is_sharded_model

    if model is not None and is_sharded_model(model):
        # torch's helpers: they create the moments of a fresh optimizer as DTensors before a
        # load (which the load needs for their placements), and name them by FQN
        return ShardedOwner(DCPOptimizerState(model, optimizer), *_rank_and_size())
    return optimizer_state(optimizer, model, params)


def sharded_if_needed(owner: Any, model: torch.nn.Module) -> Any:
    """``owner`` (of ``model``'s weights) wrapped in a :class:`~evertrain.sharded.ShardedOwner`
    when ``model`` is sharded and ``owner`` is not already."""
    from evertrain.sharded import ShardedOwner, is_sharded_model

    if getattr(owner, "sharded", False) or not is_sharded_model(model):
        return owner
    return ShardedOwner(owner, *_rank_and_size())


def _rank_and_size() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ObjectState:
    """Owner wrapping any object with ``state_dict()``/``load_state_dict()``.

    State: ``{"version": 1, "class": <qualified class name>, "state": obj.state_dict()}``.
    The wrapped state must be JSON values and tensors only (checked when a checkpoint is
    written, with the owner and key path in the error).

    Args:
        obj: the object (an LR scheduler, a ``StatefulDataLoader``, a tracker, ...).
        name: the owner's name in checkpoints and error messages.
    """

    VERSION = 1

    def __init__(self, obj: Any, name: str) -> None:
        if not is_stateful(obj):
            raise TypeError(
                f"{name}: a {type(obj).__name__} has no state_dict()/load_state_dict(); pass an "
                f"object that has both (wrap plain values in a small class)"
            )
        self.obj, self.name = obj, name

    @property
    def class_name(self) -> str:
        cls = type(self.obj)
        return f"{cls.__module__}.{cls.__qualname__}"

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, "class": self.class_name, "state": self.obj.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Hand the saved state to the object.

        Raises:
            StateError: the checkpoint's object was of another class, or the object's own
                ``load_state_dict`` refused the state (its message follows the owner's name).
        """
        check_version(state, self.name, self.VERSION)
        if state["class"] != self.class_name:
            raise StateError(
                f"{self.name}: the checkpoint holds the state of a {state['class']}, this run "
                f"passes a {self.class_name}; pass the same class, or use a new run directory"
            )
        try:
            self.obj.load_state_dict(state["state"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise StateError(
                f"{self.name}: the {self.class_name} refused the checkpoint's state "
                f"({type(e).__name__}: {e}); pass one built like the run that wrote it"
            ) from e
