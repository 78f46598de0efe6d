"""How much a second job on the same cores slows a training step, per CPU thread setting.

    python -m benchmarks.threads --out FILE [--steps 20] [--settings default passive one]

A transformer block's training step (forward and backward, batch 64 of 130 tokens, width 192: the default AR's
shape) is timed in a fresh process, first alone, then while a second process runs the same steps on the same
cores. PyTorch's CPU kernels run on OpenMP threads (one per core by default) that busy-wait for each other at
every kernel's end; with two such jobs on two cores a waiting thread spins while the thread it waits for is
descheduled. Settings:
- default: PyTorch's own (one thread per core, OpenMP's default wait policy), as outside this project;
- passive: the same threads with OMP_WAIT_POLICY=PASSIVE (a waiting thread sleeps instead of spinning): what
  importing `hybrid` set until 2026-12-07 (it made generation 2.6x slower at batch 1);
- spin10k: the same threads with GOMP_SPINCOUNT=10000 (a waiting thread spins briefly, then sleeps; GNU OpenMP's
  default spins about 300,000 rounds): what importing `hybrid` sets unless either variable is set already
  (hybrid/__init__.py);
- one: a single thread per process (OMP_NUM_THREADS=1).
Prints and saves the median step time alone and contended, and the slowdown (contended / alone) per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/threads.py` as well as `python -m benchmarks.threads`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10k": {"GOMP_SPINCOUNT": "10000"},
            "one": {"OMP_NUM_THREADS": "1"}}


def worker(steps: int) -> float:
    """Median seconds of a transformer block's training step (after 3 warm-up steps), in this process."""
    import torch

    torch.manual_seed(0)
    block = torch.nn.TransformerEncoderLayer(192, 4, 768, dropout=0.0, batch_first=True)
    opt = torch.optim.AdamW(block.parameters(), lr=1e-4)
    x = torch.randn(64, 130, 192)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        loss = block(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker_main(steps: int) -> None:
    """A timing worker's whole run; prints {"seconds", "threads"} as JSON."""
    import torch

    print(json.dumps({"seconds": worker(steps), "threads": torch.get_num_threads()}), flush=True)


def _spawn(env_extra: dict, steps: int) -> subprocess.Popen:
    # `python -c` importing this module alone: importing `hybrid` would set its own OMP_WAIT_POLICY default
    # before torch loads, and the "default" row would not be OpenMP's default
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return subprocess.Popen([sys.executable, "-c", f"import benchmarks.threads as t; t.worker_main({int(steps)})"],
                            cwd=Path(__file__).resolve().parents[1], env={**env, **env_extra},
                            stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"a timing worker failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import at_least, machine, write_result

    parser = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--steps", type=at_least(1), default=20, help="timed steps per process (default 20)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args(argv)
    import torch

    rows = {}
    for name in args.settings:
        first = _result(_spawn(SETTINGS[name], args.steps))
        alone = first["seconds"]
        pair = [_spawn(SETTINGS[name], args.steps) for _ in range(2)]
        contended = max(_result(p)["seconds"] for p in pair)
        rows[name] = {"env": SETTINGS[name], "threads": first["threads"], "step_s_alone": alone,
                      "step_s_contended": contended, "slowdown": contended / alone}
        print(f"{name:8s} alone {alone * 1000:7.1f} ms/step   with a second job {contended * 1000:8.1f} ms/step   "
              f"slowdown {contended / alone:5.2f}x (2.0x = a fair share of the cores)", flush=True)
    result = {"machine": machine(torch.device("cpu")), "steps": args.steps, "settings": rows}
    if args.out:
        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
