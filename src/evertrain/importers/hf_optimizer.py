"""Map a ``transformers.Trainer`` ``optimizer.pt`` onto the optimizer evertrain builds.

The Trainer builds its optimizer (``Trainer.create_optimizer``) from two param groups over
``model.named_parameters()`` (those with ``requires_grad``): parameters that get weight
decay, then those that do not (biases and norm weights, per
``Trainer.get_decay_parameter_names``). Position ``i`` of ``optimizer.pt`` is the ``i``-th
parameter of that concatenation. Both the current rule (as in transformers 5: names matching
``bias``, ``layernorm``, ``rmsnorm``, ``norm``, ``_norm`` or inside ``nn.LayerNorm``) and
the one of earlier 4.x releases (``bias`` or inside ``nn.LayerNorm``) are tried on the
model evertrain builds; a mapping is used only if the group sizes and every state tensor's
shape fit, and only if exactly one mapping fits. An optimizer that stores ``param_names``
in its groups (torch >= 2.5 named optimizers) is mapped by those names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from evertrain.config import RunConfig
from evertrain.importers.hf_read import HFCheckpoint, ImportHFError

# Param-name patterns that transformers' Trainer exempts from weight decay.
# Current rule: Trainer.get_decay_parameter_names (as in transformers 5).
_NO_DECAY_CURRENT = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
# Rule of earlier transformers 4.x releases: biases and nn.LayerNorm parameters only.
_NO_DECAY_LEGACY = [r"bias"]

_ADAM_KEYS = {"step", "exp_avg", "exp_avg_sq"}
_STATE_KEYS = {"AdamW": _ADAM_KEYS, "Adam": _ADAM_KEYS, "SGD": {"momentum_buffer"}}


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


def optimizer_state(
    hf: HFCheckpoint, trainer: Any, cfg: RunConfig, notes: list[str]
) -> dict[str, Any]:
    """The ``optimizer`` owner state of ``trainer``: evertrain's param groups, the
    Trainer's moments; what differs from the config (betas, eps, weight decay, peak LR) is
    appended to ``notes``.

    Raises:
        ImportHFError: the moments cannot be mapped to parameter names (see the module
            docstring), keep other keys than ``train.optimizer`` does, or use amsgrad.
    """
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
