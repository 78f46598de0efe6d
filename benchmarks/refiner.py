"""Stage 3 benchmark: how much the refiner adds to ground-truth z_q, in how few steps, and the baseline.

    python -m benchmarks.refiner --run-dir runs/bench/refiner --out runs/bench/refiner.json \\
        [--tokenizer runs/bench/tokenizer/tokenizer/final.ckpt] [--baseline] [--device auto] [--config FILE]
        [key=value ...]

Trains what the run directory lacks, exactly as `python train.py stage=...` does: the tokenizer
(unless `--tokenizer` names a trained one), the refiner, and with `--baseline` the pure-diffusion
baseline. Then, on `--num-images` held-out images (procedural val split, a seed no run trains on)
against as many fresh real ones, all in oracle features with 95% bootstrap intervals:
- FID of decode(z_q) (the coarse code alone), decode(z) (the tokenizer's ceiling),
  decode(z_q + Gaussian noise of the residual's per-channel std) (what a refiner that learned only
  the residual's scale would give) and decode(z_q + refined r) with the refiner's EMA weights, for
  1, 2, 4 and 8 steps with each sampler of its objective (ddpm: ddim, dpm; flow: euler, dpm), each with its images/s;
- per-attribute adherence (oracle accuracy against the images' true attributes) of z_q and of the
  refined images;
- EMA against raw weights: the same refinement (same noise) with the raw weights of the final step
  (final.ckpt's `current_model_state`), and FID(raw) - FID(EMA) with a paired interval;
- the baseline (`--baseline`): FID and images/s (batch 16) of class-conditional samples at 10, 25 and
  50 steps, and their adherence to what a class asks for (shape and color; its "all" is both at once); for
  both denoisers the parameters and the forward time per image (batch 64).
Every refined row is also paired with decode(z_q) on the same images: FID(row) - FID(z_q) and, per
attribute, adherence(row) - adherence(z_q), each with a paired bootstrap interval.

Two references. Every row's FID is measured against the real images (`fid`, `fid_vs_z_q`; raw weights:
`fid_vs`) and against the same real images passed through the tokenizer, decode(encode(x).z)
(`fid_decoded_ref`, `fid_vs_z_q_decoded_ref`; raw weights: `fid_vs_decoded_ref`): the distribution a
perfect refiner's images, decode(z), would match. The decoder is blurrier than the data,
and the real-image FID rewards high-frequency energy the decoder cannot make, whatever its source: the
row `z_q_sharpened` (decode(z_q) through a fixed 3x3 unsharp mask, `unsharp`, which adds no information
about the image) checks how much. The decoded reference shares the decoder's blur, so it judges the
refiner's own job, turning z_q into z (see "What the oracle's FID rewards" in docs/results.md).
Measured on `--device` (default: CUDA when available), recorded as `machine.device`; the stages train
on `trainer.accelerator`'s device.
Targets (issue #5): refined FID below z_q's outside the intervals, adherence no lower (as measured,
by the paired interval per attribute, and by a one-sided exact sign test per attribute on the rows where the two
disagree, Holm-corrected over the attributes at 2.5%, the lower side of a 95% interval: seven separate 95% intervals
find "some attribute lower" in about one run of five where nothing differs); 4 steps within the interval of 8
steps; the FID ones also against the decoded reference (`..._against_decoded_real`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import hybrid as _hybrid  # noqa: F401 -- before torch loads: OpenMP's short spin (hybrid/__init__.py)

# isort: split

import torch

from benchmarks.common import (
    add_device_argument,
    at_least,
    benchmark_device,
    config_and_oracle,
    disjoint,
    fmt_ci,
    heldout_images,
    heldout_samples,
    int_list,
    machine,
    median_seconds,
    one_line_errors,
    output_file,
    write_result,
)
from hybrid.eval.adherence import holm_rejected
from hybrid.names import SAMPLERS

UNSHARP_AMOUNT = 0.2  # the judge check row: x + 0.2 * (x - blur(x))

EVAL_SEED = 41_001
REAL_SEED = 41_002


def load_stage(path, stage: str, raw: bool = False, device: torch.device | str = "cpu"):
    """The LightningModule of a refiner/diffusion checkpoint, eval mode, on `device`; `raw` swaps in the non-EMA
    weights."""
    from hybrid.checkpoints import last_path, load_checkpoint, sub_state_dict
    from hybrid.lit.refiner import DiffusionModule, RefinerModule

    cls = RefinerModule if stage == "refiner" else DiffusionModule
    module = cls.load_from_checkpoint(str(path), map_location="cpu", weights_only=True).eval()
    module.checkpoint_path = str(path)
    if raw:
        # final.ckpt keeps the final step's raw weights in current_model_state (WarmupEMA). Checkpoints
        # written before it did hold the average there too; their raw weights are in last.ckpt when
        # that is from the same step.
        final = load_checkpoint(path, expect_stage=stage)
        raw_state = sub_state_dict(final.get("current_model_state") or {}, "model")
        ema_state = sub_state_dict(final["state_dict"], "model")
        if not raw_state or all(torch.equal(raw_state[k], ema_state[k]) for k in ema_state if k in raw_state):
            last = load_checkpoint(last_path(Path(path).parents[1], stage), expect_stage=stage)
            if "current_model_state" not in last or last.get("global_step") != final.get("global_step"):
                raise ValueError(f"no raw weights of step {final.get('global_step')} in or beside {path}: its "
                                 f"current_model_state is the average (written before raw weights were kept) and "
                                 f"last.ckpt is missing, from another step, or holds no current_model_state "
                                 f"(trained without EMA?)")
            raw_state = sub_state_dict(last["current_model_state"], "model")
        module.model.load_state_dict(raw_state)
    return module.to(device)


@torch.no_grad()
def refine_all(module, z_q: torch.Tensor, classes: torch.Tensor, steps: int, sampler: str, batch: int = 250,
               seed: int = 0) -> torch.Tensor:
    """decode(z_q + refined residual) for every row of z_q (N, C, h, w): images (N, 3, H, W) in [-1, 1]."""
    from hybrid.models import refiner_target_std
    from hybrid.refiner.diffusion import refiner_compose

    std = refiner_target_std(module.model, module.tokenizer)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, z_q.shape[0], batch):
        zq = z_q[start:start + batch]
        cond = classes[start:start + batch] if module.model.condition == "class" else None
        x0 = module.diffusion.sample(module.model, tuple(zq.shape), zq, cond, steps, gen, sampler=sampler)
        z = refiner_compose(x0, zq, std, module.section.target)
        out.append(module.tokenizer.decode(z).clamp(-1, 1))
    return torch.cat(out)


def noise_residual(z_q: torch.Tensor, residual_std: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """z_q + Gaussian noise with the residual's per-channel std: the refiner's floor. A refiner that
    knew nothing about the residual but its scale would write this, so one worth its steps beats it."""
    from hybrid.refiner.diffusion import refiner_compose

    noise = torch.randn(z_q.shape, generator=torch.Generator().manual_seed(seed)).to(z_q.device)  # same on any device
    return refiner_compose(noise, z_q, residual_std)


def unsharp(images: torch.Tensor, amount: float = UNSHARP_AMOUNT) -> torch.Tensor:
    """images (N, 3, H, W) in [-1, 1] through an unsharp mask, x + amount * (x - blur(x)), blur the 3x3
    binomial filter (edges replicated), clamped to [-1, 1]: more high-frequency energy, no new information."""
    kernel = torch.tensor([1.0, 2.0, 1.0], device=images.device, dtype=images.dtype)
    kernel = (kernel[:, None] * kernel[None]) / 16  # (3, 3), sums to 1
    channels = images.shape[1]
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    weight = kernel.expand(channels, 1, 3, 3).contiguous()  # one filter per channel
    blurred = torch.nn.functional.conv2d(padded, weight, groups=channels)
    return (images + amount * (images - blurred)).clamp(-1, 1)


@torch.no_grad()
def sample_baseline(module, classes: torch.Tensor, steps: int, batch: int = 250, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, classes.shape[0], batch):
        cond = classes[start:start + batch] if module.model.condition == "class" else None
        z = module.generate(cond, min(batch, classes.shape[0] - start), steps, gen)
        out.append(module.tokenizer.decode(z).clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def forward_ms_per_image(module, coarse: bool, batch: int = 64) -> float:
    """Median ms per image of one denoiser forward at batch `batch`, on the module's device."""
    tok = module.tokenizer
    shape = (batch, tok.latent_channels, tok.latent_size, tok.latent_size)
    x = torch.randn(shape, device=module.device)
    z_q = torch.randn(shape, device=module.device) if coarse else None
    t = torch.full((batch,), 500, device=module.device)
    cond = torch.zeros(batch, dtype=torch.long, device=module.device) if module.model.condition == "class" else None
    return 1000 * median_seconds(lambda: module.model(x, t, z_q, cond), x.device, repeats=5) / batch


