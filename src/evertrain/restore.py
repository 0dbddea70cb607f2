"""Rebuild a trained model from a run's checkpoint, outside of training.

Used by ``evertrain export`` and ``evertrain eval``: the model is rebuilt from the config
stored in the checkpoint (not from a config file that may have changed since), its base
identity is checked against the checkpoint's, and the saved trainable weights are copied
in. Nothing is written; the caller's RNG state is left as it was.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evertrain.checkpoint import CheckpointError, CorruptCheckpointError, read_checkpoint
from evertrain.checkpoint.format import MANIFEST, STEP_DIR_RE, step_dir_name
from evertrain.config import RunConfig, config_from_json
from evertrain.sharded import merge_sharded


@dataclass
class RestoredModel:
    """A model rebuilt from one checkpoint, in eval mode, on CPU.

    Attributes:
        model: a ``peft.PeftModel`` (LoRA runs) or a transformers model (full fine-tuning).
        tokenizer: the base model's tokenizer.
        config: the run config stored in the checkpoint.
        checkpoint: the checkpoint directory the weights came from.
        global_step: optimizer steps the checkpoint had completed.
        identity: the base model's identity (see :class:`evertrain.models.LoadedModel`).
        states: every owner's state of the checkpoint (tensors on CPU).
        summary: the checkpoint manifest's ``summary`` (JSON).
    """

    model: Any
    tokenizer: Any
    config: RunConfig
    checkpoint: Path
    global_step: int
    identity: dict[str, Any]
    states: dict[str, dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def is_lora(self) -> bool:
        return self.config.lora is not None


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """``[(global_step, path), ...]`` of every ``RUN/checkpoints/step-N`` directory, sorted by
    step, committed or not (``.tmp`` and ``.damaged-*`` directories are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR_RE.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def select_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory of ``run_dir`` to use: ``step-<step>``, or the newest.

    The newest is taken as it is: if it is damaged the caller refuses it (via
    :func:`restore_model`) instead of silently using an older step.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist, has no checkpoints, or has no
            checkpoint of ``step`` (the message lists the steps it has).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: run directory not found")
    dirs = step_dirs(run)
    if not dirs:
        raise FileNotFoundError(
            f"{run}: no checkpoints under {run / 'checkpoints'}; train first "
            f"(evertrain train CONFIG --run-dir {run})"
        )
    if step is None:
        return dirs[-1][1]
    path = run / "checkpoints" / step_dir_name(step)
    if not path.is_dir():
        have = ", ".join(str(s) for s, _ in dirs)
        raise FileNotFoundError(f"{run}: no checkpoint of step {step} (steps present: {have})")
    return path


def read_verified(path: Path, owners: Any = None) -> Any:
    """:func:`evertrain.checkpoint.read_checkpoint` with a message that says what to do.

    Raises:
        evertrain.checkpoint.CheckpointError: the checkpoint is damaged or uncommitted; the
            message lists every problem and suggests ``evertrain verify`` and ``--step``.
    """
    if not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"{path}: no {MANIFEST}: the checkpoint was never committed or was damaged; "
            f"refusing to use it. Run `evertrain verify {path.parent.parent}` and pass "
            f"--step with a checkpoint that verifies"
        )
    try:
        return read_checkpoint(path, owners)
    except CorruptCheckpointError as e:
        raise CheckpointError(
            f"{e}. Refusing to use a damaged checkpoint; run `evertrain verify "
            f"{path.parent.parent}` and pass --step with a checkpoint that verifies"
        ) from None


RANK_SUFFIX = re.compile(r"_rank[0-9]+$")
# what a rebuilt model needs (and "stream": which files a watch run trained, for eval)
_WEIGHT_OWNERS = frozenset(
    {"model", "adapter_model", "adapter_config", "config", "versions", "stream"}
)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore every global RNG (python, numpy, torch, CUDA) on exit: rebuilding a model
    draws random initial weights, which must not shift the caller's random streams (a
    daemon evaluating between training steps would otherwise lose bit-exactness)."""
    from evertrain.rng import RNGState

    owner = RNGState()
    saved = owner.state_dict()
    try:
        yield
    finally:
        owner.load_state_dict(saved)


def restore_model(run_dir: str | Path, step: int | None = None) -> RestoredModel:
    """Rebuild the model of ``run_dir`` at checkpoint ``step`` (default: the newest).

    The base model comes from the stored config's ``model`` section (seeded with the
    stored ``seed``, as the trainer does, so the built-in tiny model's random base is
    reproduced); the checkpoint's ``model``/``adapter_model`` weights are copied in.

    Raises:
        FileNotFoundError: see :func:`select_checkpoint`.
        evertrain.checkpoint.CheckpointError: the checkpoint is damaged, uncommitted or
            lacks its model weights.
        evertrain.config.ConfigError: the stored config does not validate.
        evertrain.state.StateError: the base model is not the one the run trained
            (architecture or weights hash differ) or the weights do not fit it.
        evertrain.models.ModelSourceError: the base model cannot be loaded any more.
    """
    from evertrain.model_state import ModelState
    from evertrain.models import load_model
    from evertrain.rng import seed_everything

    path = select_checkpoint(run_dir, step)
    # the weights and the config only: the optimizer (twice the weights) is not read; a
    # sharded checkpoint's parts of every rank are merged into whole tensors
    ck = read_verified(path, lambda o: RANK_SUFFIX.sub("", o) in _WEIGHT_OWNERS)
    merge_sharded(ck.states)
    if "config" not in ck.states:
        raise CheckpointError(f"{path}: no config.json; not a checkpoint written by the trainer")
    cfg = config_from_json(ck.states["config"]["config"])
    owner = "adapter_model" if cfg.lora is not None else "model"
    if owner not in ck.states:
        raise CheckpointError(
            f"{path}: no {owner}.json although the stored config "
            f"{'has' if cfg.lora is not None else 'has no'} a lora section"
        )
    with preserved_rng():
        seed_everything(cfg.seed)
        loaded = load_model(cfg.model, cfg.lora)
    ModelState(loaded.model, loaded.identity).load_state_dict(ck.states[owner])
    loaded.model.eval()
    return RestoredModel(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        config=cfg,
        checkpoint=path,
        global_step=ck.global_step,
        identity=loaded.identity,
        states=ck.states,
        summary=ck.summary,
    )
