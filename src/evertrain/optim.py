"""Optimizer construction and the optimizer's state owner, keyed by parameter name.

torch's ``Optimizer.state_dict()`` keys per-parameter state by position (0, 1, 2, ...), so
loading it into a model whose parameter set changed silently applies Adam moments to the
wrong tensors. :class:`OptimizerState` stores state by parameter name and checks names and
shapes before handing torch the positional form it expects.
"""

from __future__ import annotations

from typing import Any

import torch

from evertrain.config import TrainConfig
from evertrain.state import StateError, check_version


def build_optimizer(
    named_params: dict[str, torch.nn.Parameter], cfg: TrainConfig
) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over ``named_params`` (in that order), one param group.

    The LR is set per step by :class:`evertrain.schedule.LRScheduler`.
    """
    params = list(named_params.values())
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(
        params,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


class OptimizerState:
    """Owner of optimizer state, saved keyed by parameter name.

    Works for any torch optimizer whose per-parameter state is tensors and numbers.
    Not thread-safe; call between optimizer steps.

    Args:
        optimizer: the optimizer.
        named_params: name -> parameter for every parameter the optimizer holds, using
            the original module's names (no ``_orig_mod.`` prefix).
    """

    VERSION = 1

    def __init__(
        self, optimizer: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter]
    ) -> None:
        self.optimizer = optimizer
        by_id = {id(p): n for n, p in named_params.items()}
        self.names: list[list[str]] = []
        for g in optimizer.param_groups:
            try:
                self.names.append([by_id[id(p)] for p in g["params"]])
            except KeyError:
                raise ValueError("optimizer holds a parameter missing from named_params") from None
        self.shapes = {n: tuple(p.shape) for n, p in named_params.items()}

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        flat_names = [n for group in self.names for n in group]
        groups = []
        for g, names in zip(sd["param_groups"], self.names, strict=True):
            # tuples (betas) become lists: JSON has no tuple, and the writer refuses them
            # rather than let them come back as a different type.
            groups.append(
                {
                    **{
                        k: list(v) if isinstance(v, tuple) else v
                        for k, v in g.items()
                        if k != "params"
                    },
                    "params": list(names),
                }
            )
        state = {flat_names[i]: dict(s) for i, s in sd["state"].items()}
        return {
            "version": self.VERSION,
            "class": type(self.optimizer).__name__,
            "param_groups": groups,
            "state": state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply a saved state.

        Raises:
            StateError: different optimizer class, parameter names or tensor shapes (the
                message lists which).
        """
        check_version(state, "optimizer", self.VERSION)
        cls = type(self.optimizer).__name__
        if state["class"] != cls:
            raise StateError(f"optimizer: checkpoint has {state['class']}, config builds {cls}")
        saved = [g["params"] for g in state["param_groups"]]
        if saved != self.names:
            have = {n for g in self.names for n in g}
            had = {n for g in saved for n in g}
            raise StateError(
                "optimizer: parameter set changed; "
                f"missing from checkpoint: {sorted(have - had)[:5]}, "
                f"not in model: {sorted(had - have)[:5]} (order or grouping may differ too)"
            )
        index = {n: i for i, n in enumerate(n for g in self.names for n in g)}
        per_param: dict[int, dict[str, Any]] = {}
        for name, s in state["state"].items():
            for k, v in s.items():
                if (
                    isinstance(v, torch.Tensor)
                    and v.dim() > 0
                    and tuple(v.shape) != self.shapes[name]
                ):
                    raise StateError(
                        f"optimizer: {name}.{k} has shape {tuple(v.shape)}, "
                        f"parameter has {self.shapes[name]}"
                    )
            per_param[index[name]] = dict(s)
        groups = []
        for g, names in zip(state["param_groups"], self.names, strict=True):
            # JSON turned tuples (betas) into lists; torch's optimizers expect tuples.
            restored = {
                k: tuple(v) if isinstance(v, list) else v for k, v in g.items() if k != "params"
            }
            groups.append({**restored, "params": [index[n] for n in names]})
        self.optimizer.load_state_dict({"state": per_param, "param_groups": groups})