def measure_refiner(refiner, z_q, classes, steps_list, judge, result) -> str:
    """The step ablation per sampler, EMA vs raw weights, size and forward time; returns the default setting."""
    from hybrid.devices import Stopwatch

    rcfg = refiner.section
    result["refiner"] = {k: rcfg[k] for k in ("arch", "width", "depth", "objective", "prediction", "target",
                                               "condition", "corrupt_prob", "coarse_scales", "sampler", "steps")}
    n = z_q.shape[0]
    result["ablation"] = {}
    for sampler in SAMPLERS[rcfg.objective]:
        for steps in steps_list:
            with Stopwatch(z_q.device) as watch:
                refined = refine_all(refiner, z_q, classes, steps, sampler)
            entry = judge(refined, name=f"{sampler}/{steps}")
            entry["images_per_s"] = n / watch.seconds  # refine + decode, batch 250
            result["ablation"][f"{sampler}/{steps}"] = entry
            print(f"refined {sampler:5s} {steps} steps  FID {fmt_ci(entry['fid'])}{vs_z_q(entry)}  "
                  f"adherence(all) {100 * entry['adherence']['all']:.1f}%  {entry['images_per_s']:.0f} img/s"
                  f"{vs_decoded(entry)}")
    default_key = f"{rcfg.sampler}/{rcfg.steps}"
    if default_key not in result["ablation"]:
        result["ablation"][default_key] = judge(refine_all(refiner, z_q, classes, rcfg.steps, rcfg.sampler),
                                                name=default_key)
    try:
        raw = load_stage(refiner.checkpoint_path, "refiner", raw=True, device=refiner.device)
    except ValueError as err:  # e.g. a run whose last.ckpt is a later or earlier snapshot: the rest still counts
        result["raw_weights"] = None
        print(f"raw weights: not measured ({err})")
    else:
        result["raw_weights"] = {"setting": default_key, **judge(
            refine_all(raw, z_q, classes, rcfg.steps, rcfg.sampler), against=default_key)}
        d = result["raw_weights"]["fid_vs"]
        print(f"raw weights {default_key}  FID {fmt_ci(result['raw_weights']['fid'])} "
              f"(EMA: {fmt_ci(result['ablation'][default_key]['fid'])}; raw - EMA {d['difference']:+.2f} "
              f"[{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}], paired){vs_decoded(result['raw_weights'])}")
        d = result["raw_weights"]["fid_vs_decoded_ref"]
        print(f"  against decoded real images: raw - EMA {d['difference']:+.2f} "
              f"[{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}], paired")
    result["refiner_params"] = sum(p.numel() for p in refiner.model.parameters())
    result["refiner_forward_ms_per_image"] = forward_ms_per_image(refiner, coarse=True)
    return default_key


