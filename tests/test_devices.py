"""Which device a command runs on (`--device`), and timing that waits for it: CUDA launches kernels
asynchronously, so a clock read before the device has finished measures launches, not work."""

import pytest
import torch

CUDA = torch.device("cuda")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def events(monkeypatch):
    """What happened, in order: "sync <device>" for each torch.cuda.synchronize, and what the fakes append."""
    seen: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(f"sync {torch.device(device)}"))
    return seen


def test_resolve_device_picks_cuda_only_where_it_exists(no_cuda):
    from hybrid.devices import resolve_device

    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"--device {name}: CUDA is not available"):
            resolve_device(name)
    with pytest.raises(ValueError, match="--device gpu: expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_stopwatch_waits_for_the_device_before_reading_the_clock(events):
    from hybrid.devices import Stopwatch

    with Stopwatch(CUDA) as watch:
        events.append("call")
    assert events == ["sync cuda", "call", "sync cuda"] and watch.seconds >= 0
    events.clear()
    with Stopwatch(torch.device("cpu")):
        events.append("call")
    assert events == ["call"]  # nothing to wait for on a CPU
