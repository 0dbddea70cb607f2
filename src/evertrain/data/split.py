"""The train/validation split: a document's side is a pure function of its content and seed.

``u = (XXH3-64(content_key, seed) >> 11) / 2**53`` is uniform in ``[0, 1)``; the document is
validation iff ``u < val_fraction``. Because the side does not depend on the document's
index, adding, removing or reordering records never moves an existing document to the other
side, and duplicates always share a side (no train/val leakage through copies). With a small
data set and a small ``val_fraction`` no document may land in validation: the validation set
is then empty, which is allowed (evaluation is skipped).
"""

from __future__ import annotations

import xxhash


def is_validation(content_key: bytes, seed: int, val_fraction: float) -> bool:
    """True if the document whose :meth:`~.formats.Document.content_key` is ``content_key``
    belongs to the validation set for ``seed`` and ``val_fraction`` (in ``[0, 1)``)."""
    if val_fraction <= 0.0:
        return False
    h = xxhash.xxh3_64_intdigest(content_key, seed=seed % (1 << 64))
    return (h >> 11) * (1.0 / (1 << 53)) < val_fraction
