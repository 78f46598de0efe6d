"""The main job's training curve (issue #6): FID and adherence of `ar` and `hybrid` against AR training minutes.

    python -m benchmarks.curve --run-dir runs/default --at 250 500 1000 --out runs/bench/curve.json \\
        [--num-samples 1000] [--sample cfg=4,temperature=0.5,top_k=10] [--device auto] [--config FILE] [key=value ...]

The run directory must hold a trained tokenizer (and a refiner, for the `hybrid` column). When it
has no AR stage yet, the AR stage is trained here exactly as `python train.py stage=ar` does, with a
callback that saves the AR weights at each step of `--at` (under `<run-dir>/ar/curve/`) and records
the training wall time up to that step (snapshot saving excluded). An AR stage trained earlier is
reused together with the snapshots and times it left (`retrain=true` trains it again). Each
snapshot is then judged like `train.py stage=eval` judges the final weights
(`benchmarks.common.judge_class_prompts`: class prompts, oracle features, 95% bootstrap
intervals), with `--num-samples` images per mode, shape and color with a 95% Wilson interval
(`adherence_ci`). `eval.draw=K` judges on another set of requests and seeds than draw 0's, to check a
setting chosen by a sweep on requests it was not chosen on. Each row also holds `hybrid.fid_vs_ar`:
FID(hybrid) - FID(ar) on the same prompts, seeds and AR tokens, with a paired interval
(`hybrid.eval.fid.paired_fid_difference`). `--sample` judges them with other generation
settings than the AR checkpoint's config (`ar.sample`): guidance, temperature, top-k/top-p, and the
refiner's steps and sampler; running the benchmark again with another `--sample` reuses the snapshots,
so it is also a sampling sweep of a trained AR stage.
The tokenizer's and refiner's training minutes (recorded in their final checkpoints) are written
beside the rows, so the whole experiment's training time at each point can be stated. The snapshots are
judged on `--device` (default: CUDA when available), recorded as `machine.device`; the AR stage trains on
`trainer.accelerator`'s device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import hybrid as _hybrid  # noqa: F401 -- before torch loads: OpenMP's short spin (hybrid/__init__.py)

# isort: split

import pytorch_lightning as pl

from benchmarks.common import (
    add_judging_arguments,
    at_least,
    judge_class_prompts,
    machine,
    one_line_errors,
    start_judging,
    write_result,
)


class Snapshots(pl.Callback):
    """At each global step in `steps`: save the weights to `<folder>/step-<n>.ckpt` and note the training
    seconds so far (snapshot saving excluded) in `<folder>/seconds.json`."""

    def __init__(self, folder: Path, steps: list[int]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.steps = set(steps)
        self.seconds: dict[int, float] = {}
        self.start = self.paused = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start, self.paused = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps or step in self.seconds:
            return
        t0 = time.perf_counter()
        self.seconds[step] = t0 - self.start - self.paused
        # every rank calls it (Lightning synchronises and writes on rank 0 only)
        trainer.save_checkpoint(self.folder / f"step-{step}.ckpt", weights_only=True)
        if trainer.is_global_zero:
            (self.folder / "seconds.json").write_text(json.dumps(self.seconds, indent=1))
        self.paused += time.perf_counter() - t0


def stage_minutes(run_dir: Path, stage: str) -> float | None:
    """Training minutes a stage's final checkpoint records (`train_minutes`), or None."""
    from hybrid.checkpoints import final_path, load_checkpoint

    path = final_path(run_dir, stage)
    if not path.is_file():
        return None
    value = load_checkpoint(path, expect_stage=stage).get("hyper_parameters", {}).get("train_minutes")
    return None if value is None else float(value)


def settings_tag(settings: dict) -> str:
    """'' for the config's own settings, else '-cfg4-temperature0.5': the grids of a `--sample` run go to
    their own folder instead of overwriting the default run's."""
    return "".join(f"-{k}{v}" for k, v in settings.items())


