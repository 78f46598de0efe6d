"""Stage 1 benchmark: train the tokenizer with the default config and measure it on held-out images.

    python -m benchmarks.tokenizer --out runs/bench/tokenizer.json [--device auto] [--config FILE] [key=value ...]
    python -m benchmarks.tokenizer --reuse --run-dir runs/default      # measure an existing tokenizer

Trains `stage=tokenizer` exactly as `python train.py stage=tokenizer` does (same config, same
code) into `--run-dir`, recording the PSNR of both paths on a fixed held-out batch every
`--curve-every` steps against wall time (the time spent measuring is taken off the clock). Then, on
`--num-images` held-out images (procedural val split, a seed no run trains on):
- PSNR of the continuous path decode(z) and of the discrete path decode(z_q);
- reconstruction FID of both paths in oracle features against as many fresh real images, with 95%
  bootstrap intervals (the oracle must be trained: `python -m hybrid.eval.oracle train`);
- per-attribute adherence of both paths to the held-out images' own attributes (shape, color, ...):
  the ceiling any generator of this tokenizer's latents can reach, since its samples are decoded alike;
- codebook usage (codes used / min(codebook size, positions)) and perplexity per scale and pooled;
- the residual's share of the latent's energy, sum |r|^2 / sum |z|^2;
- encode + decode images/s at batch 100 (median of 3).
The held-out measurements run on `--device` (default: CUDA when available), recorded as `machine.device`;
the stage trains on `trainer.accelerator`'s device. Every run without `--reuse` trains afresh (retrain=true):
a tokenizer folder already in `--run-dir` is set aside as `tokenizer.before-retrain-<time>`, so repeated
runs keep the old copies (delete them when done). `tokenizer.checkpoint=...` is refused: the stage would
take that file instead of training; `--reuse` measures a trained tokenizer.
Targets (issue #3): stage <= 8 min; continuous >= 26 dB, discrete >= 22 dB; continuous FID below
the discrete one outside the intervals; usage >= 90% pooled and >= 50% at the finest scale.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import hybrid as _hybrid  # noqa: F401 -- before torch loads: OpenMP's short spin (hybrid/__init__.py)

# isort: split

import torch
from pytorch_lightning import Callback

from benchmarks.common import (
    add_device_argument,
    at_least,
    benchmark_device,
    config_and_oracle,
    disjoint,
    fmt_ci,
    heldout_images,
    heldout_samples,
    machine,
    median_seconds,
    one_line_errors,
    output_file,
    write_result,
)

CURVE_SEED = 31_337
EVAL_SEED = 31_338
REAL_SEED = 31_339


class PSNRCurve(Callback):
    """Every `every` steps: PSNR of both paths on fixed held-out images, against the training wall time."""

    def __init__(self, images: torch.Tensor, every: int) -> None:
        self.images, self.every = images, max(1, every)
        self.points: list[dict] = []
        self.start = 0.0
        self.measuring = 0.0  # seconds spent in this callback, taken off the clock

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.time()
        self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.points or self.points[-1]["step"] != trainer.global_step:
            self._measure(trainer, pl_module)

    @torch.no_grad()
    def _measure(self, trainer, pl_module) -> None:
        t0 = time.time()
        tok = pl_module.tokenizer
        was_training = tok.training
        tok.eval()
        cont, disc = reconstruct(tok, self.images.to(pl_module.device))
        tok.train(was_training)
        from hybrid.tokenizer.tokenizer import psnr

        self.points.append({"step": int(trainer.global_step),
                            "train_seconds": round(t0 - self.start - self.measuring, 1),
                            "psnr_continuous": float(psnr(cont, self.images)),
                            "psnr_discrete": float(psnr(disc, self.images))})
        self.measuring += time.time() - t0


@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor, batch_size: int = 250, keep=None):
    """(decode(z), decode(z_q)) clamped to [-1, 1], on the CPU (encoded and decoded on the tokenizer's device);
    `keep(out)` sees every encoder output."""
    device = next(tokenizer.parameters()).device
    cont, disc = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        out = tokenizer.encode(x)
        if keep is not None:
            keep(out)
        cont.append(tokenizer.decode(out.z).clamp(-1, 1).cpu())
        disc.append(tokenizer.decode(out.z_q).clamp(-1, 1).cpu())
    return torch.cat(cont), torch.cat(disc)


@torch.no_grad()
def measure(tokenizer, oracle, n: int, bootstrap: int = 200) -> dict:
    """The held-out measurements of a trained tokenizer (see the module docstring)."""
    from hybrid.eval.adherence import adherence
    from hybrid.eval.fid import bootstrap_fid, oracle_features
    from hybrid.tokenizer.quantizer import code_counts, usage_stats
    from hybrid.tokenizer.tokenizer import psnr

    size = tokenizer.image_size
    data = heldout_samples(size, n, EVAL_SEED)
    images, attrs = data["image"], data["attrs"]  # (N, 3, S, S), {attribute: (N,)}
    counts = torch.zeros(len(tokenizer.scales), tokenizer.codebook_size, dtype=torch.long)
    energy = torch.zeros(2, dtype=torch.float64)  # sum |r|^2, sum |z|^2

    def keep(out) -> None:
        nonlocal counts
        counts += code_counts([i.cpu() for i in out.indices], tokenizer.codebook_size)
        energy[0] += out.residual.double().pow(2).sum().cpu()
        energy[1] += out.z.double().pow(2).sum().cpu()

    cont, disc = reconstruct(tokenizer, images, keep=keep)
    real = oracle_features(heldout_images(size, n, REAL_SEED), oracle)
    usage = {k: float(v) for k, v in usage_stats(counts).items()}
    result = {
        "num_images": n,
        "psnr_continuous": float(psnr(cont, images)),
        "psnr_discrete": float(psnr(disc, images)),
        "fid_continuous": bootstrap_fid(oracle_features(cont, oracle), real, bootstrap),
        "fid_discrete": bootstrap_fid(oracle_features(disc, oracle), real, bootstrap),
        # the floor: real images against other real images
        "fid_real_vs_real": bootstrap_fid(oracle_features(images, oracle), real, bootstrap),
        "adherence_continuous": adherence(cont, attrs, oracle),
        "adherence_discrete": adherence(disc, attrs, oracle),
        "usage": usage,
        "residual_energy_share": float(energy[0] / energy[1]),
        "residual_std": tokenizer.residual_std.tolist(),
        "latent_std": tokenizer.latent_std.tolist(),
    }
    result["images_per_s"] = throughput(tokenizer, images[:100])
    return result


@torch.no_grad()
def throughput(tokenizer, batch: torch.Tensor, repeats: int = 3) -> float:
    """Encode + decode images/s at batch len(batch), on the tokenizer's device: median of `repeats` after a warm-up."""
    batch = batch.to(next(tokenizer.parameters()).device)
    return batch.shape[0] / median_seconds(lambda: tokenizer.decode(tokenizer.encode(batch).z), batch.device, repeats)


def refuse_checkpoint(cfg) -> str | None:
    """Why this benchmark cannot run with `tokenizer.checkpoint` set (None when it is not): the stage would take
    that file instead of training, and the report would time no training (stage_seconds ~0, no curve)."""
    source = cfg.tokenizer.checkpoint
    if not source:
        return None
    path = Path(source)
    if path.name == "final.ckpt" and path.parent.name == "tokenizer":  # a run's own: --reuse reads it in place
        how = f"--reuse --run-dir {path.parent.parent}"
    else:
        how = "--reuse --run-dir RUN with it copied to RUN/tokenizer/final.ckpt"
    return (f"tokenizer.checkpoint={source}: this benchmark trains and times a fresh tokenizer, and with a checkpoint "
            f"the stage takes that file instead; to measure it, drop tokenizer.checkpoint and pass {how}")


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="experiment YAML (default: configs/default.yaml)")
    parser.add_argument("--run-dir", default="runs/bench/tokenizer",
                        help="where the stage trains (its run_dir); each run without --reuse trains afresh and sets "
                             "the previous RUN_DIR/tokenizer folder aside as RUN_DIR/tokenizer.before-retrain-<time>, "
                             "so repeated runs keep old copies (delete them when done)")
    parser.add_argument("--reuse", action="store_true",
                        help="measure the run's existing tokenizer (RUN_DIR/tokenizer/final.ckpt), do not train")
    parser.add_argument("--num-images", type=at_least(2), default=5000, help="held-out images for PSNR/FID/usage")
    parser.add_argument("--curve-every", type=at_least(1), default=100, help="steps between PSNR-vs-time points")
    parser.add_argument("--curve-images", type=at_least(1), default=256, help="held-out images per curve point")
    parser.add_argument("--bootstrap", type=at_least(2), default=200,
                        help="bootstrap resamples for the FID intervals (at least 2: fewer give zero-width intervals, "
                             "which every 'outside the interval' verdict would pass)")
    parser.add_argument("--out", default=None, type=output_file, help="write the results as JSON here")
    add_device_argument(parser, "the held-out images are reconstructed, judged and timed (the stage trains on "
                        "trainer.accelerator's)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow --options
    device = benchmark_device(args.device)
    if device is None:
        return 2

    from hybrid.checkpoints import final_path
    from hybrid.config import to_dict
    from hybrid.lit.base import load_tokenizer

    cfg, oracle = config_and_oracle(args.config, [*args.overrides, f"run_dir={args.run_dir}", "stage=tokenizer"],
                                    device, refuse=refuse_checkpoint)
    if cfg is None:
        return oracle  # the exit code
    tok_cfg = to_dict(cfg)["tokenizer"]
    result = {"machine": machine(device),
              "command": " ".join(["python -m benchmarks.tokenizer", *(argv or sys.argv[1:])]),
              "tokenizer_config": tok_cfg}
    final = final_path(cfg.run_dir, "tokenizer")
    if args.reuse:
        if not final.is_file():
            print(f"error: --reuse: {final} does not exist", file=sys.stderr)
            return 1
    else:
        from hybrid.lit.runner import fit_stage

        cfg.retrain = True
        curve = PSNRCurve(heldout_images(cfg.data.image_size, args.curve_images, CURVE_SEED), args.curve_every)
        t0 = time.time()
        fit_stage(cfg, "tokenizer", callbacks=[curve])
        stage_seconds = time.time() - t0 - curve.measuring
        result["stage_seconds"] = round(stage_seconds, 1)
        result["curve"] = curve.points
    tokenizer = load_tokenizer(final)[0].to(device)
    torch.manual_seed(0)
    result.update(measure(tokenizer, oracle, args.num_images, args.bootstrap))
    result["targets"] = targets(result)
    report(result)
    write_result(args.out, result)
    return 0


def targets(r: dict) -> dict:
    out = {
        "psnr_continuous>=26": r["psnr_continuous"] >= 26.0,
        "psnr_discrete>=22": r["psnr_discrete"] >= 22.0,
        "fid_continuous_below_discrete_outside_ci": disjoint(r["fid_continuous"], r["fid_discrete"]),
        "usage_pooled>=0.9": r["usage"]["usage_pooled"] >= 0.9,
        "usage_finest>=0.5": r["usage"]["usage_finest"] >= 0.5,
    }
    if "stage_seconds" in r:
        out["stage<=8min"] = r["stage_seconds"] <= 480.0
    return out


def report(r: dict) -> None:
    if "curve" in r:
        print(f"{'step':>6s} {'train s':>8s} {'PSNR z':>8s} {'PSNR z_q':>9s}")
        for p in r["curve"]:
            print(f"{p['step']:6d} {p['train_seconds']:8.1f} {p['psnr_continuous']:8.2f} {p['psnr_discrete']:9.2f}")
        print(f"stage wall time (curve measurement excluded): {r['stage_seconds'] / 60:.2f} min")
    n = r["num_images"]
    print(f"\non {n} held-out images:")
    print(f"  PSNR continuous decode(z)   {r['psnr_continuous']:.2f} dB")
    print(f"  PSNR discrete decode(z_q)   {r['psnr_discrete']:.2f} dB")
    print(f"  FID continuous              {fmt_ci(r['fid_continuous'])}")
    print(f"  FID discrete                {fmt_ci(r['fid_discrete'])}")
    print(f"  FID real vs real (floor)    {fmt_ci(r['fid_real_vs_real'])}")
    for path in ("continuous", "discrete"):
        a = r[f"adherence_{path}"]
        print(f"  adherence {path:<17s} " + " ".join(f"{k} {100 * v:.1f}%" for k, v in a.items()))
    u = r["usage"]
    scales = sorted(int(k.split("/s")[1]) for k in u if k.startswith("usage/s"))
    print("  usage per scale             " + " ".join(f"{100 * u[f'usage/s{k}']:.0f}%" for k in scales)
          + f"  pooled {100 * u['usage_pooled']:.1f}%")
    print("  perplexity per scale        " + " ".join(f"{u[f'perplexity/s{k}']:.0f}" for k in scales)
          + f"  pooled {u['perplexity_pooled']:.0f}")
    print(f"  residual energy share       {100 * r['residual_energy_share']:.2f}% of |z|^2")
    print(f"  encode+decode               {r['images_per_s']:.0f} images/s (batch 100)")
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in r["targets"].items()))


if __name__ == "__main__":
    sys.exit(main())
