"""Hints for unknown config keys: evertrain's name for keys people bring from other
trainers, else the closest key of the section (docs/config.md)."""

from __future__ import annotations

import difflib
from typing import Any

# Keys people bring from transformers' TrainingArguments and PEFT's LoraConfig (and some
# Axolotl/torchtune spellings), by the name evertrain uses; docs/config.md lists them.
FOREIGN_KEYS = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.micro_batch_size",
    "micro_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "warmup_steps": "train.schedule.warmup_steps",
    "warmup_ratio": "train.schedule.warmup_steps (in steps)",
    "lr_scheduler_type": "train.schedule.name",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "adam_beta1": "train.betas",
    "adam_beta2": "train.betas",
    "adam_epsilon": "train.eps",
    "optim": "train.optimizer",
    "bf16": "train.precision: bf16",
    "fp16": "train.precision (fp32, bf16 or auto)",
    "eval_steps": "train.eval_every_steps",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.keep_last",
    "output_dir": "--run-dir (a command-line option)",
    "resume_from_checkpoint": "nothing: evertrain always resumes from RUN's newest checkpoint",
    "model_name_or_path": "model.source",
    "base_model": "model.source",
    "max_seq_length": "data.seq_len",
    "sequence_len": "data.seq_len",
    "dataset": "data.files",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "logging_dir": "report_to: [tensorboard] (events go to RUN/tensorboard)",
    "run_name": "tracking.project (the MLflow experiment / W&B project)",
}


def suggestion(root: Any, loc: list[str]) -> str:
    """For an unknown key at ``loc`` (its path from ``root``, the pydantic model of the
    whole config): the evertrain name of a foreign key, else the closest known key of its
    section (difflib), else where the keys are listed. Returns the text to append."""
    key = loc[-1]
    if key in FOREIGN_KEYS:
        return f"; evertrain calls this {FOREIGN_KEYS[key]}"
    section: Any = root
    for part in loc[:-1]:
        field = section.model_fields.get(part) if hasattr(section, "model_fields") else None
        ann = getattr(field, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")]
        section = inner[0] if inner else None
        if section is None:
            break
    if section is not None:
        close = difflib.get_close_matches(key, list(section.model_fields), n=1, cutoff=0.6)
        if close:
            return f"; did you mean {close[0]!r}?"
    return " (check the spelling; see examples/tiny.yaml for the valid keys)"
