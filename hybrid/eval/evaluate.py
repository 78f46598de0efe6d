"""`train.py stage=eval`: every trained mode of a run, judged by the oracle, into `<run_dir>/metrics.json`.

One object per mode — `tokenizer` (reconstructions: decode(z) and decode(z_q)), `ar` (pure AR:
decode the AR's z_q), `hybrid` (AR + refiner), `diffusion` (when trained) — each with `fid` and
`fid_ci` (oracle features, `eval.num_samples` images against as many fresh real ones, 95% bootstrap
interval), `adherence` ({"class": per-attribute accuracy for class prompts, "text": for full-caption
prompts}, text only for text-conditioned models), `glyph_accuracy` (glyph prompts), `images_per_s`
(batch 16), `ms_per_image_b1`, and `params` (per stage of that mode).

Requests are drawn like the validation data (fixed seed), so FID compares like with like: class
prompts carry the first object's shape and color; text prompts name every attribute.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hybrid.checkpoints import write_json
from hybrid.data.attributes import ATTRIBUTES, class_id
from hybrid.data.procedural import caption, sample_attributes
from hybrid.images import save_grid

EVAL_REQUEST_SEED = 20_261_127
TIMING_BATCH = 16


def make_requests(n: int, seed: int = EVAL_REQUEST_SEED, glyph_prob: float = 0.2, holdout=(),
                  only_holdout: bool = False) -> dict:
    """n attribute requests as the data draws them: {"attrs": {name: (n,) long}, "classes": (n,), "captions"}."""
    rng = np.random.default_rng(seed)
    rows = [sample_attributes(rng, holdout=holdout, only_holdout=only_holdout, glyph_prob=glyph_prob)
            for _ in range(n)]
    attrs = {name: torch.tensor([r[name] for r in rows], dtype=torch.long) for name in ATTRIBUTES}
    classes = torch.tensor([class_id(r["shape"], r["color"]) for r in rows], dtype=torch.long)
    return {"attrs": attrs, "classes": classes, "captions": [caption(r) for r in rows]}


def class_request_attrs(attrs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a class prompt asks for: shape and color; the rest is not requested (-1)."""
    return {k: (v if k in ("shape", "color") else torch.full_like(v, -1)) for k, v in attrs.items()}


def _generate(pipe, mode: str, batch_size: int, desc: str, **request) -> torch.Tensor:
    key = "classes" if "classes" in request else "prompts"
    items = request[key]
    out = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, leave=False, unit="batch"):
        part = items[start : start + batch_size]
        out.append(pipe(**{key: part}, mode=mode, seed=start, batch_size=batch_size).cpu())
    return torch.cat(out)


def measure_speed(pipe, mode: str, classes: torch.Tensor, repeats: int = 3, **settings) -> dict:
    """images/s at batch 16 and ms/image at batch 1, medians of `repeats` after a warm-up (`settings` go to
    the pipeline)."""
    def median_seconds(batch: int) -> float:
        pipe(classes=classes[:batch], mode=mode, seed=0, batch_size=batch, **settings)
        times = []
        for r in range(repeats):
            start = time.perf_counter()
            pipe(classes=classes[:batch], mode=mode, seed=r + 1, batch_size=batch, **settings)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    return {
        "images_per_s": TIMING_BATCH / median_seconds(TIMING_BATCH),
        "ms_per_image_b1": 1000 * median_seconds(1),
    }


def _fid_fields(result: dict) -> dict:
    return {"fid": result["fid"], "fid_ci": result["ci"], "fid_n": result["n"]}


