"""Laying out and writing a safetensors file straight from tensor memory.

``safetensors.torch.save`` returns the whole file as one ``bytes`` object: a full second copy
of every tensor before a byte reaches the disk (for a 1.6 GB optimizer state, seconds of
allocation and copying). Here the file is produced piece by piece instead: the header is
built in Python and the tensor bytes are handed to ``write`` directly from the tensors'
memory, so the writer can hash each piece as it goes out.

Format (https://github.com/huggingface/safetensors#format): an unsigned 64-bit little-endian
header length ``N``; ``N`` bytes of UTF-8 JSON mapping each tensor name to ``{"dtype",
"shape", "data_offsets": [begin, end]}`` (offsets into the data section, in bytes), padded
with spaces to a multiple of 8; then the data section, every tensor's bytes back to back in
little-endian order, no gaps.

To stay byte-identical to what the library writes (the golden checkpoint test compares
bytes), the choices the format leaves open are made as ``safetensors`` 0.4-0.8 makes them
(its ``tensor::prepare`` and ``Metadata`` serialisation): tensors ordered by dtype,
descending, in the order of the library's ``Dtype`` enum (:data:`_DTYPE_ORDER`), then by
name (byte order); compact JSON (serde_json: no spaces, non-ASCII written as UTF-8, control
characters escaped as ``\\n``-style or ``\\u00XX``), keys in data order, no
``__metadata__``. ``tests/test_async_checkpoint.py`` checks the result against
``safetensors.torch.save`` for every dtype and awkward names. Descending dtype order is also
descending element size, so every tensor starts at a multiple of its element size: the
staging buffer (:mod:`evertrain.checkpoint.staging`) relies on it to view its bytes as
tensors. Files are *read* with the safetensors library only.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from dataclasses import dataclass
from typing import Any

import torch

# The library's Dtype enum order, ascending (safetensors/src/tensor.rs). Sorting tensors by
# it, descending, reproduces the library's layout.
_DTYPE_ORDER: tuple[tuple[str, str], ...] = (
    ("bool", "BOOL"),
    ("uint8", "U8"),
    ("int8", "I8"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("int16", "I16"),
    ("uint16", "U16"),
    ("float16", "F16"),
    ("bfloat16", "BF16"),
    ("int32", "I32"),
    ("uint32", "U32"),
    ("float32", "F32"),
    ("complex64", "C64"),
    ("float64", "F64"),
    ("int64", "I64"),
    ("uint64", "U64"),
)
_RANK: dict[torch.dtype, tuple[int, str]] = {
    d: (rank, code)
    for rank, (name, code) in enumerate(_DTYPE_ORDER)
    if (d := getattr(torch, name, None)) is not None
}
_HEADER_ALIGN = 8  # the library pads the header with spaces to this multiple
# dtypes whose tensors .numpy() exports directly (a cheaper view than through uint8)
_NUMPY = frozenset(
    d
    for n in "float64 float32 float16 complex64 int8 int16 int32 int64 uint8 uint16 uint32 "
    "uint64 bool".split()
    if (d := getattr(torch, n, None)) is not None
)
# Names needing no JSON escaping (the common case) skip json.dumps: a model has ~1000.
_PLAIN_NAME = re.compile(r'[^"\\\x00-\x1f]*')


class LayoutError(ValueError):
    """The tensors cannot be laid out as a safetensors file (unsupported dtype, a name that
    is not valid Unicode); the message says which tensor."""


@dataclass(frozen=True)
class Layout:
    """A safetensors file's layout.

    Attributes:
        header: the 8-byte length prefix plus the padded JSON header, ready to write.
        names: tensor names in data order.
        tensors: the tensors in data order (the objects passed in, not copies).
        data_nbytes: size of the data section in bytes (sum of the tensors' sizes).
    """

    header: bytes
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    data_nbytes: int

    @property
    def file_nbytes(self) -> int:
        """Size of the whole file in bytes."""
        return len(self.header) + self.data_nbytes


def layout(tensors: dict[str, torch.Tensor]) -> Layout:
    """The safetensors layout of ``tensors`` (name -> dense contiguous tensor, any device).

    Only metadata is read (dtype, shape, size); no tensor data is touched.

    Raises:
        LayoutError: a dtype the safetensors format has no code for, or a name that does
            not encode as UTF-8 (a lone surrogate).
    """
    entries = []
    for name, t in tensors.items():
        rank = _RANK.get(t.dtype)
        if rank is None:
            raise LayoutError(f"tensor {name!r}: dtype {t.dtype} has no safetensors code")
        try:
            name_bytes = name.encode("utf-8")
        except UnicodeEncodeError as e:
            raise LayoutError(f"tensor name {name!r} is not valid Unicode ({e})") from None
        entries.append((-rank[0], name_bytes, name, rank[1], t))
    entries.sort(key=lambda e: (e[0], e[1]))
    parts, offset = [], 0
    for _, _, name, code, t in entries:
        end = offset + t.nelement() * t.element_size()
        shape = ",".join(map(str, t.shape))
        # ensure_ascii=False + compact separators = serde_json's string escaping
        key = f'"{name}"' if _PLAIN_NAME.fullmatch(name) else json.dumps(name, ensure_ascii=False)
        parts.append(
            f'{key}:{{"dtype":"{code}","shape":[{shape}],"data_offsets":[{offset},{end}]}}'
        )
        offset = end
    text = ("{" + ",".join(parts) + "}").encode("utf-8")
    text += b" " * (-len(text) % _HEADER_ALIGN)
    return Layout(
        header=struct.pack("<Q", len(text)) + text,
        names=tuple(e[2] for e in entries),
        tensors=tuple(e[4] for e in entries),
        data_nbytes=offset,
    )


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a flat memoryview (no copy), little-endian.

    Raises:
        ValueError: a non-contiguous or non-CPU tensor (the caller must copy it first).
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"expected a contiguous CPU tensor, got one on {t.device}")
    if t.nelement() == 0:
        return memoryview(b"")
    if sys.byteorder != "little":  # pragma: no cover - no big-endian torch build in CI
        raise ValueError("writing safetensors on a big-endian host is not supported")
    # numpy: a buffer over t's memory; bfloat16 and float8 only through a uint8 view
    arr: Any = t.numpy() if t.dtype in _NUMPY else t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(arr).cast("B")
