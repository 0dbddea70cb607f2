"""Trainable weights under their original names, for checkpoints and PEFT adapters.

Names never depend on how the model is wrapped: ``torch.compile``'s ``_orig_mod.`` is
stripped, and a ``peft.PeftModel`` uses the names ``peft.get_peft_model_state_dict`` gives
(adapter name removed), i.e. the keys of a PEFT ``adapter_model.safetensors``.
"""

from __future__ import annotations

from typing import Any

import torch

from evertrain.state import StateError, check_tensors_fit

_COMPILE_PREFIX = "_orig_mod."


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module behind any number of ``torch.compile`` wrappers (``OptimizedModule``)."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod  # type: ignore[assignment]
    return model


def _strip(name: str) -> str:
    # A submodule compiled in place (``layer = torch.compile(layer)``) puts ``_orig_mod.``
    # inside the name; keeping it would make checkpoints depend on the compile setting.
    return name.replace("." + _COMPILE_PREFIX, ".").removeprefix(_COMPILE_PREFIX)


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` (after unwrapping ``torch.compile``) is a ``peft.PeftModel``."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(unwrap(model), PeftModel)


def _peft_params(model: Any) -> dict[str, torch.nn.Parameter]:
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: "auto" would add frozen base embeddings to the adapter
    # when they are LoRA targets, and those are not trained.
    exported = get_peft_model_state_dict(model, save_embedding_layers=False)
    by_storage: dict[Any, tuple[str, torch.nn.Parameter]] = {}
    sharded = _has_dtensors(model)
    adapter = f".{getattr(model, 'active_adapter', 'default')}."
    for pname, p in model.named_parameters():
        # FSDP2's DTensors: an empty local shard has no address, so match by PEFT's
        # naming (the adapter name dropped) instead of by storage
        key = pname.replace(adapter, ".") if sharded else (p.data_ptr(), tuple(p.shape))
        by_storage[key] = (pname, p)
    out: dict[str, torch.nn.Parameter] = {}
    for key, t in exported.items():
        hit = by_storage.get(key if sharded else (t.data_ptr(), tuple(t.shape)))
        if hit is None:
            # PEFT returned a copy instead of a view of the parameter; loading into it
            # would silently not update the model.
            raise StateError(
                f"model: PEFT adapter tensor {key!r} is not a view of a model parameter; "
                f"this peft version is not supported by evertrain"
            )
        out[_strip(key)] = hit[1]
    trainable = {pname for pname, p in model.named_parameters() if p.requires_grad}
    ids = {id(p) for p in out.values()}
    covered = {pname for pname, p in model.named_parameters() if id(p) in ids}
    if trainable != covered:
        raise StateError(
            f"model: trainable parameters outside the PEFT adapter "
            f"{sorted(trainable - covered)[:5]} or adapter tensors that are frozen "
            f"{sorted(covered - trainable)[:5]}; with LoRA only the adapter may be trained"
        )
    return out


def _has_dtensors(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    base = unwrap(model)
    if is_peft_model(base):
        return dict(_peft_params(base))
    out: dict[str, torch.Tensor] = {}
    # named_parameters() lists a tied weight (lm_head = embed_tokens) once; state_dict()
    # would list it twice and safetensors refuses tensors that share memory.
    for n, p in base.named_parameters():
        out[_strip(n)] = p
    persistent = set(base.state_dict(keep_vars=True))
    for n, b in base.named_buffers():
        if n in persistent:  # non-persistent buffers (RoPE inv_freq) are recomputed
            out[_strip(n)] = b
    return out


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a training checkpoint must hold, under original names.

    LoRA (``peft.PeftModel``): exactly the adapter tensors, keyed as in PEFT's
    ``adapter_model.safetensors`` (e.g. ``base_model.model.model.layers.0.self_attn.
    q_proj.lora_A.weight``). Full fine-tuning: every parameter (a tied weight once) and
    every persistent buffer, keyed as in ``model.state_dict()``.

    Returns:
        name -> detached tensor on CPU, sharing memory with the model when the model is
        on CPU (clone before the next optimizer step if kept); dtypes as in the model.

    Raises:
        StateError: with LoRA, a trainable parameter lies outside the adapter.
    """
    return {n: t.detach().cpu() for n, t in _model_tensors(model).items()}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (as from :func:`trainable_state`) into the model, in place.

    Parameters keep their identity, so an optimizer built on them stays valid.

    Raises:
        StateError: names missing or unexpected (up to 5 of each listed), or a tensor whose
            shape or dtype differs from the model's (no cast: it would break exactness).
    """
    targets = _model_tensors(model)
    fix = "use the model.source, model.dtype and lora settings (lora.r) it was made with"
    check_tensors_fit("model", tensors, targets, fix)
    with torch.no_grad():
        for n, dst in targets.items():
            dst.copy_(tensors[n])


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name -> parameter for everything the optimizer updates, under the same names as
    :func:`trainable_state` (so optimizer state and weights are keyed alike).

    Raises:
        StateError: with LoRA, a trainable parameter lies outside the adapter.
    """
    base = unwrap(model)
    if is_peft_model(base):
        return _peft_params(base)
    return {_strip(n): p for n, p in base.named_parameters() if p.requires_grad}
