"""Read a Hugging Face ``transformers.Trainer`` checkpoint (``checkpoint-N``), safely.

The Trainer writes (``transformers/trainer.py``, ``_save_checkpoint``):

- weights: ``adapter_model.safetensors`` + ``adapter_config.json`` (a PEFT model) or
  ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``);
- ``optimizer.pt``: ``torch.optim.Optimizer.state_dict()``, per-parameter state keyed by
  position, positions numbered through the param groups in order;
- ``scheduler.pt``: the LR scheduler's ``state_dict()``;
- ``rng_state.pth``: ``{"python": random.getstate(), "numpy": np.random.get_state(),
  "cpu": torch.random.get_rng_state(), ["cuda": ...]}``;
- ``trainer_state.json``: ``global_step``, ``train_batch_size``, ``num_input_tokens_seen``,
  ``log_history``, ...;
- ``training_args.bin``: a pickled ``TrainingArguments``. **Never opened** here: unpickling
  it can run arbitrary code.

The ``.pt``/``.pth`` files are pickles. This module is the one place in evertrain that
unpickles, and only with ``torch.load(path, weights_only=True)`` (torch's restricted
unpickler: tensors, numbers, strings, containers), adding for ``rng_state.pth`` the four
numpy globals a NumPy RNG state needs (:func:`numpy_rng_globals`). Anything else is
refused with a message naming the globals the file asks for; nothing in it is executed.

:mod:`evertrain.importers.hf_trainer` turns what is read here into an evertrain checkpoint.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

NEVER_OPENED = ("training_args.bin",)
WEIGHTS_PICKLED = ("adapter_model.bin", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ImportHFError(ValueError):
    """The Hugging Face checkpoint cannot be imported; the message names the file and what
    to do. Nothing is left in the run directory."""


# --------------------------------------------------------------------------- safe loading


def numpy_rng_globals() -> list[Any]:
    """The smallest allowlist that unpickles ``np.random.get_state()``: the ndarray
    reconstructor (under its NumPy 2 and NumPy 1 module names), ``ndarray``, ``dtype`` and
    the ``uint32`` dtype class (the state's key array is ``uint32[624]``)."""
    import numpy as np

    core: Any = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def safe_torch_load(path: Path, *, numpy_rng: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, refusing everything else.

    Args:
        path: a ``.pt``/``.pth`` file.
        numpy_rng: also allow the globals of :func:`numpy_rng_globals` (for
            ``rng_state.pth`` only).

    Raises:
        ImportHFError: the file needs other globals (they are listed; nothing was run), or
            is not a readable torch file.
    """
    allow = numpy_rng_globals() if numpy_rng else []
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # the scan is best effort: the refusal stands either way
            wanted = []
        raise ImportHFError(
            f"{path}: refused: unpickling it needs {wanted or 'globals'} that evertrain does "
            f"not allow (weights_only=True: tensors, numbers, strings and containers"
            f"{', plus the numpy RNG state' if numpy_rng else ''}); nothing in it was run. "
            f"Only files written by transformers.Trainer with torch optimizers are supported"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ImportHFError(f"{path}: not a readable torch file: {e}") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ImportHFError(f"{path}: not a readable safetensors file: {e}") from None


# --------------------------------------------------------------------------- reading


@dataclass
class HFCheckpoint:
    """The contents of a Trainer ``checkpoint-N`` directory, read and checked."""

    path: Path
    trainer_state: dict[str, Any]
    kind: str  # "adapter" or "full"
    weights: dict[str, torch.Tensor]
    adapter_config: dict[str, Any] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    rng: dict[str, Any] | None
    notes: list[str]

    @property
    def global_step(self) -> int:
        return int(self.trainer_state["global_step"])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImportHFError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImportHFError(f"{path}: unreadable or not valid JSON: {e}") from None


def _read_weights(hf: Path, lora: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    present = sorted(p.name for p in hf.iterdir())
    if lora:
        st = hf / "adapter_model.safetensors"
        if not st.is_file():
            pickled = " (adapter_model.bin is a pickle, never loaded)" * (
                "adapter_model.bin" in present
            )
            raise ImportHFError(
                f"{hf}: no adapter_model.safetensors{pickled}, but the config has a lora "
                f"section; files present: {present}. Re-save the adapter with "
                f"safe_serialization=True, or drop `lora` from the config for a full model"
            )
        cfg = _read_json(hf / "adapter_config.json")
        if not isinstance(cfg, dict):
            raise ImportHFError(f"{hf / 'adapter_config.json'}: top level is not an object")
        return _load_safetensors(st), cfg
    index = hf / "model.safetensors.index.json"
    if (hf / "model.safetensors").is_file():
        return _load_safetensors(hf / "model.safetensors"), None
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ImportHFError(f"{index}: no weight_map object")
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(set(weight_map.values())):
            if not isinstance(name, str) or "/" in name or "\\" in name or ".." in name:
                raise ImportHFError(f"{index}: unsafe shard name {name!r}; refused")
            tensors.update(_load_safetensors(hf / name))
        return tensors, None
    hint = ""
    if "adapter_model.safetensors" in present:
        hint = " It holds a LoRA adapter: add a lora section to the config."
    elif any(n in present for n in WEIGHTS_PICKLED):
        hint = " pytorch_model.bin is a pickle and is never loaded; re-save with safetensors."
    raise ImportHFError(
        f"{hf}: no model.safetensors (or model.safetensors.index.json); files present: "
        f"{present}.{hint}"
    )


def read_hf_checkpoint(hf_dir: str | Path, lora: bool) -> HFCheckpoint:
    """Read and check a Trainer checkpoint directory without building a model.

    Args:
        hf_dir: the ``checkpoint-N`` directory.
        lora: expect an adapter (``adapter_model.safetensors``) rather than a full model.

    Raises:
        ImportHFError: missing directory or required file (``trainer_state.json``, the
            weights, ``optimizer.pt``), a multi-process checkpoint, a file refused by the
            restricted unpickler, or malformed content.
    """
    hf = Path(hf_dir)
    if not hf.is_dir():
        raise ImportHFError(f"{hf}: not a directory (give a Trainer checkpoint-N directory)")
    notes: list[str] = []
    state = _read_json(hf / "trainer_state.json")
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ImportHFError(
            f"{hf / 'trainer_state.json'}: global_step must be a non-negative integer, got {step!r}"
        )
    weights, adapter_cfg = _read_weights(hf, lora)
    opt_path = hf / "optimizer.pt"
    if not opt_path.is_file():
        other = " (optimizer.bin of FSDP/DeepSpeed is not supported)" * (
            (hf / "optimizer.bin").is_file()
        )
        raise ImportHFError(
            f"{opt_path}: missing{other}; without the optimizer state the Adam moments would "
            f"restart from zero. Save checkpoints with save_only_model=False"
        )
    optimizer = safe_torch_load(opt_path)
    if (
        not isinstance(optimizer, dict)
        or not isinstance(optimizer.get("state"), dict)
        or not isinstance(optimizer.get("param_groups"), list)
    ):
        raise ImportHFError(f"{opt_path}: not a torch optimizer state_dict (state, param_groups)")
    scheduler = None
    if (hf / "scheduler.pt").is_file():
        scheduler = safe_torch_load(hf / "scheduler.pt")
        if not isinstance(scheduler, dict):
            raise ImportHFError(f"{hf / 'scheduler.pt'}: not a scheduler state_dict")
    else:
        notes.append("no scheduler.pt: nothing lost, evertrain's LR is a function of global_step")
    rng = None
    if (hf / "rng_state.pth").is_file():
        rng = safe_torch_load(hf / "rng_state.pth", numpy_rng=True)
    elif list(hf.glob("rng_state_*.pth")):
        raise ImportHFError(
            f"{hf}: has per-process rng_state_<rank>.pth files: the checkpoint comes from a "
            f"multi-process run, which evertrain (one process) cannot continue exactly"
        )
    else:
        notes.append("no rng_state.pth: the random generators start from the config's seed instead")
    for name in NEVER_OPENED:
        if (hf / name).exists():
            notes.append(f"{name} ignored: it is a pickle and is never opened")
    if (hf / "scaler.pt").exists():
        notes.append("scaler.pt ignored: evertrain trains in fp32 or bf16, without loss scaling")
    return HFCheckpoint(
        hf,
        state,
        "adapter" if lora else "full",
        weights,
        adapter_cfg,
        optimizer,
        scheduler,
        rng,
        notes,
    )
