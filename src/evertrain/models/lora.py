"""LoRA adapters through PEFT, with per-architecture default target modules."""

from __future__ import annotations

from typing import Any, cast

from evertrain.config import LoraConfig
from evertrain.models.errors import ModelSourceError

# Attention projections per ``config.model_type``: the module-name suffixes PEFT matches.
# All four projections rather than PEFT's built-in q/v-only table: with q/v only a user
# who sets ``r`` gets half the adapted matrices they expect from the documentation.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{
        t: ["q_proj", "k_proj", "v_proj", "o_proj"]
        for t in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
            "starcoder2",
            "cohere",
            "stablelm",
            "internlm2",
            "deepseek_v2",
            "exaone",
        )
    },
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj"],
    # Encoder-decoder (model.kind: seq2seq): query and value, the LoRA paper's choice and
    # PEFT's default for T5; the targets match self- and cross-attention of both stacks.
    **{t: ["q", "v"] for t in ("t5", "mt5", "umt5")},
}


def default_target_modules(model_type: str) -> list[str]:
    """LoRA target module names for a ``config.model_type``.

    Raises:
        ModelSourceError: the architecture has no default; the message asks for
            ``lora.target_modules``.
    """
    try:
        return list(DEFAULT_TARGETS[model_type])
    except KeyError:
        raise ModelSourceError(
            f"lora: no default target modules for architecture {model_type!r} "
            f"(known: {', '.join(sorted(DEFAULT_TARGETS))}); set lora.target_modules to the "
            f"names of its attention projection layers, e.g. [q_proj, v_proj]"
        ) from None


def apply_lora(model: Any, lora: LoraConfig, base_name: str | None = None) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with one LoRA adapter named ``default``
    (task type ``SEQ_2_SEQ_LM`` for an encoder-decoder model, else ``CAUSAL_LM``).
    ``base_name`` becomes the adapter's ``base_model_name_or_path`` (PEFT would record where
    the weights were loaded from, for SmolLM2 a path in evertrain's model cache).

    Only the adapter's ``lora_A``/``lora_B`` matrices are trainable afterwards; the base
    weights are frozen. Adapter weights are drawn from torch's global RNG (PEFT's
    Kaiming-uniform ``lora_A``, zero ``lora_B``). With a bfloat16 base PEFT keeps the
    adapter in float32 (its ``autocast_adapter_dtype`` default).

    Raises:
        ModelSourceError: a target module name matches no module of the model, or the
            architecture has no default targets and ``lora.target_modules`` is unset.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model_type = getattr(model.config, "model_type", None) or "unknown"
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    targets: list[str] | str = (
        "all-linear"
        if lora.target_modules == "all-linear"
        else list(lora.target_modules)
        if lora.target_modules
        else default_target_modules(model_type)
    )
    names = [n for n, _ in model.named_modules()]
    wanted = [] if isinstance(targets, str) else targets
    wanted += list(lora.modules_to_save or [])
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if type(m).__name__ in ("Linear", "Conv1D")
            }
        )
        extra = set(lora.modules_to_save or [])
        key = "lora.modules_to_save" if set(missing) <= extra else "lora.target_modules"
        raise ModelSourceError(
            f"{key}: {missing} match no module of this {model_type} model; "
            f"its linear layers are named {linear}"
        )
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=cast(Any, lora.alpha),  # peft annotates int; scaling is alpha / r
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
        bias="none",
        task_type="SEQ_2_SEQ_LM" if is_encoder_decoder else "CAUSAL_LM",
    )
    peft_model = get_peft_model(model, peft_cfg)
    if base_name is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model
