"""Data throughput on ONE core: procedural rendering and shard reading, images per second.

    python -m benchmarks.data_throughput --out runs/bench/data_throughput.json [--seconds 3]

(a) procedural: `ProceduralDataset(split="train")[i]` (render + caption + tensor) at each image
    size, default settings (two_object_prob 0.3, glyph_prob 0.2); also `render()` alone at 32.
    Target: >= 2,000 images/s at 32x32 on one core.
(b) shards: `EvalShards` over shards written to a temporary folder (PNG decode + tensor), at 32.
Single thread (torch.set_num_threads(1), no DataLoader workers); run it pinned to one core
(`taskset -c 0 ...`) on a quiet machine for numbers worth reporting. Each figure is the best of
three timed passes after a warm-up pass (glyph masks are cached on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import hybrid as _hybrid  # noqa: F401 -- before torch loads: OpenMP's short spin (hybrid/__init__.py)

# isort: split

import numpy as np
import torch

from benchmarks.common import int_list, output_file, positive_float
from hybrid.data.procedural import ProceduralDataset, render, sample_attributes


def _rate(fn, count: int, repeats: int = 3) -> float:
    """Best images/s over `repeats` passes of fn(i) for i in range(count), after one warm-up pass."""
    for i in range(count):
        fn(i)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        best = max(best, count / (time.perf_counter() - start))
    return best


def _count_for(rate_guess: float, seconds: float) -> int:
    return max(50, int(rate_guess * seconds / 4))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, type=output_file, help="write the results as JSON here")
    parser.add_argument("--sizes", type=int_list(16, 256), default="16,32,64,128,256",
                        help="comma-separated image sizes (16..256)")
    parser.add_argument("--seconds", type=positive_float, default=3.0,
                        help="rough time budget per measurement (> 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
               "procedural": {}, "render_only_32": None, "shards_32": None}
    rows = []
    for size in args.sizes:
        ds = ProceduralDataset(image_size=size, size=10**9, split="train")
        probe = _rate(lambda i, ds=ds: ds[i], 20, repeats=1)
        rate = _rate(lambda i, ds=ds: ds[i], _count_for(probe, args.seconds))
        results["procedural"][str(size)] = rate
        rows.append((f"procedural ds[i] {size}x{size}", rate))

    def render_one(i):
        rng = np.random.default_rng([0, 0, i])
        return render(sample_attributes(rng), rng, 32)

    results["render_only_32"] = _rate(render_one, _count_for(2000, args.seconds))
    rows.append(("render() only 32x32", results["render_only_32"]))

    try:
        from hybrid.data.shards import EvalShards, write_procedural
    except ImportError as err:  # e.g. a machine without webdataset: procedural numbers only
        print(f"shard reading skipped: {err}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            write_procedural(tmp, 2000, 32, per_shard=500, split="val", progress=False)
            stream = EvalShards(str(Path(tmp) / "val-*.tar"))
            start = time.perf_counter()
            n = sum(1 for _ in stream)
            results["shards_32"] = n / (time.perf_counter() - start)
            rows.append(("EvalShards read 32x32", results["shards_32"]))

    results["target_32"] = 2000.0
    rate_32 = results["procedural"].get("32")  # None when --sizes leaves 32 out: the target is not measured
    results["meets_target"] = None if rate_32 is None else rate_32 >= results["target_32"]
    print(f"{'measurement':32s} {'images/s':>10s}")
    for name, rate in rows:
        print(f"{name:32s} {rate:10.0f}")
    verdict = {None: "not measured (--sizes has no 32)", True: "met", False: "NOT met"}[results["meets_target"]]
    print(f"target: >= 2000 images/s at 32x32 on one core -> {verdict}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
