"""The built-in tiny models for tests and the quick start.

A random-init Llama-architecture causal LM (hidden 64, 2 layers by default), or with
``model.kind: seq2seq`` a random-init T5 encoder-decoder of the same sizes, with
transformers' byte-level ``ByT5Tokenizer`` (vocabulary 384, needs no files), so tests run
offline in seconds. Weights are drawn from torch's global RNG: seed before calling.
"""

from __future__ import annotations

from typing import Any

from evertrain.config import ModelConfig


def build_tiny(cfg: ModelConfig) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)``: a ``LlamaForCausalLM`` (``T5ForConditionalGeneration``
    for ``cfg.kind == "seq2seq"``) and a ``ByT5Tokenizer``."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tok = ByT5Tokenizer()
    if cfg.kind == "seq2seq":
        return _build_tiny_t5(cfg, tok), tok
    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        attention_dropout=cfg.dropout,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    # eager attention: dropout through nn.functional.dropout on the global torch RNG, the
    # same kernel on every machine (sdpa may pick a different kernel per build).
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    return model, tok


def _build_tiny_t5(cfg: ModelConfig, tok: Any) -> Any:
    from transformers import T5Config, T5ForConditionalGeneration

    t = cfg.tiny
    config = T5Config(
        vocab_size=len(tok),
        d_model=t.hidden_size,
        d_ff=t.intermediate_size,
        d_kv=max(1, t.hidden_size // t.num_heads),
        num_layers=t.num_layers,
        num_decoder_layers=t.num_layers,
        num_heads=t.num_heads,
        dropout_rate=cfg.dropout,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        # T5's convention: decoding starts at pad. A generic config attribute, so
        # transformers' typed T5Config signature does not list it.
        decoder_start_token_id=tok.pad_token_id,  # type: ignore[call-arg]
    )
    return T5ForConditionalGeneration(config)