@torch.no_grad()
def evaluate_run(run_dir, oracle, num_samples: int = 2000, batch_size: int = 100, bootstrap: int = 200,
                 modes=("tokenizer", "ar", "hybrid", "diffusion"), device="cpu", real_kwargs: dict | None = None,
                 timing: bool = True, pipe=None) -> dict:
    """Evaluates the run's trained modes (see the module docstring); returns the metrics dict.

    `pipe`: an already loaded `HybridPipeline` to judge instead of the run's (benchmarks swap in
    intermediate weights); `run_dir` still receives the PNG grids."""
    from hybrid.data.procedural import ProceduralDataset
    from hybrid.eval.adherence import adherence, glyph_accuracy
    from hybrid.eval.fid import bootstrap_fid, oracle_features, real_images
    from hybrid.pipeline import HybridPipeline

    run_dir = Path(run_dir)
    if pipe is None:
        pipe = HybridPipeline.from_run(run_dir, device=device)
    counts = pipe.parameter_counts()
    real = real_images(oracle, num_samples, **(real_kwargs or {}))  # (N, 3, S, S)
    real_feats = oracle_features(real, oracle)
    requests = make_requests(num_samples)
    glyph_requests = make_requests(max(1, num_samples // 4), seed=EVAL_REQUEST_SEED + 1, glyph_prob=1.0)
    metrics: dict[str, dict] = {}

    if "tokenizer" in modes:
        data = ProceduralDataset(image_size=pipe.tokenizer.image_size, size=num_samples, seed=1, split="val",
                                 **(real_kwargs or {}))
        images = torch.stack([data[i]["image"] for i in range(num_samples)])
        recon_c, recon_d = [], []
        for start in tqdm(range(0, num_samples, batch_size), desc="eval tokenizer", leave=False, unit="batch"):
            x = images[start : start + batch_size].to(pipe.device)
            enc = pipe.tokenizer.encode(x)
            recon_c.append(pipe.tokenizer.decode(enc.z).clamp(-1, 1).cpu())
            recon_d.append(pipe.tokenizer.decode(enc.z_q).clamp(-1, 1).cpu())
        recon_c, recon_d = torch.cat(recon_c), torch.cat(recon_d)
        cont = bootstrap_fid(oracle_features(recon_c, oracle), real_feats, bootstrap)
        disc = bootstrap_fid(oracle_features(recon_d, oracle), real_feats, bootstrap)
        metrics["tokenizer"] = {
            "fid": cont["fid"], "fid_ci": cont["ci"], "fid_n": cont["n"],
            "fid_discrete": disc["fid"], "fid_discrete_ci": disc["ci"],
            "psnr_continuous": _psnr(recon_c, images), "psnr_discrete": _psnr(recon_d, images),
            "params": {"tokenizer": counts["tokenizer"]},
        }
        save_grid(torch.cat([images[:16], recon_d[:16], recon_c[:16]]), run_dir / "eval" / "tokenizer.png", nrow=16)

    for mode in ("ar", "hybrid", "diffusion"):
        if mode not in modes or mode not in pipe.modes:
            continue
        gen_model = pipe.diffusion if mode == "diffusion" else pipe.ar
        text_model = getattr(gen_model, "condition", "class") == "text"
        images = _generate(pipe, mode, batch_size, f"eval {mode}", classes=requests["classes"])
        entry = _fid_fields(bootstrap_fid(oracle_features(images, oracle), real_feats, bootstrap))
        entry["adherence"] = {"class": adherence(images, class_request_attrs(requests["attrs"]), oracle)}
        save_grid(images[:64], run_dir / "eval" / f"{mode}-class.png")
        if text_model:
            text_images = _generate(pipe, mode, batch_size, f"eval {mode} text", prompts=requests["captions"])
            entry["adherence"]["text"] = adherence(text_images, requests["attrs"], oracle)
            glyph_images = _generate(pipe, mode, batch_size, f"eval {mode} glyphs", prompts=glyph_requests["captions"])
            entry["glyph_accuracy"] = glyph_accuracy(glyph_images, glyph_requests["attrs"], oracle)
            save_grid(text_images[:64], run_dir / "eval" / f"{mode}-text.png")
        else:
            entry["adherence"]["text"] = None
            entry["glyph_accuracy"] = None
        if timing:
            entry.update(measure_speed(pipe, mode, requests["classes"]))
        used = {"ar": ("tokenizer", "ar"), "hybrid": ("tokenizer", "ar", "refiner"),
                "diffusion": ("tokenizer", "diffusion")}[mode]
        entry["params"] = {k: counts[k] for k in used if k in counts}
        metrics[mode] = entry
    return metrics


def _psnr(recon: torch.Tensor, target: torch.Tensor) -> float:
    mse = (recon.float() - target.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def run_evaluation(cfg) -> dict:
    """`train.py stage=eval`: loads (or trains) the oracle, evaluates the run, writes metrics.json."""
    from hybrid.eval.oracle import ensure_oracle, load_oracle

    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    oracle = load_oracle(ensure_oracle(cfg), device=device).eval()
    real_kwargs = {"two_object_prob": cfg.data.two_object_prob, "glyph_prob": cfg.data.glyph_prob}
    metrics = evaluate_run(cfg.run_dir, oracle, num_samples=cfg.eval.num_samples, batch_size=cfg.eval.batch_size,
                           bootstrap=cfg.eval.bootstrap, modes=tuple(cfg.eval.modes) + ("diffusion",),
                           device=device, real_kwargs=real_kwargs)
    write_json(Path(cfg.run_dir) / "metrics.json", _finite(metrics))
    print(f"[eval] wrote {Path(cfg.run_dir) / 'metrics.json'}")
    return metrics


def _finite(value):
    """JSON has no NaN: write null instead."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
