"""``train.parallel: fsdp``: shard a model with FSDP2 (``torch.distributed.fsdp.fully_shard``,
the per-parameter DTensor API) before training.

Each transformer block (the classes a Hugging Face model lists in ``_no_split_modules``) is
one FSDP unit, the root module another (embeddings, final norm, a tied LM head): the usual
wrapping (torchtitan, the HF Trainer's FSDP2 auto-wrap), so one block's full parameters exist
at a time. Checkpoints of the sharded model hold each rank's slices (:mod:`evertrain.sharded`)
and resume on any world size, sharded or not.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("evertrain")


def block_classes(model: torch.nn.Module) -> set[str]:
    """The class names of ``model``'s transformer blocks (``_no_split_modules`` of the first
    submodule declaring it: the Hugging Face model, also under PEFT and torch.compile)."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def shard_model(model: torch.nn.Module, world_size: int, *, bf16: bool = False) -> int:
    """``fully_shard`` every transformer block of ``model`` and then ``model`` itself, in
    place, over all ``world_size`` ranks of the default process group (a 1-D mesh on the
    model's device type).

    Args:
        model: the model (parameters on this rank's device, identical on every rank).
        world_size: ranks to shard over (the default group's size).
        bf16: compute in bfloat16 with float32 gradient reduction (FSDP2's
            ``MixedPrecisionPolicy``); parameters stay float32, so the optimizer steps and
            the checkpoint are float32.

    Returns:
        The number of FSDP units (blocks + the root).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size,))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    names = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    log.info(
        "FSDP2: %d block(s) of %s and the root sharded over %d ranks",
        len(blocks),
        "/".join(sorted(names)) or "no known block class",
        world_size,
    )
    return len(blocks) + 1


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on transformers' activation (gradient) checkpointing of ``model``'s blocks,
    non-reentrant: works with frozen inputs (LoRA) and with FSDP2, and restores the RNG
    state for each recompute, so dropout draws the same masks and the result is unchanged.

    Raises:
        evertrain.config.ConfigError: the model does not support it (not a Hugging Face
            model with ``gradient_checkpointing_enable``).
    """
    from evertrain.config import ConfigError

    target = model
    while not hasattr(target, "gradient_checkpointing_enable") and hasattr(target, "model"):
        target = target.model  # type: ignore[assignment]
    enable = getattr(target, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(target, "supports_gradient_checkpointing", True):
        raise ConfigError(
            f"train.gradient_checkpointing: a {type(model).__name__} does not support it; "
            "set it to false"
        )
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
