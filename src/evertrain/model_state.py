"""Owner of the trainable model weights (all of them, or only the LoRA adapter)."""

from __future__ import annotations

from typing import Any

import torch

from evertrain.models import adapter_config, load_trainable_state, trainable_state
from evertrain.state import StateError, check_version

# What makes two base models the same for a resume: not the path they were loaded from
# (a moved directory is still the same model), but the architecture, the weights' hash and
# the model kind. A causal identity has no "kind" (None), as in checkpoints made before it.
IDENTITY_KEYS = ("format", "model_type", "weights_hash", "kind")


class ModelState:
    """Owner of the trainable parameters; frozen base weights are never saved.

    The trainer registers it as ``adapter_model`` with LoRA (next to an
    ``adapter_config.json``, so the checkpoint directory loads with
    ``PeftModel.from_pretrained(base, checkpoint_dir)``) and as ``model`` otherwise.

    LoRA: exactly the adapter tensors under PEFT's ``adapter_model.safetensors`` names;
    full fine-tuning: every parameter and persistent buffer (see
    :func:`evertrain.models.trainable_state`).

    Args:
        model: the model being trained (compiled or not).
        identity: the base model's identity (:class:`evertrain.models.LoadedModel`); a
            checkpoint made on a different base is refused on load.
    """

    VERSION = 1

    def __init__(self, model: torch.nn.Module, identity: dict[str, Any]) -> None:
        self.model, self.identity = model, identity

    def state_dict(self) -> dict[str, Any]:
        # Tensors sit at the top level so the checkpoint's safetensors keys are the
        # parameter names themselves: with LoRA the file is a PEFT adapter_model.safetensors
        # as-is. Parameter names always contain a dot, so they never collide with the
        # "version" and "identity" keys.
        return {"version": self.VERSION, "identity": self.identity, **trainable_state(self.model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy saved tensors into the trainable parameters, in place.

        Raises:
            StateError: a different base model (architecture or weights hash), or
                different parameter names, shapes or dtypes.
        """
        check_version(state, "model", self.VERSION)
        saved = {k: state["identity"].get(k) for k in IDENTITY_KEYS}
        now = {k: self.identity.get(k) for k in IDENTITY_KEYS}
        if saved != now:
            shown = [{k: v for k, v in d.items() if v is not None} for d in (saved, now)]
            raise StateError(
                f"model: checkpoint was trained on base {shown[0]}, the config loads "
                f"{shown[1]}; use the same model.source and model.kind as the checkpoint"
            )
        tensors = {k: v for k, v in state.items() if k not in ("version", "identity")}
        load_trainable_state(self.model, tensors)


class AdapterConfigState:
    """Owner of ``adapter_config.json``: PEFT's description of the LoRA adapter, saved next
    to ``adapter_model.safetensors`` so a checkpoint directory loads as-is with
    ``PeftModel.from_pretrained(base, checkpoint_dir)``. Derived from the model, so loading
    it changes nothing (the adapter's shapes are checked by :class:`ModelState`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return adapter_config(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
