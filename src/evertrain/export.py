"""``evertrain export``: a run's checkpoint as a standard Hugging Face / PEFT directory.

Two layouts, both loadable offline without evertrain:

- **adapter** (LoRA runs without ``merge``): ``adapter_config.json`` +
  ``adapter_model.safetensors`` (PEFT's layout), for
  ``PeftModel.from_pretrained(base, DIR)``;
- **merged** (LoRA runs with ``merge``) or **full** (full fine-tuning runs, always):
  ``config.json``, ``model.safetensors`` and the tokenizer files, for
  ``AutoModelForCausalLM.from_pretrained(DIR)`` (``AutoModelForSeq2SeqLM`` for a
  ``model.kind: seq2seq`` run) and ``AutoTokenizer.from_pretrained(DIR)``.

Every export also holds ``evertrain_export.json`` (format below), saying which run, step and
base model it came from. The model is rebuilt from the config stored in the checkpoint
(:mod:`evertrain.restore`); a damaged checkpoint is refused, never replaced by an older one.
The output directory is written under a temporary name and renamed when complete.

``evertrain_export.json``: ``{"format_version": 1, "kind": "adapter"|"merged"|"full",
"run_dir": str, "checkpoint": str, "global_step": int, "base_model": {identity},
"model_dtype": str, "lora": {r, alpha, dropout, target_modules} | null,
"evertrain_version": str}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evertrain import __version__

EXPORT_MANIFEST = "evertrain_export.json"
ExportKind = Literal["adapter", "merged", "full"]


@dataclass
class ExportResult:
    """What :func:`export_run` wrote.

    Attributes:
        out_dir: the written directory.
        kind: ``adapter``, ``merged`` or ``full`` (see the module docstring).
        global_step: optimizer steps the exported checkpoint had completed.
        checkpoint: the checkpoint directory exported.
        files: file names in ``out_dir``, sorted.
        bytes: their total size in bytes.
    """

    out_dir: Path
    kind: ExportKind
    global_step: int
    checkpoint: Path
    files: list[str]
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "kind": self.kind,
            "global_step": self.global_step,
            "checkpoint": str(self.checkpoint),
            "files": self.files,
            "bytes": self.bytes,
        }


def export_run(
    run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, merge: bool = False
) -> ExportResult:
    """Export checkpoint ``step`` (default: the newest) of ``run_dir`` into ``out_dir``.

    Args:
        run_dir: the run directory (holds ``checkpoints/``).
        out_dir: output directory; must not exist or be empty (never overwritten).
        step: global_step of the checkpoint; ``None`` = the newest, refused if damaged.
        merge: LoRA runs: merge the adapter into the base weights (``W + (alpha/r) B A``,
            PEFT's ``merge_and_unload``) and write a full model. Ignored (a full model is
            always written) for full fine-tuning runs.

    Returns:
        What was written.

    Raises:
        FileNotFoundError: no run directory, no checkpoints, or no checkpoint of ``step``.
        FileExistsError: ``out_dir`` exists and is not an empty directory.
        evertrain.checkpoint.CheckpointError: the checkpoint is damaged (every problem
            listed; nothing is written).
        evertrain.state.StateError: the base model the stored config loads is not the one
            the run trained on.
        evertrain.models.ModelSourceError: the base model cannot be loaded any more.
    """
    from evertrain.fsutil import staged_dir
    from evertrain.models import merge_and_save, save_peft_adapter
    from evertrain.restore import restore_model

    out = Path(out_dir)
    _check_out(out)  # before the (slow) model load
    restored = restore_model(run_dir, step)
    cfg = restored.config
    kind: ExportKind = ("merged" if merge else "adapter") if cfg.lora is not None else "full"
    meta = {
        "format_version": 1,
        "kind": kind,
        "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": str(restored.checkpoint.resolve()),
        "global_step": restored.global_step,
        "base_model": restored.identity,
        "model_dtype": cfg.model.dtype,
        "lora": cfg.lora.model_dump() if cfg.lora is not None else None,
        "evertrain_version": __version__,
    }
    # The helpers publish into the (empty) staged directory; the outer rename publishes the
    # whole export at once, so a crash never leaves a model without its provenance file.
    with staged_dir(out) as tmp:
        if kind == "adapter":
            save_peft_adapter(restored.model, tmp)
        else:
            merge_and_save(restored.model, restored.tokenizer, tmp)
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    return ExportResult(
        out_dir=out,
        kind=kind,
        global_step=restored.global_step,
        checkpoint=restored.checkpoint,
        files=files,
        bytes=sum((out / f).stat().st_size for f in files),
    )


def _check_out(out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.exists() or out.is_symlink():
        raise FileExistsError(
            f"{out}: already exists and is not an empty directory; export into a new "
            f"directory (nothing is overwritten)"
        )
