"""Which device a command runs on (`--device auto | cpu | cuda | cuda:N`), and wall-clock timing on it.

CUDA launches kernels asynchronously: a call returns once its work is queued, and only a read of the
result back to the host waits for it. Pure-AR sampling reads nothing back, so a clock read right after
the call measures kernel launches, not work. `Stopwatch` waits for the device at both ends of what it
times (on a CPU there is nothing to wait for); every images/s and ms/image of the project is timed by it.
"""

from __future__ import annotations

import os
import platform
import time

import torch


def resolve_device(name: str | torch.device | None = "auto", flag: str = "--device") -> torch.device:
    """A `--device` value as a torch.device: `auto` (or None) is CUDA when available, else the CPU.
    Raises ValueError (one line, naming `flag`) for CUDA on a machine without it and for unknown names."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # meta, mps, xpu...: nothing here runs or was tested on them
        raise ValueError(f"{flag} {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index is not None:  # torch takes cpu:1 for the one CPU device
        raise ValueError(f"{flag} {name}: the CPU takes no index; use cpu (torch's threads use every core)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"{flag} {name}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                         f"(cuda:0..cuda:{count - 1})")
    return device


def synchronize(device: torch.device | str) -> None:
    """Wait until `device` has finished the work queued on it (a no-op on a CPU, which runs in order)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """`with Stopwatch(device) as watch: work()` -> `watch.seconds`: the wall time of the work on `device`,
    the device synchronized before the clock starts and before it stops."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.seconds = float("nan")
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)  # work queued before the block is not the block's
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def describe_machine(device: torch.device | str) -> dict:
    """Where timings came from: the device they were measured on (`device`: "cpu", "cuda", ...), CPU, cores,
    threads, torch, and the GPU's name when `device` is one (a GPU the command did not use is not named: its
    numbers are the CPU's)."""
    device = torch.device(device)
    info = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
