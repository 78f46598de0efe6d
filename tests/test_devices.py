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


class FakePipe:
    """A pipeline on `device` that runs nothing: each call is one "call" event."""

    def __init__(self, events: list[str], device=CUDA) -> None:
        self.events, self.device = events, torch.device(device)

    def __call__(self, **_):
        self.events.append("call")

    def fit_prompts(self, prompts, mode):
        return prompts


def test_resolve_device_picks_cuda_only_where_it_exists(no_cuda):
    from hybrid.devices import resolve_device

    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"--device {name}: CUDA is not available"):
            resolve_device(name)
    with pytest.raises(ValueError, match="--device gpu: expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    # torch parses cpu:1 as the one CPU device; reporting "on cpu:1" suggested a second one had been picked
    with pytest.raises(ValueError, match="--device cpu:1: the CPU takes no index; use cpu"):
        resolve_device("cpu:1")


def test_resolve_device_refuses_devices_nothing_here_runs_on(monkeypatch):
    """meta, mps and the like parse as torch devices, but the models' `.to()` or the seeded generator then
    failed with a bare RuntimeError; an ordinal past the machine's last GPU failed as 'invalid device ordinal'."""
    from hybrid.devices import resolve_device

    for name in ("meta", "mps", "xpu:0"):
        with pytest.raises(ValueError, match=f"--device {name}: expected auto, cpu, cuda or cuda:N"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda") == CUDA
    with pytest.raises(ValueError, match=r"--device cuda:7: this machine has 2 CUDA devices \(cuda:0..cuda:1\)"):
        resolve_device("cuda:7")


def test_stopwatch_waits_for_the_device_before_reading_the_clock(events):
    from hybrid.devices import Stopwatch

    with Stopwatch(CUDA) as watch:
        events.append("call")
    assert events == ["sync cuda", "call", "sync cuda"] and watch.seconds >= 0
    events.clear()
    with Stopwatch(torch.device("cpu")):
        events.append("call")
    assert events == ["call"]  # nothing to wait for on a CPU


def test_every_speed_measurement_waits_for_a_cuda_pipeline(events):
    """images/s and ms/image of train.py's eval, the showdown's side-by-side timing and the benchmarks' medians:
    each timed call sits between two synchronizations of the device the pipeline is on."""
    from benchmarks.common import median_seconds
    from benchmarks.showdown import side_by_side_speed
    from hybrid.eval.evaluate import measure_speed

    timed = ["sync cuda", "call", "sync cuda"]
    pipe = FakePipe(events)
    out = measure_speed(pipe, "ar", torch.arange(16), repeats=2)
    assert out["images_per_s"] > 0 and events == (["call"] + timed * 2) * 2  # a warm-up, then 2 timed calls; b16, b1
    events.clear()
    side_by_side_speed({"ar": (pipe, "ar", {}), "hybrid": (pipe, "hybrid", {})}, torch.arange(16), rounds=2)
    assert events == timed * 6  # 3 rounds (a warm-up and 2 timed) of 2 systems
    events.clear()
    median_seconds(lambda: events.append("call"), CUDA, repeats=2)
    assert events == ["call"] + timed * 2
    events.clear()
    measure_speed(FakePipe(events, "cpu"), "ar", torch.arange(16), repeats=1)
    assert "sync cpu" not in events and events.count("call") == 4


@pytest.mark.parametrize("command, argv, code", [
    ("benchmarks.showdown", ["--run-dir", "{tmp}/run", "--out", "{tmp}/out"], 2),
    ("benchmarks.showdown", ["--retime", "--run-dir", "{tmp}/run", "--out", "{tmp}/out"], 2),
    ("benchmarks.curve", ["--run-dir", "{tmp}/run", "--at", "10"], 2),
    ("benchmarks.repair", ["--run-dir", "{tmp}/run"], 2),
    ("benchmarks.given_scales", ["--run-dir", "{tmp}/run"], 2),
    ("benchmarks.refiner", ["--run-dir", "{tmp}/run"], 2),
    ("benchmarks.tokenizer", ["--run-dir", "{tmp}/run", "--reuse"], 2),
    ("benchmarks.ar_efficiency", ["--out", "{tmp}/eff.json"], 2),
    ("hybrid.sample_cli", ["--run", "{tmp}/run", "--class", "1"], 2),
    ("hybrid.eval.oracle", ["eval"], 1),
])
def test_device_cuda_without_cuda_is_a_one_line_error(no_cuda, tmp_path, capsys, command, argv, code):
    import importlib

    main = importlib.import_module(command).main
    assert main([a.format(tmp=tmp_path) for a in argv] + ["--device", "cuda"]) == code
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()  # refused before any work


def test_images_per_s_is_timed_on_a_whole_batch_even_with_fewer_requests():
    """eval.num_samples=4 (or 4 real images) used to time batches of 4 and report 16 / their time as images/s."""
    from hybrid.eval.evaluate import TIMING_BATCH, measure_speed

    class CountingPipe(FakePipe):
        def __call__(self, classes=None, prompts=None, batch_size=None, **_):
            self.events.append((len(classes if classes is not None else prompts), batch_size))

    seen: list = []
    measure_speed(CountingPipe(seen, "cpu"), "ar", torch.arange(3), repeats=1)
    measure_speed(CountingPipe(seen, "cpu"), "ar", None, repeats=1, prompts=["a red circle", "a blue square"])
    whole, single = (TIMING_BATCH, TIMING_BATCH), (1, 1)
    assert seen == [whole, whole, single, single] * 2, seen
    from benchmarks.showdown import side_by_side_speed  # the showdown's own side-by-side timing, likewise

    seen.clear()
    side_by_side_speed({"ar": (CountingPipe(seen, "cpu"), "ar", {})}, torch.arange(3), rounds=2)
    assert seen == [whole] * 3, seen
