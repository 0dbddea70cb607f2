"""Export a trained model: a PEFT adapter directory, or a merged full model directory.

Both are written atomically (:func:`evertrain.fsutil.staged_dir`) and load offline
with the standard libraries, no evertrain needed:
``PeftModel.from_pretrained(base, adapter_dir)`` and
``AutoModelForCausalLM.from_pretrained(model_dir)`` (``AutoModelForSeq2SeqLM`` for an
encoder-decoder) / ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from evertrain.fsutil import staged_dir
from evertrain.models.offline import hub_offline
from evertrain.models.trainable import is_peft_model, unwrap


def save_peft_adapter(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the LoRA adapter as ``adapter_config.json`` + ``adapter_model.safetensors``.

    The tensors are those of :func:`evertrain.models.trainable.trainable_state`, in the
    model's adapter dtype. ``torch.compile`` wrappers are looked through.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        TypeError: ``model`` has no LoRA adapter (full fine-tuning: use
            :func:`merge_and_save`).
        FileExistsError: ``out_dir`` exists and is not empty.
    """
    base: Any = unwrap(model)
    if not is_peft_model(base):
        raise TypeError(
            "save_peft_adapter: the model has no LoRA adapter (lora is not configured); "
            "export a fully fine-tuned model with merge_and_save"
        )
    out = Path(out_dir)
    with hub_offline(), staged_dir(out) as tmp:
        # save_embedding_layers=False: as in trainable_state; "auto" would also look up the
        # base model's config, online when the base was not a local directory.
        base.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
    return out


def merge_and_save(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write a standalone model: ``config.json``, ``model.safetensors``, tokenizer files.

    With LoRA the adapter is merged (``W + (alpha/r) * B @ A``, PEFT's
    ``merge_and_unload``) into a deep copy, so the model being trained is left untouched
    (merging in place and unmerging afterwards would not restore the weights bit for bit).
    Weights keep the model's dtype. Needs memory for a second copy of the model.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty.
    """
    base: Any = unwrap(model)
    out = Path(out_dir)
    with hub_offline():
        if is_peft_model(base):
            merged = copy.deepcopy(base).merge_and_unload()
        else:
            merged = base
        with staged_dir(out) as tmp:
            merged.save_pretrained(str(tmp))  # safetensors: the transformers default
            tokenizer.save_pretrained(str(tmp))
    return out


def adapter_config(model: torch.nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT would write for ``model``'s active adapter, as a dict.

    Serialised by PEFT itself (``PeftConfig.save_pretrained`` into a temporary directory),
    with ``inference_mode`` true as ``PeftModel.save_pretrained`` sets it, so a checkpoint
    that stores it next to ``adapter_model.safetensors`` loads with
    ``PeftModel.from_pretrained(base, checkpoint_dir)``.

    Raises:
        TypeError: ``model`` has no LoRA adapter.
    """
    import copy
    import json
    import tempfile

    base: Any = unwrap(model)
    if not is_peft_model(base):
        raise TypeError("adapter_config: the model has no LoRA adapter")
    cfg = copy.deepcopy(base.peft_config[base.active_adapter])
    cfg.inference_mode = True
    with hub_offline(), tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        out: dict[str, Any] = json.loads((Path(tmp) / "adapter_config.json").read_text())
    return out