def sampling_config(cfg, stage: str):
    """The `stage` ("refiner" or "diffusion") config section this benchmark samples with: that of the checkpoint
    the stage is taken from (`<stage>.checkpoint`, or the run's finished one, which training skips) when there
    is one, else `cfg`'s, which it is trained with."""
    from hybrid.checkpoints import checkpoint_config, final_path, load_checkpoint

    path = Path(cfg[stage].checkpoint) if cfg[stage].checkpoint else final_path(cfg.run_dir, stage)
    if cfg.retrain or not path.is_file():
        return cfg[stage]
    return checkpoint_config(load_checkpoint(path, expect_stage=stage))[stage]


def step_problem(cfg, steps: list[int] | None, baseline_steps: list[int] | None) -> str | None:
    """Why `--steps` (the refiner's, for each sampler of its objective) or `--baseline-steps` (the baseline's, with
    its sampler) cannot be sampled: more steps than the denoiser's training timesteps (what `sample.py` refuses,
    `Diffusion.most_steps`). Checked before any stage trains: diffusers' own error came after all the training.
    None = the refiner's (the baseline's) are not measured."""
    from hybrid.refiner.diffusion import Diffusion

    for stage, flag, counts in (("refiner", "--steps", steps), ("diffusion", "--baseline-steps", baseline_steps)):
        if not counts:
            continue
        section = sampling_config(cfg, stage)
        diffusion = Diffusion.from_config(section)
        samplers = SAMPLERS[section.objective] if stage == "refiner" else (section.sampler,)
        for sampler in samplers:
            most = diffusion.most_steps(sampler)
            if most is not None and max(counts) > most:
                return (f"{flag} {max(counts)}: the {stage} is trained with {most} timesteps "
                        f"({stage}.num_train_timesteps), so its {sampler} sampler takes at most {most} steps")
    return None


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refiner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="experiment YAML (default: configs/default.yaml)")
    parser.add_argument("--run-dir", default="runs/bench/refiner", help="run directory the stages train into")
    parser.add_argument("--tokenizer", default="", help="a trained tokenizer checkpoint to use (else trained)")
    parser.add_argument("--baseline", action="store_true", help="also train and measure the pure-diffusion baseline")
    parser.add_argument("--no-refiner", dest="refiner", action="store_false",
                        help="skip the refiner measurements (with --baseline: to add the baseline to an earlier "
                        "run)")
    parser.add_argument("--num-images", type=at_least(2), default=2000,
                        help="held-out images (and real images) for FID")
    parser.add_argument("--steps", type=int_list(1), default="1,2,4,8",
                        help="refiner step counts, comma-separated (default 1,2,4,8; at most "
                        "refiner.num_train_timesteps)")
    parser.add_argument("--baseline-steps", type=int_list(1), default="10,25,50",
                        help="baseline step counts, comma-separated (default 10,25,50; at most "
                        "diffusion.num_train_timesteps)")
    parser.add_argument("--bootstrap", type=at_least(2), default=200,
                        help="bootstrap resamples for the FID intervals (at least 2: fewer give zero-width intervals, "
                             "which every 'outside the interval' verdict would pass)")
    parser.add_argument("--out", default=None, type=output_file, help="write the results as JSON here")
    add_device_argument(parser, "held-out images are encoded, refined, sampled, judged and timed (the stages "
                        "train on trainer.accelerator's)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow --options
    if not args.refiner and not args.baseline:  # it loaded the baseline to measure after training the tokenizer
        parser.error("--no-refiner without --baseline measures nothing: --no-refiner skips the refiner, and only "
                     "--baseline measures the pure-diffusion baseline (the tokenizer alone: benchmarks.tokenizer)")
    device = benchmark_device(args.device)
    if device is None:
        return 2

    from hybrid.checkpoints import final_path
    from hybrid.eval.adherence import adherence_from_logits, oracle_logits, paired_adherence_difference
    from hybrid.eval.evaluate import class_request_attrs, decoded_features
    from hybrid.eval.fid import RealResamples, bootstrap_fid, oracle_features, paired_fid_difference
    from hybrid.lit.runner import fit_stage

    overrides = [*args.overrides, f"run_dir={args.run_dir}"]
    if args.tokenizer:
        overrides.append(f"tokenizer.checkpoint={args.tokenizer}")
    cfg, oracle = config_and_oracle(args.config, overrides, device, refuse=lambda cfg: step_problem(
        cfg, args.steps if args.refiner else None, args.baseline_steps if args.baseline else None))
    if cfg is None:
        return oracle  # the exit code
    result = {"machine": machine(device),
              "command": " ".join(["python -m benchmarks.refiner", *(argv or sys.argv[1:])])}
    stages = (([] if args.tokenizer else ["tokenizer"]) + (["refiner"] if args.refiner else [])
              + (["diffusion"] if args.baseline else []))
    result["train_minutes"] = {}
    for stage in stages:
        t0 = time.time()
        trained = not final_path(cfg.run_dir, stage).is_file()
        fit_stage(cfg, stage)
        if trained:
            result["train_minutes"][stage] = round((time.time() - t0) / 60, 2)

    torch.manual_seed(0)
    first = "refiner" if args.refiner else "diffusion"
    probe = load_stage(final_path(cfg.run_dir, first), first, device=device)
    tok = probe.tokenizer
    data = heldout_samples(tok.image_size, args.num_images, EVAL_SEED)
    images, classes, attrs = data["image"], data["class_id"], data["attrs"]
    real_images = heldout_images(tok.image_size, args.num_images, REAL_SEED)
    real = RealResamples(oracle_features(real_images, oracle))  # the resamples each row's FID shares
    real_decoded = None  # the same real images through the tokenizer, decode(encode(x).z): set below

    z_q_features = z_q_logits = None  # decode(z_q)'s oracle features and logits, set below: rows of the same
    kept = {}  # images are paired with them; `kept`: features of rows judged with a `name` (for `against`)

    def judge(fake: torch.Tensor, paired: bool = True, name: str | None = None, against: str | None = None,
              requested: dict | None = None) -> dict:
        """`requested`: the attributes the images were asked for (default: every attribute of the held-out image
        whose z_q they refine)."""
        feats, logits = oracle_features(fake, oracle), oracle_logits(fake, oracle)
        out = {"fid": bootstrap_fid(feats, real, args.bootstrap),
               "adherence": adherence_from_logits(logits, attrs if requested is None else requested),
               "fid_decoded_ref": bootstrap_fid(feats, real_decoded, args.bootstrap)}
        if paired:  # the same held-out images, row for row: FID(row) - FID(z_q) and adherence(row) - adherence(z_q)
            diff = paired_fid_difference(feats, z_q_features, real, args.bootstrap)
            out["fid_vs_z_q"] = {"difference": diff["difference"], "ci": diff["ci"]}
            diff = paired_fid_difference(feats, z_q_features, real_decoded, args.bootstrap)
            out["fid_vs_z_q_decoded_ref"] = {"difference": diff["difference"], "ci": diff["ci"]}
            out["adherence_vs_z_q"] = paired_adherence_difference(logits, z_q_logits, attrs)
        if against is not None:  # FID(row) - FID(the row named `against`), the same images, paired
            diff = paired_fid_difference(feats, kept[against], real, args.bootstrap)
            out["fid_vs"] = {"row": against, "difference": diff["difference"], "ci": diff["ci"]}
            diff = paired_fid_difference(feats, kept[against], real_decoded, args.bootstrap)
            out["fid_vs_decoded_ref"] = {"row": against, "difference": diff["difference"], "ci": diff["ci"]}
        if name is not None:
            kept[name] = feats
        return out

    with torch.no_grad():
        enc = [tok.encode(images[i:i + 250].to(device)) for i in range(0, images.shape[0], 250)]
        z = torch.cat([e.z for e in enc])
        z_q = torch.cat([e.z_q for e in enc])
        decode = lambda lat: torch.cat([tok.decode(lat[i:i + 250]).clamp(-1, 1) for i in range(0, lat.shape[0], 250)])  # noqa: E731
        real_decoded = RealResamples(decoded_features(tok, oracle, real_images, device, 250))
        z_q_images = decode(z_q)
        z_q_features, z_q_logits = oracle_features(z_q_images, oracle), oracle_logits(z_q_images, oracle)
        result["z_q"] = judge(z_q_images, paired=False)
        result["z"] = judge(decode(z))
        result["z_q_plus_noise"] = judge(decode(noise_residual(z_q, tok.residual_std)))
        result["z_q_sharpened"] = judge(unsharp(z_q_images))
    print(f"decode(z_q)  FID {fmt_ci(result['z_q']['fid'])}{vs_decoded(result['z_q'])}")
    print(f"decode(z)    FID {fmt_ci(result['z']['fid'])}{vs_z_q(result['z'])}{vs_decoded(result['z'])}")
    print(f"decode(z_q + noise of the residual's scale)  FID {fmt_ci(result['z_q_plus_noise']['fid'])}"
          f"{vs_decoded(result['z_q_plus_noise'])}")
    print(f"decode(z_q), unsharp mask {UNSHARP_AMOUNT} (judge check: no new information)  "
          f"FID {fmt_ci(result['z_q_sharpened']['fid'])}{vs_z_q(result['z_q_sharpened'])}"
          f"{vs_decoded(result['z_q_sharpened'])}")
    steps_list = args.steps
    if args.refiner:
        coarse = z_q
        if probe.section.coarse_scales:  # the refiner reads only the first scales: refine those
            with torch.no_grad():
                coarse = torch.cat([probe.coarse_of(e) for e in enc])
                result["z_q_coarse"] = judge(decode(coarse))
            print(f"decode(z_q of the first {probe.section.coarse_scales} scales)  "
                  f"FID {fmt_ci(result['z_q_coarse']['fid'])}{vs_decoded(result['z_q_coarse'])}")
        default_key = measure_refiner(probe, coarse, classes, steps_list, judge, result)
        print(f"adherence {default_key} - z_q (paired, points): " + ", ".join(
            f"{a} {100 * d['difference']:+.2f} [{100 * d['ci'][0]:+.2f}, {100 * d['ci'][1]:+.2f}]"
            for a, d in result["ablation"][default_key]["adherence_vs_z_q"].items()))
        result["targets"] = targets(result, default_key, steps_list)
    if args.baseline:
        base = load_stage(final_path(cfg.run_dir, "diffusion"), "diffusion", device=device)
        dcfg = base.section
        result["baseline"] = {"config": {k: dcfg[k] for k in ("arch", "width", "depth", "objective", "sampler")},
                              "params": sum(p.numel() for p in base.model.parameters()),
                              "forward_ms_per_image": forward_ms_per_image(base, coarse=False), "steps": {}}
        for steps in args.baseline_steps:
            # class-conditional samples were asked for the class alone: shape and color, not the held-out
            # image's position, size, fill or background
            entry = judge(sample_baseline(base, classes, steps), paired=False, requested=class_request_attrs(attrs))
            entry["images_per_s"] = 16 / median_seconds(lambda s=steps: sample_baseline(base, classes[:16], s),
                                                         base.device)
            result["baseline"]["steps"][str(steps)] = entry
            print(f"baseline {steps:2d} steps  FID {fmt_ci(entry['fid'])}  {entry['images_per_s']:.1f} img/s (b16)"
                  f"{vs_decoded(entry)}")
    if "targets" in result:
        print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in result["targets"].items()))
    write_result(args.out, result)
    return 0


