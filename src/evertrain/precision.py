"""The arithmetic a run computes in: ``train.precision`` ``fp32``, ``bf16`` (autocast) or
``auto``.

bf16 autocast is fast only where the hardware multiplies bfloat16 natively: CUDA devices
of compute capability 8.0 and up, and CPUs with AVX512-BF16 or AMX-BF16 (Arm: BF16)
(``torch.cpu.get_capabilities()``). Elsewhere oneDNN emulates it:
on an AVX2-only AMD EPYC a 1024x1024 bf16 matmul on one thread ran at 0.85 GFLOP/s against
58 in fp32 (70x slower), and the main job's LoRA steps fell from 58-67 tokens/s in fp32 to
4. A run that asks for ``bf16`` there gets it, with a warning that names the flags and the
fix; never a silent switch to another precision.

``auto`` is bf16 where it is native and fp32 elsewhere. Like the default thread count
(:mod:`evertrain.threads`) it depends on the machine only, never on the moment, so the same
machine resolves it alike on every restart and a resume stays bit-exact; the resolved value
is recorded in each checkpoint's summary (``precision``) and a resume on a machine that
resolves it otherwise is warned about (it may differ in the last bits, as it may anyway on
other hardware).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

log = logging.getLogger("evertrain")

PRECISIONS = ("fp32", "bf16", "auto")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")  # x86, then Arm


def _cpu_capabilities() -> dict[str, Any]:
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return dict(get())
    # torch before get_capabilities (the project supports torch >= 2.4): x86 probes only
    return {
        "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", bool)()),
        "amx_bf16": bool(getattr(torch.cpu, "_is_amx_tile_supported", bool)()),
    }


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware (see the module docstring):
    a CUDA device of compute capability 8.0 or more, a CPU with one of
    ``avx512_bf16``/``amx_bf16`` (x86) or ``bf16``/``sve_bf16`` (Arm); False for other
    device types (``auto`` keeps fp32 there: ask for ``bf16`` explicitly)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        caps = _cpu_capabilities()
        return any(bool(caps.get(flag)) for flag in _CPU_BF16_FLAGS)
    return False


def resolve(precision: str, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"``: ``precision`` itself, or what ``"auto"`` means on ``device``.

    Raises:
        ValueError: ``precision`` is none of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def announce(precision: str, device: torch.device) -> str:
    """:func:`resolve`, logging what ``auto`` chose and warning when bf16 is emulated."""
    resolved = resolve(precision, device)
    if resolved == "bf16" and not native_bf16(device):
        log.warning(
            "train.precision: bf16 on a %s without native bfloat16 (no %s): autocast emulates "
            "it (measured 15-70x slower than fp32 on an AVX2-only CPU); set "
            "train.precision: fp32 or auto",
            _device_name(device), " or ".join(_CPU_BF16_FLAGS if device.type == "cpu"
                                               else ("compute capability 8.0+",)),
        )  # fmt: skip
    elif precision == "auto":
        log.info("train.precision: auto -> %s on %s", resolved, _device_name(device))
    return resolved


def warn_changed(saved: Any, now: str) -> None:
    """Warn when the checkpoint's resolved precision (``summary.precision``) is not this
    process's: the resumed run is not bit-identical to an uninterrupted one."""
    if isinstance(saved, str) and saved != now:
        log.warning(
            "the checkpoint trained in %s, this process computes in %s (train.precision: "
            "auto resolves by the machine): the resumed run is not bit-identical; set "
            "train.precision: %s for an exact resume",
            saved, now, saved,
        )  # fmt: skip


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's context: bfloat16 autocast when ``precision`` resolves to bf16."""
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=resolve(precision, device) == "bf16"
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return f"CPU ({_cpu_capabilities().get('cpu_name', 'unknown')})"
    if device.type == "cuda":
        return f"CUDA device ({torch.cuda.get_device_name(device)})"
    return device.type


def equivalent(old: Any, new: Any, device_setting: str = "auto") -> bool:
    """Whether ``train.precision`` values ``old`` and ``new`` compute alike on this
    machine (``"bf16"`` and ``"auto"`` where bf16 is native; ``train.device``
    ``device_setting``): a resume lets such a change through."""
    if old not in PRECISIONS or new not in PRECISIONS:
        return False
    if device_setting == "auto":
        device_setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_setting)
    return resolve(old, device) == resolve(new, device)