def steps_problem(args, cfg) -> str | None:
    """Why `--at` cannot be judged: a step past `ar.train.max_steps` when the AR stage is trained here (the whole
    stage trained, and then no snapshot of that step was found). A reused AR stage's snapshots are what its
    training left, whatever the config says now: looked for after the arguments."""
    from hybrid.checkpoints import final_path

    if cfg.ar.checkpoint or not (cfg.retrain or not final_path(cfg.run_dir, "ar").is_file()):
        return None  # an adopted or finished AR stage is not trained here
    most = cfg.ar.train.max_steps
    beyond = sorted(step for step in set(args.at) if most >= 1 and step > most)  # -1: a time limit, no step limit
    if beyond:
        return (f"--at {' '.join(map(str, beyond))}: the AR stage trains for ar.train.max_steps={most} steps, so "
                f"no snapshot past step {most} is taken; judge steps <= {most} or raise ar.train.max_steps")
    return None


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_judging_arguments(parser, "run directory (its AR stage is trained here with snapshots unless it exists)",
                          "cfg, cfg_schedule, temperature, top_k, top_p, steps, sampler, refiner_cfg")
    parser.add_argument("--at", type=at_least(1), nargs="+", required=True, help="AR steps to judge (<= max_steps)")
    parser.add_argument("--num-samples", type=at_least(2), default=1000, help="class prompts per point (>= 2: FID)")
    started = start_judging(parser, argv, refuse=steps_problem)
    if isinstance(started, int):
        return started
    args, settings, cfg, oracle = started
    from hybrid.checkpoints import final_path, load_checkpoint, sub_state_dict
    from hybrid.eval.adherence import proportion_interval
    from hybrid.lit.runner import fit_stage
    from hybrid.pipeline import HybridPipeline, _load_strict

    run_dir = Path(args.run_dir)
    if not final_path(run_dir, "tokenizer").is_file():
        print(f"error: {run_dir} has no trained tokenizer; run `python train.py stage=tokenizer run_dir={run_dir}`",
              file=sys.stderr)
        return 1
    folder = run_dir / "ar" / "curve"
    steps = sorted(set(args.at))
    if cfg.retrain or not final_path(run_dir, "ar").is_file():
        fit_stage(cfg, "ar", callbacks=[Snapshots(folder, steps)])
    seconds_file = folder / "seconds.json"
    seconds = {int(k): v for k, v in json.loads(seconds_file.read_text()).items()} if seconds_file.is_file() else {}
    missing = [s for s in steps if not (folder / f"step-{s}.ckpt").is_file()]
    if missing:
        print(f"error: no AR snapshot for steps {missing} in {folder} (the AR stage ran past them without the "
              "curve callback, or max_steps is smaller): retrain with retrain=true", file=sys.stderr)
        return 1

    pipe = HybridPipeline.from_run(run_dir, device=args.device)
    modes = tuple(m for m in ("ar", "hybrid") if m in pipe.modes)
    other = {s: stage_minutes(run_dir, s) for s in ("tokenizer", "refiner")}
    rows = []
    draw_tag = f"-draw{cfg.eval.draw}" if cfg.eval.draw else ""
    print(f"{'step':>6} {'AR min':>7}  " + "  ".join(f"{m + ' FID':>22} {m + ' shape/color':>15}" for m in modes))
    for step in steps:
        path = folder / f"step-{step}.ckpt"
        _load_strict(pipe.ar, sub_state_dict(load_checkpoint(path, expect_stage="ar")["state_dict"], "model"), path)
        grids = folder / f"eval-{step}{settings_tag(settings)}{draw_tag}"
        metrics = judge_class_prompts(pipe, oracle, cfg, grids, modes, args.num_samples, settings)
        row = {"step": step, "ar_minutes": seconds.get(step, float("nan")) / 60.0}
        for mode in modes:
            m = metrics[mode]
            row[mode] = {"fid": m["fid"], "fid_ci": m["fid_ci"],
                         "adherence": {a: m["adherence"].get(a) for a in ("shape", "color")},
                         "adherence_ci": {a: proportion_interval(m["adherence"][a], args.num_samples)
                                          for a in ("shape", "color")}}
            if "fid_vs_ar" in m:  # FID(hybrid) - FID(ar) on the same prompts, seeds and tokens, paired interval
                row[mode]["fid_vs_ar"] = m["fid_vs_ar"]
        rows.append(row)
        cells = []
        for mode in modes:
            r = row[mode]
            lo, hi = r["fid_ci"]
            s_lo, s_hi = r["adherence_ci"]["shape"]
            cells.append(f"{r['fid']:7.2f} [{lo:6.2f}, {hi:6.2f}] "
                         f"{100 * r['adherence']['shape']:6.1f}/{100 * r['adherence']['color']:5.1f}% "
                         f"(shape [{100 * s_lo:.1f}, {100 * s_hi:.1f}])")
        if "fid_vs_ar" in row.get("hybrid", {}):
            d = row["hybrid"]["fid_vs_ar"]
            cells.append(f"hybrid - ar {d['difference']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] (paired)")
        print(f"{step:6d} {row['ar_minutes']:7.1f}  " + "  ".join(cells), flush=True)
    command = "python -m benchmarks.curve " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"machine": machine(args.device), "command": command,
              "num_samples": args.num_samples, "draw": cfg.eval.draw, "settings": settings, "stage_minutes": other,
              "ar": {"width": cfg.ar.width, "depth": cfg.ar.depth, "heads": cfg.ar.heads,
                     "max_steps": cfg.ar.train.max_steps, "batch_size": cfg.ar.train.batch_size,
                     "params": sum(p.numel() for p in pipe.ar.parameters())},
              "rows": rows}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
