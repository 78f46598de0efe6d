"""How much a second job on the same cores slows a training step, per CPU thread setting; with `--run-dir`, also
what each setting costs generation on an idle machine.

    python -m benchmarks.threads --out FILE [--steps 20] [--settings default passive spin10k one]
        [--run-dir RUN [--rounds 3] [--reps 7]]

A transformer block's training step (forward and backward, batch 64 of 130 tokens, width 192: the default AR's
shape) is timed in a fresh process, first alone, then while a second process runs the same steps on the same
cores. PyTorch's CPU kernels run on OpenMP threads (one per core by default) that busy-wait for each other at
every kernel's end; with two such jobs on two cores a waiting thread spins while the thread it waits for is
descheduled. Settings:
- default: PyTorch's own (one thread per core, OpenMP's default wait policy), as outside this project;
- passive: the same threads with OMP_WAIT_POLICY=PASSIVE (a waiting thread sleeps instead of spinning): what
  importing `hybrid` set until 2026-12-07 (it made generation 2.5x slower at batch 1);
- spin10k: the same threads with GOMP_SPINCOUNT=10000 (a waiting thread spins briefly, then sleeps; GNU OpenMP's
  default spins about 300,000 rounds): what importing `hybrid` sets unless either variable is set already
  (hybrid/__init__.py);
- one: a single thread per process (OMP_NUM_THREADS=1).
Prints and saves the median step time alone and contended, and the slowdown (contended / alone) per setting.
With `--run-dir` (a trained run: its tokenizer and AR, with its refiner if it has one), each setting also generates
in fresh processes, the settings interleaved over `--rounds` rounds in rotating order: the median ms per image at
batch 1 and images/s at batch 16 of the run's hybrid mode (its ar mode without a refiner), cfg 4.
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


def generation_worker(run_dir: str, reps: int) -> dict:
    """Median ms/image at batch 1 and images/s at batch 16 of one run's generation, in this process."""
    spin = os.environ.get("GOMP_SPINCOUNT", "unset")  # what OpenMP reads as torch loads, on the next line
    import torch  # before hybrid, which would set its own spin count: the "default" row would not be OpenMP's

    from hybrid.pipeline import HybridPipeline

    pipe = HybridPipeline.from_run(run_dir)
    mode = "hybrid" if "hybrid" in pipe.modes else "ar"
    n_classes = min(pipe._class_counts(mode).values())  # class prompts, as the evaluation's

    def seconds(n: int) -> float:
        classes = [i % n_classes for i in range(n)]
        pipe(classes, mode=mode, batch_size=n, cfg=4.0)  # warm-up
        times = []
        for rep in range(reps):
            start = time.perf_counter()
            pipe(classes, mode=mode, batch_size=n, cfg=4.0, seed=rep)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {"mode": mode, "ms_per_image_b1": 1000 * seconds(1), "images_per_s_b16": 16 / seconds(16),
            "threads": torch.get_num_threads(), "gomp_spincount": spin}


def generation_main(run_dir: str, reps: int) -> None:
    print(json.dumps(generation_worker(run_dir, reps)), flush=True)


def worker_main(steps: int) -> None:
    """A timing worker's whole run; prints {"seconds", "threads"} as JSON."""
    import torch

    print(json.dumps({"seconds": worker(steps), "threads": torch.get_num_threads()}), flush=True)


def _spawn(env_extra: dict, steps: int, call: str | None = None) -> subprocess.Popen:
    # `python -c` importing this module alone: importing `hybrid` would set its own GOMP_SPINCOUNT default
    # before torch loads, and the "default" row would not be OpenMP's default
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    call = call or f"t.worker_main({int(steps)})"
    return subprocess.Popen([sys.executable, "-c", f"import benchmarks.threads as t; {call}"],
                            cwd=Path(__file__).resolve().parents[1], env={**env, **env_extra},
                            stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"a timing worker failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import at_least, machine, output_file, write_result

    parser = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, type=output_file, help="write the results as JSON here")
    parser.add_argument("--steps", type=at_least(1), default=20, help="timed steps per process (default 20)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--run-dir", default=None, help="a trained run: also time its generation per setting")
    parser.add_argument("--rounds", type=at_least(1), default=3, help="generation rounds per setting (default 3)")
    parser.add_argument("--reps", type=at_least(1), default=7, help="timed calls per size per round (default 7)")
    args = parser.parse_args(argv)
    if args.run_dir and not Path(args.run_dir, "ar", "final.ckpt").is_file():
        parser.error(f"--run-dir {args.run_dir}: no trained AR stage there (ar/final.ckpt is missing)")
    if args.run_dir:
        problem = run_problem(args.run_dir)
        if problem:
            parser.error(f"--run-dir {args.run_dir}: {problem}")
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
    if args.run_dir:
        result["generation"] = _generation(args)
    if args.out:
        write_result(args.out, result)
    return 0


def run_problem(run_dir: str) -> str | None:
    """Why the generation workers cannot load `run_dir` (a stage's checkpoint that is not one, of another stage,
    or trained on another tokenizer), found by loading it as they do, before any timing: a worker's traceback
    came after all the training timings, and they were lost with it. None when it loads."""
    from hybrid.checkpoints import CheckpointError
    from hybrid.config import ConfigError
    from hybrid.pipeline import HybridPipeline, PipelineError

    try:
        HybridPipeline.from_run(run_dir)  # what `generation_worker` loads; dropped at once (the workers time it)
    except (CheckpointError, ConfigError, PipelineError) as err:
        return str(err)
    return None


def _generation(args) -> dict:
    """Each setting's generation speed, in fresh processes one at a time, rounds interleaved in rotating order."""
    runs = {name: [] for name in args.settings}
    call = f"t.generation_main({str(Path(args.run_dir).resolve())!r}, {int(args.reps)})"
    for rnd in range(args.rounds):
        k = rnd % len(args.settings)
        for name in args.settings[k:] + args.settings[:k]:
            runs[name].append(_result(_spawn(SETTINGS[name], 0, call)))
    out = {}
    for name, rs in runs.items():
        out[name] = {"mode": rs[0]["mode"], "threads": rs[0]["threads"], "gomp_spincount": rs[0]["gomp_spincount"],
                     "rounds": rs,
                     **{key: statistics.median(r[key] for r in rs) for key in ("ms_per_image_b1", "images_per_s_b16")}}
        print(f"{name:8s} generation ({out[name]['mode']}, cfg 4): {out[name]['ms_per_image_b1']:7.1f} ms/image at "
              f"batch 1, {out[name]['images_per_s_b16']:6.1f} images/s at batch 16 (median of {args.rounds} rounds)",
              flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
