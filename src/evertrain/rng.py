"""Owner of every random number generator the training loop draws from.

Python ``random``, NumPy's legacy global generator, torch's CPU generator and every CUDA
device's generator. Dropout and random init draw from torch's; data order never does (it
uses its own generator seeded from (seed, epoch), see :mod:`evertrain.data.cursor`).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import xxhash

from evertrain.state import StateError, check_version

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, global_step: int) -> int:
    """The seed of a rank that has no saved RNG state: XXH3-64 of
    ``"evertrain.rng.rank/{seed}/{rank}/{global_step}"`` (63 bits). ``global_step`` is 0
    for a fresh run and the resumed step for a rank added on resume, so a rank added later
    does not replay the dropout masks of the run's start."""
    key = f"evertrain.rng.rank/{seed}/{rank}/{global_step}".encode()
    return xxhash.xxh3_64_intdigest(key) >> 1


class RNGState:
    """Snapshot/restore of all global RNGs. Process-global state: not thread-safe."""

    VERSION = 1

    def state_dict(self) -> dict[str, Any]:
        py_version, py_state, py_gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {
            "version": self.VERSION,
            "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
            "numpy": {
                "name": np_name,
                "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                "pos": int(np_pos),
                "has_gauss": int(np_has_gauss),
                "cached_gaussian": float(np_gauss),
            },
            "torch_cpu": torch.get_rng_state(),
            "cuda": {str(i): s for i, s in enumerate(cuda)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore all generators.

        Raises:
            StateError: the checkpoint has CUDA generator states for a different number of
                devices than this machine has (the resumed run could not be exact).
        """
        check_version(state, "rng", self.VERSION)
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        n = state["numpy"]
        np.random.set_state(
            (
                n["name"],
                n["keys"].numpy().astype(np.uint32),
                n["pos"],
                n["has_gauss"],
                n["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch_cpu"])
        cuda = [state["cuda"][k] for k in sorted(state["cuda"], key=int)]
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cuda and len(cuda) != have:
            raise StateError(
                f"rng: checkpoint holds {len(cuda)} CUDA generator states, this "
                f"machine has {have} CUDA devices; resume on the same device count"
            )
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
