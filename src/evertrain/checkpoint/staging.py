"""A reusable host buffer that holds a snapshot of a checkpoint's tensors.

An asynchronous save must copy the state before returning, since the optimizer updates
weights and moments in place at the next step. Copying into a buffer that is kept from one
save to the next (instead of ``clone()``-ing every tensor) costs one ``memcpy`` of the state
without allocating: no page faults on CPU, and on CUDA no ``cudaHostAlloc`` per save, which
is what makes pinned memory affordable. The buffer is laid out exactly like the files' data
sections (see :mod:`evertrain.checkpoint.safetensors_stream`), so each file's tensor bytes
go to ``write`` as one contiguous slice.

Memory: the buffer is as large as the largest snapshot staged so far (for full fine-tuning
with AdamW about 3x the weights' bytes), held until :meth:`StagingBuffer.release`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from evertrain.checkpoint.safetensors_stream import tensor_bytes

_REGION_ALIGN = 64  # each file's data section starts on a cache line (and any dtype's size)


def _aligned(n: int) -> int:
    return -(-n // _REGION_ALIGN) * _REGION_ALIGN


class StagingBuffer:
    """Host memory for one snapshot at a time.

    Not thread-safe: the caller must not stage again while a writer still reads the views
    returned by the previous :meth:`stage` (the checkpoint manager waits for the previous
    save first).
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes currently held (0 before the first stage and after :meth:`release`)."""
        return 0 if self._buf is None else self._buf.numel()

    def stage(self, groups: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        """Copy each group's tensors, back to back, into the buffer; return one uint8 view
        per group holding its tensors' bytes in order.

        Args:
            groups: per file, its contiguous tensors in data order (CPU or CUDA), where
                every tensor's byte offset in its group is a multiple of its element size
                (true for safetensors data order).

        Returns:
            For each group a 1-D ``uint8`` CPU tensor (a view into the buffer) of the
            group's data bytes; valid until the next :meth:`stage` or :meth:`release`.
            Pinned when any source tensor is on CUDA.

        Raises:
            RuntimeError: out of host (or pinned) memory.
        """
        sizes = [sum(t.nelement() * t.element_size() for t in g) for g in groups]
        need = sum(_aligned(s) for s in sizes)
        cuda = [t.device for g in groups for t in g if t.device.type == "cuda"]
        pin = bool(cuda) and torch.cuda.is_available()
        buf = self._buf
        if buf is None or buf.numel() < need or (pin and not buf.is_pinned()):
            self._buf = None  # free the old buffer before allocating the new one
            buf = self._buf = torch.empty(need, dtype=torch.uint8, pin_memory=pin)
        views, region = [], 0
        host: Any = buf.numpy()
        for group, size in zip(groups, sizes, strict=True):
            view = buf[region : region + size]
            offset = region
            for t in group:
                n = t.nelement() * t.element_size()
                if not n:
                    continue
                if t.device.type == "cpu":
                    # A plain single-threaded memcpy: as fast as torch's copy_ on an idle
                    # machine, and without OpenMP threads that spin-wait (10x slower) when
                    # other processes hold the cores.
                    np.copyto(host[offset : offset + n], np.frombuffer(tensor_bytes(t), np.uint8))
                else:
                    dst = buf[offset : offset + n].view(t.dtype).view(t.shape)
                    # non_blocking from CUDA: queued on the current stream after the
                    # kernels that produced t; the synchronize below waits for it.
                    dst.copy_(t, non_blocking=pin)
                offset += n
            views.append(view)
            region += _aligned(size)
        for device in set(cuda):
            torch.cuda.current_stream(device).synchronize()
        return views

    def release(self) -> None:
        """Free the buffer (the next :meth:`stage` allocates again)."""
        self._buf = None
