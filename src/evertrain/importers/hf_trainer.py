"""Import a Hugging Face ``transformers.Trainer`` checkpoint (``checkpoint-N``) into a run.

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

Mapping the optimizer state: the Trainer builds its optimizer (``Trainer.create_optimizer``)
from two param groups over ``model.named_parameters()`` (those with ``requires_grad``):
parameters that get weight decay, then those that do not (biases and norm weights, per
``Trainer.get_decay_parameter_names``). Position ``i`` of ``optimizer.pt`` is the ``i``-th
parameter of that concatenation. Both the current rule (as in transformers 5: names matching
``bias``, ``layernorm``, ``rmsnorm``, ``norm``, ``_norm`` or inside ``nn.LayerNorm``) and
the one of earlier 4.x releases (``bias`` or inside ``nn.LayerNorm``) are tried on the
model evertrain builds; a mapping is used only if the group sizes and every state tensor's
shape fit, and only if exactly one mapping fits. An optimizer that stores ``param_names``
in its groups (torch >= 2.5 named optimizers) is mapped by those names.

The evertrain checkpoint is written by :class:`evertrain.trainer.Trainer` (built from the
given config, so it holds exactly the owners a training run writes) and committed through
:class:`evertrain.checkpoint.CheckpointManager`; training then continues with
``evertrain train CONFIG --run-dir RUN``.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from evertrain.config import RunConfig

log = logging.getLogger("evertrain.import")

NEVER_OPENED = ("training_args.bin",)
WEIGHTS_PICKLED = ("adapter_model.bin", "pytorch_model.bin", "pytorch_model.bin.index.json")

# Param-name patterns that transformers' Trainer exempts from weight decay.
# Current rule: Trainer.get_decay_parameter_names (as in transformers 5).
_NO_DECAY_CURRENT = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
# Rule of earlier transformers 4.x releases: biases and nn.LayerNorm parameters only.
_NO_DECAY_LEGACY = [r"bias"]

_ADAM_KEYS = {"step", "exp_avg", "exp_avg_sq"}
_STATE_KEYS = {"AdamW": _ADAM_KEYS, "Adam": _ADAM_KEYS, "SGD": {"momentum_buffer"}}


class ImportHFError(ValueError):
    """The Hugging Face checkpoint cannot be imported; the message names the file and what
    to do. Nothing is left in the run directory."""


@dataclass
class ImportResult:
    """What :func:`import_hf_checkpoint` wrote.

    Attributes:
        checkpoint: the committed evertrain checkpoint (``RUN/checkpoints/step-N``).
        global_step: the Trainer's ``global_step`` (= the checkpoint's).
        kind: ``"adapter"`` (LoRA) or ``"full"``.
        data_cursor: ``{"epoch", "offset", "examples_seen"}`` where training continues.
        notes: what was assumed, ignored or differs (one line each); printed by the CLI and
            stored in the checkpoint's summary under ``imported_from``.
    """

    checkpoint: Path
    global_step: int
    kind: str
    data_cursor: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "global_step": self.global_step,
            "kind": self.kind,
            "data_cursor": self.data_cursor,
            "notes": self.notes,
        }


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


# --------------------------------------------------------------------------- weights


def _check_adapter_config(hf: HFCheckpoint, cfg: RunConfig, model: Any) -> None:
    """Refuse an adapter whose shape or scaling differs from the config's LoRA."""
    assert cfg.lora is not None and hf.adapter_config is not None
    a, lora, where = hf.adapter_config, cfg.lora, hf.path / "adapter_config.json"
    from evertrain.models import unwrap

    peft_cfg: Any = cast(Any, unwrap(model)).peft_config["default"]
    wrong = []
    if a.get("r") != lora.r:
        wrong.append(f"r is {a.get('r')!r} there, lora.r is {lora.r}")
    if a.get("lora_alpha") is not None and float(a["lora_alpha"]) != float(lora.alpha):
        wrong.append(f"lora_alpha is {a.get('lora_alpha')!r} there, lora.alpha is {lora.alpha}")
    targets = a.get("target_modules")
    want = peft_cfg.target_modules
    if isinstance(targets, list) and isinstance(want, (set, list)) and set(targets) != set(want):
        wrong.append(f"target_modules are {sorted(targets)} there, the config's are {sorted(want)}")
    for key in ("use_dora", "use_rslora"):
        if a.get(key):
            wrong.append(f"{key} is true there; evertrain's LoRA is plain LoRA")
    if a.get("modules_to_save"):
        wrong.append(f"modules_to_save {a['modules_to_save']} is not supported")
    if a.get("bias", "none") != "none":
        wrong.append(f"bias is {a['bias']!r} there; evertrain trains no biases with LoRA")
    if wrong:
        raise ImportHFError(
            f"{where}: the adapter does not match the config: {'; '.join(wrong)}; set the "
            f"config's lora section to the adapter's settings"
        )


