"""How the stages train on this machine: `trainer.precision` and `trainer.compile`, with `auto` resolved.

`auto` is bf16-mixed on a GPU with bf16 (Ampere or newer; fp32 on older ones) and on a CPU that multiplies
bf16 in hardware (AVX512-BF16 or AMX, as torch reports), else fp32 (`32-true`): elsewhere bf16 is
emulated, and its speed was never measured. The
Lightning stages take the resolved string as the Trainer's `precision`; the oracle's own loop runs
its forward pass under bf16 autocast when it resolves to a bf16 precision.

`trainer.compile: auto` compiles the AR and denoiser networks' training step (torch.compile) on a
CPU-only run when a C++ compiler is on the PATH (inductor's CPU backend needs one). Measured on 2 cores
in bf16-mixed (2026-11-28): the default AR stage ran 0.76 s/step compiled against 0.86 s eager (the
steady epochs of one 160-step run each), and the benchmark's step 0.69 against 0.74 s in alternation
(`benchmarks.ar_efficiency --compile`). It stays off on GPUs, where it has not been measured in this
project; `trainer.compile=true` turns it on anywhere.
"""

from __future__ import annotations

import os
import shutil

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


def stage_device(cfg) -> str:
    """Where the parts that run outside Lightning (the oracle, the evaluation) run: "cuda" when the stages
    train on a GPU (`trainer.accelerator`), else "cpu" — `trainer.accelerator=cpu` keeps them off a GPU too."""
    return "cuda" if uses_gpu(cfg) and torch.cuda.is_available() else "cpu"


def resolve_precision(cfg) -> str:
    """`trainer.precision`, with `auto` made concrete for this machine (see the module docstring)."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    if uses_gpu(cfg):  # a GPU older than Ampere has no bf16: full precision there
        cuda = torch.cuda.is_available()
        return "32-true" if cuda and not torch.cuda.is_bf16_supported(including_emulation=False) else "bf16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler that torch's inductor can use is on the PATH ($CXX, c++, g++ or clang++)."""
    names = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    return any(name and shutil.which(name) for name in names)


def resolve_compile(cfg) -> bool:
    """`trainer.compile`, with `auto` made concrete for this machine (see the module docstring)."""
    value = cfg.trainer.compile
    if value != "auto":
        return bool(value)
    return not uses_gpu(cfg) and has_cxx_compiler()
