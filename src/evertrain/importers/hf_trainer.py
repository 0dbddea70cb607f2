"""Import a Hugging Face ``transformers.Trainer`` checkpoint (``checkpoint-N``) into a run.

The checkpoint is read (and its pickles loaded only through torch's restricted unpickler) by
:mod:`evertrain.importers.hf_read`; this module maps what it holds onto the run the config
builds.

The optimizer's moments are mapped to parameter names by
:mod:`evertrain.importers.hf_optimizer`.

The evertrain checkpoint is written by :class:`evertrain.trainer.Trainer` (built from the
given config, so it holds exactly the owners a training run writes) and committed through
:class:`evertrain.checkpoint.CheckpointManager`; training then continues with
``evertrain train CONFIG --run-dir RUN``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from evertrain.config import RunConfig
from evertrain.importers.hf_optimizer import map_optimizer_state, optimizer_state
from evertrain.importers.hf_read import (
    HFCheckpoint,
    ImportHFError,
    numpy_rng_globals,
    read_hf_checkpoint,
    safe_torch_load,
)

log = logging.getLogger("evertrain.import")

__all__ = [
    "HFCheckpoint",
    "ImportHFError",
    "ImportResult",
    "import_hf_checkpoint",
    "map_optimizer_state",
    "numpy_rng_globals",
    "read_hf_checkpoint",
    "safe_torch_load",
]


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


# --------------------------------------------------------------------------- import


def _grad_accum(trainer: Any, cfg: RunConfig) -> int:
    # The trainer may run a different accumulation than configured (same global batch on
    # another number of processes); its own value is what a step consumes.
    return int(getattr(trainer, "grad_accum_steps", cfg.train.grad_accum_steps))


def _derive_cursor(
    hf: HFCheckpoint, trainer: Any, cfg: RunConfig, notes: list[str]
) -> dict[str, Any]:
    """The data cursor's state after as many examples as the Trainer consumed."""
    t, cursor, step = cfg.train, trainer.cursor, hf.global_step
    hf_batch = hf.trainer_state.get("train_batch_size")
    if hf_batch != t.micro_batch_size:
        notes.append(
            f"data cursor at the start of the data: trainer_state.json's train_batch_size "
            f"{hf_batch!r} differs from train.micro_batch_size {t.micro_batch_size}, so the "
            f"examples the Trainer consumed cannot be counted in evertrain's batches"
        )
        return {**trainer.cursor.state_dict(), "epoch": 0, "offset": 0, "examples_seen": 0}
    accum = _grad_accum(trainer, cfg)
    # Counted in optimizer steps: an epoch is steps_per_epoch of them, its last one short
    # when the global batch does not divide the data (every example once per epoch).
    epoch, in_epoch = divmod(step, cursor.steps_per_epoch)
    offset = in_epoch * cursor.global_batch_size
    state = {
        **cursor.state_dict(),
        "epoch": epoch,
        "offset": offset,
        "examples_seen": epoch * cursor.epoch_examples + offset,
    }
    notes.append(
        f"data cursor after {state['examples_seen']} examples (global_step {step} in steps "
        f"of micro_batch_size {t.micro_batch_size} x grad_accum_steps {accum}, "
        f"assumed equal to the Trainer's gradient_accumulation_steps, which lives only in "
        f"the unopened training_args.bin): epoch {state['epoch']}, offset {state['offset']} of "
        f"evertrain's own data order; the Trainer's sampler order is not carried over, only "
        f"the count"
    )
    hf_epoch = hf.trainer_state.get("epoch")
    if isinstance(hf_epoch, (int, float)) and int(hf_epoch) != state["epoch"]:
        notes.append(
            f"the Trainer was in epoch {hf_epoch:.3f} of its data, evertrain's cursor is in "
            f"epoch {state['epoch']}: the data sets differ in size"
        )
    return state


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
    from evertrain.recipe import build_trainer
    from evertrain.restore import preserved_rng, step_dirs

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
        imported: dict[str, Any] = {}  # filled in once the notes are complete
        with preserved_rng():
            trainer = build_trainer(cfg, run, summary_fields=lambda: {"imported_from": imported})
            trainer.start_fresh()  # a new run directory (checked above)
            try:
                if cfg.lora is not None:
                    _check_adapter_config(hf, cfg, trainer.model)
                load_trainable_state(trainer.model, _weights_for_model(hf, trainer.model, notes))
                trainer.load_owner_state("optimizer", optimizer_state(hf, trainer, cfg, notes))
                cursor = _derive_cursor(hf, trainer, cfg, notes)
                trainer.load_owner_state("data_cursor", cursor)
                tokens = hf.trainer_state.get("num_input_tokens_seen")
                progress = {
                    **trainer.owner_state("progress"),
                    "global_step": hf.global_step,
                    "micro_step": hf.global_step * _grad_accum(trainer, cfg),
                    "examples_seen": cursor["examples_seen"],
                    "tokens_seen": int(tokens) if isinstance(tokens, int) else 0,
                }
                trainer.load_owner_state("progress", progress)
                if not progress["tokens_seen"]:
                    notes.append("tokens_seen starts at 0: the Trainer did not count tokens")
                rng = _rng_state(hf, notes)
                if rng is not None:
                    # saved as the Trainer left it, never applied to this process
                    trainer.override_owner_state("rng", rng)
                _scheduler_notes(hf, trainer, notes)
                if trainer.total_steps is not None and hf.global_step >= trainer.total_steps:
                    notes.append(
                        f"global_step {hf.global_step} >= the run's {trainer.total_steps} "
                        f"steps: nothing left to train; raise train.max_steps to continue"
                    )
                imported.update(
                    {
                        "format": "transformers.Trainer",
                        "path": str(hf_path.resolve()),
                        "global_step": hf.global_step,
                        "notes": list(notes),
                    }
                )
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
            f"LR from evertrain's schedule ({trainer.scheduler.cfg.name}, a function of "
            f"global_step): next step {nxt:.3g}; the Trainer's scheduler was at {lrs[0]:.3g}"
        )