def _weights_for_model(hf: HFCheckpoint, model: Any, notes: list[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under evertrain's names (those of ``trainable_state``)."""
    from evertrain.models import trainable_state, unwrap

    targets = trainable_state(model)
    got = hf.weights
    fname = "adapter_model.safetensors" if hf.kind == "adapter" else "model weights"
    extra = sorted(set(got) - set(targets))
    if hf.kind == "full" and extra:
        # Tied weights (lm_head = embed_tokens) appear once in evertrain's state; a file
        # that stores both copies is fine when they are equal.
        sd = unwrap(model).state_dict(keep_vars=True)
        by_obj = {id(sd[n]): n for n in targets if n in sd}
        for name in list(extra):
            canon = by_obj.get(id(sd[name])) if name in sd else None
            if canon is not None and canon in got and torch.equal(got[name], got[canon]):
                extra.remove(name)
                notes.append(f"{name}: tied to {canon}, stored once")
    missing = sorted(set(targets) - set(got))
    if missing or extra:
        raise ImportHFError(
            f"{hf.path}: {fname} do not fit the model the config builds: missing "
            f"{missing[:5]}{' …' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{' …' if len(extra) > 5 else ''}; use the model.source (and lora settings) the "
            f"Trainer trained"
        )
    for name, t in targets.items():
        src = got[name]
        if src.shape != t.shape:
            raise ImportHFError(
                f"{hf.path}: {name} has shape {list(src.shape)} there, {list(t.shape)} in the "
                f"model the config builds; use the same model and lora.r"
            )
        if src.dtype != t.dtype:
            dt = str(src.dtype).removeprefix("torch.")
            raise ImportHFError(
                f"{hf.path}: {name} is {dt} there, {str(t.dtype).removeprefix('torch.')} in "
                f"the model; set model.dtype to {dt} (evertrain never casts silently)"
            )
    return {n: got[n] for n in targets}


# --------------------------------------------------------------------------- optimizer


def _parameter_names(
    module: torch.nn.Module, prefix: str, no_decay: list[re.Pattern[str]]
) -> set[str]:
    """Full names of the parameters that get weight decay, as transformers'
    ``get_parameter_names(model, [nn.LayerNorm], patterns)`` selects them: not inside an
    ``nn.LayerNorm`` and no pattern found in the lower-cased name. (transformers applies
    the patterns to each suffix of the name that starts after a dot; ``^``/``$``-anchored
    at dots, they match those exactly when they match the full name.)"""
    out: set[str] = set()

    def walk(mod: torch.nn.Module, pre: str, in_ln: bool) -> None:
        for n, child in mod.named_children():
            walk(child, f"{pre}{n}.", in_ln or isinstance(child, torch.nn.LayerNorm))
        for n in mod._parameters:
            full = f"{pre}{n}"
            if not in_ln and not any(p.search(full.lower()) for p in no_decay):
                out.add(full)

    walk(module, prefix, False)
    return out


def _candidate_orders(model: Any, groups: list[dict[str, Any]]) -> dict[str, list[list[str]]]:
    """Possible Trainer param orders (names of ``model.named_parameters()``), by rule."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if all("param_names" in g for g in groups):
        return {"param_names": [list(g["param_names"]) for g in groups]}
    if len(groups) == 1:
        return {"one group": [[n for n, _ in named]]}
    out = {}
    for rule, patterns in (("current", _NO_DECAY_CURRENT), ("legacy", _NO_DECAY_LEGACY)):
        decay = _parameter_names(model, "", [re.compile(p) for p in patterns])
        out[rule] = [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]
    return out


def map_optimizer_state(
    hf_opt: dict[str, Any],
    model: Any,
    evertrain_names: dict[int, str],
    where: Path,
) -> dict[str, dict[str, Any]]:
    """The Trainer's optimizer state keyed by evertrain parameter names.

    Args:
        hf_opt: the loaded ``optimizer.pt`` (``{"state": {i: {...}}, "param_groups": [...]}``).
        model: the model evertrain built (same architecture and trainable set as the
            Trainer's); its ``named_parameters()`` names are the Trainer's.
        evertrain_names: ``id(parameter) -> evertrain name`` (see ``trainable_parameters``).
        where: the file, for messages.

    Returns:
        evertrain name -> that parameter's state (tensors as loaded).

    Raises:
        ImportHFError: no mapping fits the group sizes and shapes, or two different ones do.
    """
    groups = hf_opt["param_groups"]
    if len(groups) > 2:
        raise ImportHFError(
            f"{where}: {len(groups)} param groups; only the Trainer's default optimizer "
            f"(one or two groups) can be mapped to parameter names"
        )
    sizes = [len(g.get("params", [])) for g in groups]
    flat_idx = [i for g in groups for i in g["params"]]
    params = dict(model.named_parameters())
    fits: dict[str, list[str]] = {}
    why: list[str] = []
    for rule, order in _candidate_orders(model, groups).items():
        if [len(o) for o in order] != sizes:
            why.append(f"{rule} rule gives group sizes {[len(o) for o in order]}")
            continue
        names = [n for o in order for n in o]
        bad = None
        for idx, name in zip(flat_idx, names, strict=True):
            p = params.get(name)
            if p is None:
                bad = f"{name} is not a parameter of the model"
                break
            for k, v in hf_opt["state"].get(idx, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    bad = f"state {idx}.{k} has shape {list(v.shape)}, {name} {list(p.shape)}"
                    break
            if bad:
                break
        if bad:
            why.append(f"{rule} rule: {bad}")
            continue
        fits[rule] = names
    distinct = {tuple(v) for v in fits.values()}
    if not distinct:
        raise ImportHFError(
            f"{where}: cannot map the optimizer's {sum(sizes)} positions (groups of {sizes}) "
            f"to the {sum(p.requires_grad for p in params.values())} trainable parameters of "
            f"the model the config builds ({'; '.join(why)}); use the model and lora settings "
            f"the Trainer trained"
        )
    if len(distinct) > 1:
        raise ImportHFError(
            f"{where}: the optimizer state fits more than one parameter order "
            f"({', '.join(fits)} rules); refusing to guess which moments belong to which "
            f"parameter"
        )
    chosen = list(next(iter(distinct)))
    out: dict[str, dict[str, Any]] = {}
    for idx, name in zip(flat_idx, chosen, strict=True):
        if idx in hf_opt["state"]:
            out[evertrain_names[id(params[name])]] = dict(hf_opt["state"][idx])
    return out


def _optimizer_state(
    hf: HFCheckpoint, trainer: Any, cfg: RunConfig, notes: list[str]
) -> dict[str, Any]:
    """The ``optimizer`` owner state: evertrain's param groups, the Trainer's moments."""
    from evertrain.models import trainable_parameters, unwrap

    where = hf.path / "optimizer.pt"
    owner = trainer.owners["optimizer"]
    mine = owner.state_dict()
    ev_names = {id(p): n for n, p in trainable_parameters(trainer.model).items()}
    per_name = map_optimizer_state(hf.optimizer, unwrap(trainer.model), ev_names, where)
    want = _STATE_KEYS[mine["class"]]
    for name, s in per_name.items():
        keys = set(s)
        if mine["class"] == "SGD" and cfg.train.momentum == 0:
            want = set()
        if keys != want:
            raise ImportHFError(
                f"{where}: state of {name} has keys {sorted(keys)}; train.optimizer "
                f"{cfg.train.optimizer!r} keeps {sorted(want)}. Set train.optimizer to the "
                f"Trainer's optimizer (adamw for adamw_torch / adamw_torch_fused)"
            )
        step = s.get("step")
        if isinstance(step, torch.Tensor) and int(step.item()) != hf.global_step:
            notes.append(
                f"optimizer step count of {name} is {int(step.item())}, global_step is "
                f"{hf.global_step} (skipped steps); kept as saved"
            )
            break
    g0 = hf.optimizer["param_groups"][0]
    t = cfg.train
    if g0.get("amsgrad"):
        raise ImportHFError(f"{where}: amsgrad is on; evertrain's Adam/AdamW do not use it")
    if mine["class"] in ("Adam", "AdamW"):
        if g0.get("betas") is not None and [float(b) for b in g0["betas"]] != list(t.betas):
            notes.append(f"betas: the Trainer used {list(g0['betas'])}, now train.betas {t.betas}")
        if g0.get("eps") is not None and float(g0["eps"]) != t.eps:
            notes.append(f"eps: the Trainer used {g0['eps']}, now train.eps {t.eps}")
    if g0.get("weight_decay") is not None and float(g0["weight_decay"]) != t.weight_decay:
        notes.append(
            f"weight_decay: the Trainer used {g0['weight_decay']}, now train.weight_decay "
            f"{t.weight_decay}"
        )
    groups = hf.optimizer["param_groups"]
    if len(groups) == 2 and groups[1].get("params") and t.weight_decay > 0:
        notes.append(
            f"the Trainer exempted {len(groups[1]['params'])} bias/norm parameters from "
            f"weight decay; evertrain decays every trainable parameter"
        )
    if g0.get("initial_lr") is not None and float(g0["initial_lr"]) != t.lr:
        notes.append(f"peak LR: the Trainer used {g0['initial_lr']}, now train.lr {t.lr}")
    return {**mine, "state": per_name}


# --------------------------------------------------------------------------- RNG


def _rng_state(hf: HFCheckpoint, notes: list[str]) -> dict[str, Any] | None:
    """The ``rng`` owner state holding the Trainer's generators (None: keep the seed's)."""
    if hf.rng is None:
        return None
    import random

    import numpy as np

    from evertrain.restore import preserved_rng
    from evertrain.rng import RNGState

    where = hf.path / "rng_state.pth"
    s = hf.rng
    if not isinstance(s, dict) or not {"python", "numpy", "cpu"} <= set(s):
        keys = sorted(s) if isinstance(s, dict) else type(s).__name__
        raise ImportHFError(f"{where}: expected keys python, numpy, cpu; got {keys}")
    cpu = s["cpu"]
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8 or cpu.dim() != 1:
        raise ImportHFError(f"{where}: 'cpu' is not a torch RNG state (uint8 tensor)")
    with preserved_rng():
        try:
            random.setstate(tuple(s["python"]))
            np.random.set_state(tuple(s["numpy"]))
            torch.set_rng_state(cpu)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ImportHFError(f"{where}: malformed generator state: {e}") from None
        cuda = s.get("cuda")
        if cuda is not None:
            states = list(cuda) if isinstance(cuda, (list, tuple)) else [cuda]
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if have == len(states):
                torch.cuda.set_rng_state_all(states)
            else:
                notes.append(
                    f"{len(states)} CUDA generator state(s) not restored: this machine has "
                    f"{have} CUDA device(s)"
                )
        for extra in sorted(set(s) - {"python", "numpy", "cpu", "cuda"}):
            notes.append(f"rng_state.pth: {extra!r} generator not restored (not used here)")
        return RNGState().state_dict()


class _FixedState:
    """An owner whose state is given (the imported RNG state, saved as-is)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:  # pragma: no cover - unused
        self.state = state


# --------------------------------------------------------------------------- import


def _grad_accum(trainer: Any, cfg: RunConfig) -> int:
    # The trainer may run a different accumulation than configured (same global batch on
    # another number of processes); its own value is what a step consumes.
    return int(getattr(trainer, "grad_accum_steps", cfg.train.grad_accum_steps))


def _derive_cursor(
    hf: HFCheckpoint, trainer: Any, cfg: RunConfig, notes: list[str]
) -> dict[str, int]:
    """Place the data cursor after as many examples as the Trainer consumed."""
    t, cursor, step = cfg.train, trainer.cursor, hf.global_step
    hf_batch = hf.trainer_state.get("train_batch_size")
    if hf_batch != t.micro_batch_size:
        notes.append(
            f"data cursor at the start of the data: trainer_state.json's train_batch_size "
            f"{hf_batch!r} differs from train.micro_batch_size {t.micro_batch_size}, so the "
            f"examples the Trainer consumed cannot be counted in evertrain's batches"
        )
        return {"epoch": 0, "offset": 0, "examples_seen": 0}
    accum = _grad_accum(trainer, cfg)
    examples = step * t.micro_batch_size * accum * getattr(trainer, "world_size", 1)
    # The examples an epoch uses (after drop_last), in the cursor's own unit.
    per_epoch = cursor.steps_per_epoch * cursor.global_batch_size
    state = {
        **cursor.state_dict(),
        "epoch": examples // per_epoch,
        "offset": examples % per_epoch,
        "examples_seen": examples,
    }
    cursor.load_state_dict(state)
    notes.append(
        f"data cursor after {state['examples_seen']} examples (global_step {step} x "
        f"micro_batch_size {t.micro_batch_size} x grad_accum_steps {accum}, "
        f"assumed equal to the Trainer's gradient_accumulation_steps, which lives only in "
        f"the unopened training_args.bin): epoch {cursor.epoch}, offset {cursor.offset} of "
        f"evertrain's own data order; the Trainer's sampler order is not carried over, only "
        f"the count"
    )
    hf_epoch = hf.trainer_state.get("epoch")
    if isinstance(hf_epoch, (int, float)) and int(hf_epoch) != cursor.epoch:
        notes.append(
            f"the Trainer was in epoch {hf_epoch:.3f} of its data, evertrain's cursor is in "
            f"epoch {cursor.epoch}: the data sets differ in size"
        )
    return {"epoch": cursor.epoch, "offset": cursor.offset, "examples_seen": cursor.examples_seen}


def import_hf_checkpoint(
    hf_dir: str | Path,
    run_dir: str | Path,
    cfg: RunConfig,
    *,
    log_note: Callable[[str], None] | None = None,
) -> ImportResult:
    """Turn a Trainer ``checkpoint-N`` into ``RUN/checkpoints/step-N``.

    The run is built from ``cfg`` (model, LoRA, data, optimizer) exactly as
    ``evertrain train`` would build it; then the Trainer's weights, optimizer moments,
    global_step and RNG states replace the fresh ones, the data cursor is placed after the
    examples the Trainer consumed (see :class:`ImportResult`), and one checkpoint is
    committed. The caller's global RNG state is left unchanged.

    Args:
        hf_dir: the Trainer's ``checkpoint-N`` directory (read only).
        run_dir: the evertrain run directory; must hold no checkpoints yet.
        cfg: the config the run will train with (``lora`` present for an adapter).
        log_note: receives each note as it is made (default: logged at INFO).

    Returns:
        What was written.

    Raises:
        ImportHFError: the run already has checkpoints, or the Trainer checkpoint is
            incomplete, refused by the restricted unpickler, or does not fit ``cfg``; the
            run directory is left as it was.
        evertrain.config.ConfigError, evertrain.data.DataError: ``cfg`` or its data is bad.
    """
    from evertrain.models import load_trainable_state
    from evertrain.restore import preserved_rng, step_dirs
    from evertrain.trainer import Trainer

    hf_path, run = Path(hf_dir), Path(run_dir)
    ckpt_root = run / "checkpoints"
    if step_dirs(run) or (ckpt_root.is_dir() and any(ckpt_root.iterdir())):
        raise ImportHFError(
            f"{run}: already has checkpoints; import into a new run directory (an import "
            f"never mixes with, or replaces, an existing run)"
        )
    hf = read_hf_checkpoint(hf_path, lora=cfg.lora is not None)
    notes = list(hf.notes)
    created = [p for p in (run, run / "metrics.jsonl", ckpt_root) if not p.exists()]
    try:
        with preserved_rng():
            trainer = Trainer(cfg, run)
            try:
                if cfg.lora is not None:
                    _check_adapter_config(hf, cfg, trainer.model)
                load_trainable_state(trainer.model, _weights_for_model(hf, trainer.model, notes))
                trainer.owners["optimizer"].load_state_dict(
                    _optimizer_state(hf, trainer, cfg, notes)
                )
                p = trainer.progress
                p.global_step = hf.global_step
                p.micro_step = hf.global_step * _grad_accum(trainer, cfg)
                cursor = _derive_cursor(hf, trainer, cfg, notes)
                p.examples_seen = cursor["examples_seen"]
                tokens = hf.trainer_state.get("num_input_tokens_seen")
                p.tokens_seen = int(tokens) if isinstance(tokens, int) else 0
                if not p.tokens_seen:
                    notes.append("tokens_seen starts at 0: the Trainer did not count tokens")
                rng = _rng_state(hf, notes)
                if rng is not None:
                    trainer.owners["rng"] = _FixedState(rng)
                _scheduler_notes(hf, trainer, notes)
                if trainer.total_steps is not None and hf.global_step >= trainer.total_steps:
                    notes.append(
                        f"global_step {hf.global_step} >= the run's {trainer.total_steps} "
                        f"steps: nothing left to train; raise train.max_steps to continue"
                    )
                imported = {
                    "format": "transformers.Trainer",
                    "path": str(hf_path.resolve()),
                    "global_step": hf.global_step,
                    "notes": list(notes),
                }
                trainer.summary_fields = lambda: {"imported_from": imported}
                path = trainer.save()
                if path is None:
                    raise ImportHFError(
                        f"{run}: not enough free disk space for the checkpoint; nothing imported"
                    )
            finally:
                trainer.close()
    except BaseException:
        # Only what this import created goes; a pre-existing run directory stays.
        for made in reversed(created):
            if made.is_dir():
                shutil.rmtree(made, ignore_errors=True)
            elif made.exists():
                made.unlink()
        raise
    emit = log_note or log.info
    for n in notes:
        emit(n)
    return ImportResult(path, hf.global_step, hf.kind, cursor, notes)


def _scheduler_notes(hf: HFCheckpoint, trainer: Any, notes: list[str]) -> None:
    s = hf.scheduler
    if s is None:
        return
    last = s.get("last_epoch")
    if isinstance(last, int) and last != hf.global_step:
        notes.append(f"scheduler.pt has taken {last} steps, global_step is {hf.global_step}")
    lrs = s.get("_last_lr")
    nxt = trainer.scheduler.lr_at(hf.global_step)
    if isinstance(lrs, list) and lrs and isinstance(lrs[0], (int, float)):
        notes.append(
            f"LR from evertrain's schedule ({trainer.cfg.train.schedule.name}, a function of "
            f"global_step): next step {nxt:.3g}; the Trainer's scheduler was at {lrs[0]:.3g}"
        )
