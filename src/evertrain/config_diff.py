"""What changed between a checkpoint's stored config and the current one, and which of
those changes a resume refuses (they would break bit-exactness or tensor shapes)."""

from __future__ import annotations

from typing import Any

# Keys whose change breaks bit-exactness or tensor shapes: refused on resume unless the user
# passes --allow-config-change. Prefix match on the dotted path. data.files is not here: a
# moved checkout changes the paths, and the data cursor refuses changed content by its
# fingerprint anyway; nor data.chat_template, for the same reasons (it may be a path).
BREAKING_PREFIXES = (
    "seed",
    "model.source",
    "model.kind",
    "model.dtype",
    "model.tiny",
    "model.dropout",
    "lora",
    "data.format",
    "data.seq_len",
    "data.packing",
    "data.trim_padding",
    "data.text_split",
    "data.val_fraction",
    "data.columns",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.optimizer",
    "train.precision",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not d and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: d}


def diff_configs(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ: ``[(key, old_value, new_value), ...]``, sorted."""
    fo, fn = _flatten(old), _flatten(new)
    missing = object()
    out = []
    for k in sorted(set(fo) | set(fn)):
        a, b = fo.get(k, missing), fn.get(k, missing)
        if a != b:
            out.append((k, None if a is missing else a, None if b is missing else b))
    return out


def breaking_changes(diffs: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """The subset of ``diffs`` that would break exactness or shapes on resume."""
    return [
        d for d in diffs if any(d[0] == p or d[0].startswith(p + ".") for p in BREAKING_PREFIXES)
    ]