def vs_z_q(entry: dict, key: str = "fid_vs_z_q") -> str:
    """' (vs z_q -1.23 [-1.50, -0.90], paired)' from a judged row's paired difference `key`, or '' when it has none."""
    d = entry.get(key)
    return f" (vs z_q {d['difference']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}], paired)" if d else ""


def vs_decoded(entry: dict) -> str:
    """'  | against decoded real images: FID 3.28 [2.63, 4.13] (vs z_q -0.74 [...], paired)' from a judged row."""
    return (f"  | against decoded real images: FID {fmt_ci(entry['fid_decoded_ref'])}"
            f"{vs_z_q(entry, 'fid_vs_z_q_decoded_ref')}")


def targets(r: dict, default_key: str, steps_list: list[int]) -> dict:
    refined = r["ablation"][default_key]
    attrs = [k for k in r["z_q"]["adherence"] if k != "all"]
    out = {
        f"refined({default_key})_fid_below_z_q_outside_ci": disjoint(refined["fid"], r["z_q"]["fid"]),
        f"refined({default_key})_fid_below_z_q_by_paired_interval": refined["fid_vs_z_q"]["ci"][1] < 0,
        f"refined({default_key})_fid_below_z_q_plus_noise": refined["fid"]["fid"] < r["z_q_plus_noise"]["fid"]["fid"],
        # against the real images through the tokenizer (the refiner's own job; see the module docstring)
        f"refined({default_key})_fid_below_z_q_outside_ci_against_decoded_real": disjoint(
            refined["fid_decoded_ref"], r["z_q"]["fid_decoded_ref"]),
        f"refined({default_key})_fid_below_z_q_by_paired_interval_against_decoded_real":
            refined["fid_vs_z_q_decoded_ref"]["ci"][1] < 0,
        "refined_adherence_no_lower_than_z_q": all(
            refined["adherence"][a] >= r["z_q"]["adherence"][a] for a in attrs),
        # the same images row for row: no attribute whose paired interval lies wholly below 0
        "refined_adherence_not_lower_than_z_q_by_paired_interval": all(
            refined["adherence_vs_z_q"][a]["ci"][1] >= 0 for a in attrs),
        # the same question as one family: an exact sign test per attribute on the rows where the two disagree,
        # Holm-corrected over the attributes (an interval per attribute errs on some attribute far more often)
        "refined_adherence_not_lower_than_z_q_by_holm_sign_test": not holm_rejected(
            {a: refined["adherence_vs_z_q"][a]["p_lower"] for a in attrs}),
    }
    if r["raw_weights"] is not None:
        out["ema_fid_below_raw"] = refined["fid"]["fid"] < r["raw_weights"]["fid"]["fid"]
        out["ema_fid_below_raw_outside_ci"] = disjoint(refined["fid"], r["raw_weights"]["fid"])
        out["ema_fid_below_raw_by_paired_interval"] = r["raw_weights"]["fid_vs"]["ci"][0] > 0  # raw - EMA > 0
    if 4 in steps_list and 8 in steps_list:
        for sampler in {k.split("/")[0] for k in r["ablation"]}:
            four, eight = r["ablation"][f"{sampler}/4"]["fid"], r["ablation"][f"{sampler}/8"]["fid"]
            out[f"{sampler}: 4 steps within the interval of 8"] = eight["ci"][0] <= four["fid"] <= eight["ci"][1]
    return out


if __name__ == "__main__":
    sys.exit(main())
