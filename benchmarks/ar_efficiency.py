"""Efficiency of the coarse AR model (stage 2): KV-cache decoding, next-scale vs raster sampling, training.

    python -m benchmarks.ar_efficiency --out runs/bench/ar_efficiency.json [--device auto]

Default size: ARConfig's defaults (width 192, depth 6, heads 4, mlp_ratio 4) on the default tokenizer
layout (TokenizerConfig's: scales 1,2,3,4,6,8 -> 130 tokens, codebook 1024, its latent channels), class condition.
A stand-in layout (random codebook, bilinear upsampling) replaces the tokenizer: only the AR cost is measured.

(a) decode: time of one raster decoding step (one new token per row) when the KV cache already holds
    L tokens, for L = full (the last step's cache, 129) and L = full / 4, at batch 1 and batch 16;
    medians over repeats, the cases timed in alternation. The ratio ms/token(full) / ms/token(quarter)
    should be <= 1.3.
(b) sampling: next-scale generation counts its forward passes (one per scale) and its images/s at
    batch 16 (guidance on: a doubled batch) vs raster order with the same model size.
(c) training: FLOPs of one training step (FlopCounterMode, attention counted through the math
    backend) divided by its time (forward + backward + grad clipping + AdamW step, batch 64, token
    cache on: indices given, the scale inputs built from them as the LightningModule does), over the
    fp32 matmul FLOP/s of `torch.mm` on 2048x2048 measured in the same run. Target: >= 40% on a CPU.
    With `--bf16` (the default) the same step is also timed under bf16 autocast (what `trainer.precision
    =bf16-mixed` does), alternating with fp32 steps: medians of each and their ratio. With `--compile`
    the module is compiled (what `trainer.compile` does) and its step is also timed against the same
    module run eager (`torch.compiler.set_stance("force_eager")`), in alternation, in bf16 with `--bf16`.
(d) token draw: one categorical draw per token of a batch (sample batch x L_img rows over the
    codebook), `torch.multinomial` (the sampler before 2026-11-27) vs the sampler's inverse-CDF
    `draw_categorical`, timed in alternation; medians.

On a CPU shared with other jobs, two threads can wait on each other at every small op (decoding is
all small ops): `--threads 1` gives steadier (a) and (b) timings there. The load average is recorded, and
the device everything ran on (`--device`, default: CUDA when available).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import hybrid as _hybrid  # noqa: F401 -- before torch loads: OpenMP's short spin (hybrid/__init__.py)

# isort: split

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import add_device_argument, at_least, benchmark_device, output_file, positive_float
from hybrid.ar import ARModel
from hybrid.ar.model import PreallocatedKVCache
from hybrid.ar.sampling import draw_categorical
from hybrid.config import ARConfig, SampleConfig, TokenizerConfig
from hybrid.devices import Stopwatch
from hybrid.nn.attention import get_default_backend, set_default_backend


class StandInLayout:
    """The duck-typed tokenizer interface the AR sampler uses: random codebook, bilinear upsampling."""

    def __init__(self, scales, codebook_size, channels, device):
        self.scales, self.codebook_size, self.latent_channels = list(scales), codebook_size, channels
        self.codebook = torch.randn(codebook_size, channels, generator=torch.Generator().manual_seed(0)).to(device)

    def downsample(self, z, s):
        return F.interpolate(z, size=(s, s), mode="area")  # (B, C, s, s)

    def accumulate(self, z_acc, idx, k):
        h = self.scales[-1]
        up = F.interpolate(self.codebook[idx].permute(0, 3, 1, 2), size=(h, h), mode="bilinear")  # (B, C, h, h)
        return up if z_acc is None else z_acc + up

    def next_scale_inputs(self, indices):
        out, z = [], None
        for k in range(len(indices) - 1):
            z = self.accumulate(z, indices[k], k)
            out.append(self.downsample(z, self.scales[k + 1]))
        return out


def timed(fn, device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn() on `device` (`Stopwatch`: a CUDA device is synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Stopwatch(device) as watch:
            fn()
        times.append(watch.seconds)
    return times


def load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def build(args, order, device):
    model = ARModel(scales=args.scales, codebook_size=args.codebook, latent_channels=args.channels,
                    num_classes=args.num_classes, order=order, condition="class", width=args.width,
                    depth=args.depth, heads=args.heads, mlp_ratio=args.mlp_ratio, cond_drop=0.1).to(device)
    torch.nn.init.normal_(model.head.linear.weight, std=0.02)  # non-uniform logits, as after training
    return model


def random_indices(args, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, args.codebook, (batch, s, s), generator=g).to(device) for s in args.scales]


# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def bench_decode(args, device) -> dict:
    """(a) One raster decoding step with L tokens cached, L = full and full / 4, at batch 1 and the sampling batch.

    The step is what `generate` runs per token (all blocks with their KV caches, then the head). The cases
    are timed in alternation, so a change of machine load hits them alike.
    """
    model = build(args, "raster", device).eval()
    cases, times = {}, {}
    for B in sorted({1, args.sample_batch}):
        for name, L in (("full", model.seq_len - 1), ("quarter", model.seq_len // 4)):  # full: the last step's
            caches = [PreallocatedKVCache(model.seq_len) for _ in model.blocks]
            # the adaLN condition (B, D) every block and the head take (None for a model without adaLN)
            c = torch.randn(B, args.width, device=device) if model.adaln else None
            model._transformer(torch.randn(B, L, args.width, device=device), 0, None, caches, c)  # L keys per layer
            saved = [(k.k, k.v) for k in caches]
            x = torch.randn(B, 1, args.width, device=device)  # the new token's input row

            def step(caches=caches, x=x, c=c):
                model.head(model._transformer(x, 0, None, caches, c), c)  # (B, 1, V)

            def restore(caches=caches, saved=saved):  # forget the new token: every repeat sees L cached
                for c, (k, v) in zip(caches, saved):
                    c.k, c.v = k, v

            cases[B, name] = (L, step, restore)
            times[B, name] = []
            for _ in range(3):  # warm-up
                step()
                restore()
    for _ in range(args.repeats):
        for key, (_, step, restore) in cases.items():
            times[key] += timed(step, device, 1, warmup=0)
            restore()
    out = {"batches": {}}
    for (B, name), (L, _, _) in cases.items():
        entry = out["batches"].setdefault(str(B), {})
        entry[name] = {"L": L, "ms_per_token_step": 1e3 * statistics.median(times[B, name])}
    for entry in out["batches"].values():
        entry["ratio_full_over_quarter"] = entry["full"]["ms_per_token_step"] / entry["quarter"]["ms_per_token_step"]
    return out


@torch.no_grad()
def bench_sampling(args, device) -> dict:
    """(b) Forward passes per generation and images/s, next_scale vs raster, batch 16 with guidance."""
    layout = StandInLayout(args.scales, args.codebook, args.channels, device)
    sample = SampleConfig()
    out = {"batch": args.sample_batch, "cfg": sample.cfg, "orders": {}}
    for order in ("next_scale", "raster"):
        model = build(args, order, device).eval()
        calls = [0]

        def count(*_, calls=calls):
            calls[0] += 1

        hook = model.blocks[0].register_forward_pre_hook(count)  # one call per model forward
        labels = torch.arange(args.sample_batch, device=device) % args.num_classes

        def gen(model=model, labels=labels):
            model.generate(labels, layout, torch.Generator(device).manual_seed(0), cfg=sample.cfg,
                           cfg_schedule=sample.cfg_schedule, temperature=sample.temperature, top_k=sample.top_k,
                           top_p=sample.top_p)

        calls[0] = 0
        gen()
        forwards = calls[0]
        times = timed(gen, device, args.sample_repeats, warmup=0)
        hook.remove()
        sec = statistics.median(times)
        out["orders"][order] = {"forwards_per_generation": forwards, "seconds_per_batch": sec,
                                "images_per_second": args.sample_batch / sec}
    out["next_scale_speedup"] = out["orders"]["next_scale"]["images_per_second"] / out["orders"]["raster"][
        "images_per_second"]
    return out


@torch.no_grad()
def bench_draw(args, device) -> dict:
    """(d) multinomial vs inverse-CDF draws over (batch x L_img, V) softmax rows, alternated."""
    rows = args.sample_batch * sum(s * s for s in args.scales)
    g = torch.Generator(device).manual_seed(0)
    probs = torch.softmax(2 * torch.randn(rows, args.codebook, generator=g, device=device), dim=-1)
    fns = {"multinomial": lambda: torch.multinomial(probs, 1, generator=g),
           "inverse_cdf": lambda: draw_categorical(probs, g)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name] += timed(fn, device, 1, warmup=0)
    out = {"rows": rows, "codebook": args.codebook,
           "ms": {k: 1000 * statistics.median(v) for k, v in times.items()}}
    out["speedup"] = out["ms"]["multinomial"] / out["ms"]["inverse_cdf"]
    return out


def mm_flops_per_second(device, repeats: int = 10) -> float:
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    sec = statistics.median(timed(lambda: torch.mm(a, b), device, repeats, warmup=2))
    return 2 * 2048**3 / sec


def bench_training(args, device) -> dict:
    """(c) Training-step FLOPs / time / matmul FLOP/s at batch 64 (the LightningModule's step)."""
    model = build(args, "next_scale", device).train()
    if args.compile:
        model.compile()  # compiles the module's __call__ in place, so model.loss uses it too
    layout = StandInLayout(args.scales, args.codebook, args.channels, device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    indices = random_indices(args, args.train_batch, device)
    labels = torch.arange(args.train_batch, device=device) % args.num_classes

    def step(bf16: bool = False):
        with torch.no_grad():
            inputs = layout.next_scale_inputs(indices)  # what the tokenizer does for cached indices
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # what bf16-mixed does
            loss, _ = model.loss(indices, labels, inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    old = get_default_backend()
    set_default_backend("math")  # FlopCounterMode counts no FLOPs for SDPA on the CPU; math is einsum
    try:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    finally:
        set_default_backend(old)
    mm_before = mm_flops_per_second(device)
    times = timed(step, device, args.train_steps, warmup=1)
    mm_after = mm_flops_per_second(device)
    sec = statistics.median(times)
    mm = statistics.median([mm_before, mm_after])
    params = sum(p.numel() for p in model.parameters())
    precision = None
    if args.bf16:  # fp32 and bf16-mixed steps in alternation, so both see the same machine load
        step(bf16=True)
        side = {"32-true": [], "bf16-mixed": []}
        for _ in range(args.train_steps):
            for name in side:
                side[name].extend(timed(lambda b=name == "bf16-mixed": step(bf16=b), device, 1, warmup=0))
        precision = {name: statistics.median(t) for name, t in side.items()}
        precision["speedup"] = precision["32-true"] / precision["bf16-mixed"]
        precision["times"] = side
    compiled = None
    if args.compile:  # the compiled step and the same module run eager, in alternation (bf16 when --bf16)
        from hybrid.lit.base import eager  # noqa: PLC0415 - Lightning import only for this part

        def eager_step():
            with eager():
                step(bf16=args.bf16)

        eager_step()
        side = {"compiled": [], "eager": []}
        for _ in range(args.train_steps):
            side["compiled"].extend(timed(lambda: step(bf16=args.bf16), device, 1, warmup=0))
            side["eager"].extend(timed(eager_step, device, 1, warmup=0))
        compiled = {name: statistics.median(t) for name, t in side.items()}
        compiled["speedup"] = compiled["eager"] / compiled["compiled"]
        compiled["precision"] = "bf16-mixed" if args.bf16 else "32-true"
        compiled["times"] = side
    return {"precision_side_by_side": precision, "compile_side_by_side": compiled,
            "batch": args.train_batch, "tokens_per_step": args.train_batch * sum(s * s for s in args.scales),
            "params": params, "flops_per_step": flops, "seconds_per_step": sec, "step_times": times,
            "achieved_flops_per_second": flops / sec, "mm_flops_per_second": mm,
            "mm_flops_per_second_before_after": [mm_before, mm_after], "utilization": flops / sec / mm,
            "compile": args.compile}


def main(argv: list[str] | None = None) -> int:
    ar, tok = ARConfig(), TokenizerConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=output_file, help="JSON file to write")
    p.add_argument("--width", type=at_least(4, multiple_of=4), default=ar.width,
                   help="model width (a multiple of 4: the 2D sin/cos positions)")
    p.add_argument("--depth", type=at_least(1), default=ar.depth)
    p.add_argument("--heads", type=at_least(1), default=ar.heads, help="attention heads (they must divide --width)")
    p.add_argument("--mlp-ratio", type=positive_float, default=ar.mlp_ratio)
    p.add_argument("--scales", type=at_least(1), nargs="+", default=list(tok.scales))
    p.add_argument("--codebook", type=at_least(1), default=tok.codebook_size)
    p.add_argument("--channels", type=at_least(1), default=tok.latent_channels)
    p.add_argument("--num-classes", type=at_least(1), default=100)
    p.add_argument("--sample-batch", type=at_least(1), default=16)
    p.add_argument("--train-batch", type=at_least(1), default=64)
    p.add_argument("--repeats", type=at_least(1), default=30, help="decoding-step repeats")
    p.add_argument("--sample-repeats", type=at_least(1), default=3)
    p.add_argument("--train-steps", type=at_least(1), default=3, help="timed training steps (after one warm-up)")
    p.add_argument("--threads", type=at_least(0), default=0, help="torch threads on the CPU (0 = torch's default)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model for the training step, and time it against the same module run "
                        "eager, in alternation")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="(c) also time the step under bf16 autocast, alternating with fp32")
    p.add_argument("--parts", nargs="+", default=["decode", "sampling", "training", "draw"],
                   choices=["decode", "sampling", "training", "draw"])
    add_device_argument(p, "the AR model runs and is timed")
    args = p.parse_args(argv)
    if args.width % args.heads:
        p.error(f"argument --heads: {args.heads} must divide --width {args.width}")
    if args.scales != sorted(set(args.scales)):
        p.error(f"argument --scales: must be strictly increasing (a token map per scale, coarse to fine), got "
                f"{' '.join(map(str, args.scales))}")
    device = benchmark_device(args.device)
    if device is None:
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_average_before": load(), "attention_backend": get_default_backend(),
              "size": {"width": args.width, "depth": args.depth, "heads": args.heads, "mlp_ratio": args.mlp_ratio,
                       "scales": args.scales, "codebook": args.codebook, "channels": args.channels}}
    if "decode" in args.parts:
        result["decode"] = bench_decode(args, device)
    if "sampling" in args.parts:
        result["sampling"] = bench_sampling(args, device)
    if "training" in args.parts:
        result["training"] = bench_training(args, device)
    if "draw" in args.parts:
        result["draw"] = bench_draw(args, device)
    result["load_average_after"] = load()

    size = result["size"]
    print(f"AR efficiency on {device} ({result['threads']} threads), width {size['width']} depth {size['depth']} "
          f"heads {size['heads']}, scales {size['scales']}, codebook {size['codebook']}; "
          f"load average {result['load_average_before']} -> {result['load_average_after']}")
    rows = []
    if "decode" in result:
        for B, entry in result["decode"]["batches"].items():
            for name in ("full", "quarter"):
                c = entry[name]
                rows.append((f"(a) raster decode step, batch {B}, cache L={c['L']} ({name})",
                             f"{c['ms_per_token_step']:.2f} ms"))
            rows.append((f"(a) batch {B}: ms/token full / quarter (target <= 1.3)",
                         f"{entry['ratio_full_over_quarter']:.3f}"))
    if "sampling" in result:
        s = result["sampling"]
        for order, o in s["orders"].items():
            rows.append((f"(b) {order}: forwards per generation", str(o["forwards_per_generation"])))
            rows.append((f"(b) {order}: images/s, batch {s['batch']}, cfg {s['cfg']}", f"{o['images_per_second']:.1f}"))
        rows.append(("(b) next_scale / raster images/s", f"{s['next_scale_speedup']:.1f}x"))
    if "training" in result:
        t = result["training"]
        rows.append((f"(c) training step FLOPs, batch {t['batch']}", f"{t['flops_per_step'] / 1e9:.1f} GFLOP"))
        rows.append(("(c) training step time (median)", f"{t['seconds_per_step']:.2f} s"))
        rows.append(("(c) achieved / torch.mm 2048^2 FLOP/s",
                     f"{t['achieved_flops_per_second'] / 1e9:.1f} / {t['mm_flops_per_second'] / 1e9:.1f} GFLOP/s"))
        rows.append(("(c) utilization (target >= 40%)", f"{100 * t['utilization']:.1f}%"))
        if t["precision_side_by_side"]:
            pr = t["precision_side_by_side"]
            rows.append(("(c) step time fp32 / bf16-mixed, in alternation",
                         f"{pr['32-true']:.2f} / {pr['bf16-mixed']:.2f} s ({pr['speedup']:.2f}x)"))
        if t.get("compile_side_by_side"):
            co = t["compile_side_by_side"]
            rows.append((f"(c) step time eager / compiled ({co['precision']}), in alternation",
                         f"{co['eager']:.2f} / {co['compiled']:.2f} s ({co['speedup']:.2f}x)"))
    if "draw" in result:
        d = result["draw"]
        rows.append((f"(d) token draw, {d['rows']} rows x {d['codebook']}: multinomial / inverse CDF",
                     f"{d['ms']['multinomial']:.1f} / {d['ms']['inverse_cdf']:.1f} ms ({d['speedup']:.1f}x)"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
