"""The numeric precision the stages train in: `trainer.precision`, with `auto` resolved per machine.

`auto` is bf16-mixed on a GPU and on a CPU that multiplies bf16 in hardware (AVX512-BF16 or AMX, as
torch reports), else fp32 (`32-true`): elsewhere bf16 is emulated, and its speed was never measured. The
Lightning stages take the resolved string as the Trainer's `precision`; the oracle's own loop runs
its forward pass under bf16 autocast when it resolves to a bf16 precision.
"""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products in hardware (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(cpu, probe)():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


def uses_gpu(cfg) -> bool:
    acc = cfg.trainer.accelerator
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def resolve_precision(cfg) -> str:
    """`trainer.precision`, with `auto` made concrete for this machine (see the module docstring)."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    if uses_gpu(cfg) or cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"
