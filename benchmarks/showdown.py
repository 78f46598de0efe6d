"""The showdown (issue #8): pure AR (next-scale and raster), pure diffusion and the hybrid, side by side.

    python benchmarks/showdown.py --run-dir runs/showdown --out runs/showdown/report \\
        [--config FILE] [--systems ar raster diffusion hybrid] [--num-samples 1000] [--seeds 3] \\
        [--sweep-samples 500] [--cfg-sweep 1 2 4] [--samplers ddim dpm] \\
        [--refiner-steps 1 2 4 8] [--diffusion-steps 10 25 50] [--no-match-flops] [--confirm-samples N] \\
        [--device auto] [key=value ...]

Same data, same tokenizer, same code, one run. Stages are trained into `--run-dir` exactly as
`python train.py stage=...` trains them (a stage whose final checkpoint exists is reused), each with a
snapshot at half its step budget (`<stage dir>/curve/step-<n>.ckpt`) so that convergence is shown:

- `ar`: the run's AR model (next-scale order), z_q decoded alone;
- `raster`: an AR model of the same size in raster order (the same tokens, one at a time), trained
  into `<run-dir>/raster` on the run's tokenizer;
- `diffusion`: the pure-diffusion baseline on the full standardised latent; unless
  `--no-match-flops`, its step budget is set so that its training FLOPs equal those of AR + refiner;
- `hybrid`: AR + refiner.

Fairness is counted, not estimated: parameters per system, and training FLOPs = FLOPs of one
training step of each stage's LightningModule (forward and backward, attention included: counted by
`torch.utils.flop_counter.FlopCounterMode` with the `math` attention backend) x its step budget,
plus, for AR stages with a token cache, the tokenizer-encoder FLOPs that filled the cache. Both are
checked against the +-20% the issue asks (diffusion vs AR + refiner) and the verdict is written.

Evaluation (oracle features, class prompts drawn like the validation data):
1. a sweep of guidance (`--cfg-sweep`: the AR's guidance for `ar`, `raster` and `hybrid`, the
   denoiser's for `diffusion`) and of samplers (`--samplers`, denoiser systems), `--sweep-samples`
   images each, at each system's fewest steps (its cheapest setting: 1 refiner step, 10 baseline
   steps by default); the best FID picks the setting;
2. at that setting, every step count (`--refiner-steps` for the hybrid, `--diffusion-steps` for the
   baseline) with `--seeds` seeds of `--num-samples` images each: FID with a 95% bootstrap interval
   over the pooled seeds (and the FID of each seed), per-attribute adherence, images/s at batch 16,
   ms per image at batch 1, sequential network evaluations per image (counted by hooks), FLOPs
   per image (counted). With `eval.decoded_reference` (on by default) each row's pooled FID, and the hybrid's
   paired difference from pure AR, is also judged against the same real images through the run's tokenizer,
   decode(encode(x).z); the sweep, the operating points and the verdicts use the real images
   (docs/results.md says why the second reference is reported);
3. at each system's operating point (the cheapest step count, by counted FLOPs per image, whose FID lies
   within the interval of its best): adherence on the attribute combinations held out of training (`data.holdout`:
   composition), glyph accuracy for text-conditioned systems (text rendering), and the FID of the
   half-budget snapshot against the full budget's on seed 0's first `--sweep-samples` requests
   (convergence);
4. with `--confirm-samples N`, the hybrid's and pure AR's operating points again on N fresh class prompts
   (one AR pass serves both when they sample the AR alike): each FID with its own interval and the paired
   difference, against both references. The verdict "hybrid beats pure AR outside the interval" counts there
   too: at a few thousand images the two FIDs' intervals (+-2 to 3) are wider than the refiner's gain
   (about 1.5 on the default stages), which 100,000 prompts separated (+-0.38; docs/results.md).

Generation, judging and timing run on `--device` (default: CUDA when available; recorded as the JSON's
`machine.device`, and a GPU's name in the report's title only when it ran there); the stages train on
`trainer.accelerator`'s device.

Writes `<out>/showdown.json`, `<out>/showdown.md` (the tables, the verdicts and the debate table)
and two plots: `fid_vs_speed.png` and `fid_vs_refiner_steps.png`. Generated images' oracle features
are cached under `<out>/cache/` keyed by the weights, settings and device, so a re-run after an
interruption, or with more systems, reuses what was judged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/showdown.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hybrid as _hybrid  # noqa: E402,F401 -- before torch loads: OpenMP's short spin (hybrid/__init__.py)

# isort: split

import numpy as np
import torch

from benchmarks.common import (
    add_device_argument,
    at_least,
    benchmark_device,
    config_and_oracle,
    machine,
    non_negative_float,
    one_line_errors,
    output_folder,
    parse_with_overrides,
    write_result,
)
from benchmarks.curve import Snapshots
from hybrid.progress import progress_bar

SYSTEMS = ("ar", "raster", "diffusion", "hybrid")
MODE = {"ar": "ar", "raster": "ar", "diffusion": "diffusion", "hybrid": "hybrid"}
LABEL = {"ar": "pure AR (next-scale)", "raster": "pure AR (raster)", "diffusion": "pure diffusion",
         "hybrid": "hybrid (AR + refiner)"}
TOLERANCE = 0.20  # the issue's +-20% on parameters and training FLOPs
# part of every cached image set's key: bump it when a code change alters the images a seed gives
# (2: AR tokens drawn by inverting the CDF instead of torch.multinomial)
SAMPLING_VERSION = 2
TIMING_REPEATS = 5  # medians of 5 timed calls per batch size (the machine is shared and noisy)
SIDE_BY_SIDE_ROUNDS = 9  # interleaved rounds behind the verdicts' speed ratios
TIMING_CLASSES = 16  # class prompts timed (batch 16)
# --confirm-samples: the requests and generation seeds of that draw; no seed, sweep or operating point saw them
CONFIRM_DRAW = 1000


class ShowdownError(ValueError):
    """A run directory or option the showdown cannot use as it is."""


# ------------------------------------------------------------------------------------------------
# Training, with counted FLOPs
# ------------------------------------------------------------------------------------------------


def stage_cfg(cfg, run_dir: Path, system: str):
    """The config one system's AR stage trains under (raster: its own run dir on the shared tokenizer)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # a copy the overrides below do not leak from
    if system == "raster":
        cfg.run_dir = str(run_dir / "raster")
        cfg.tokenizer.checkpoint = str(run_dir / "tokenizer" / "final.ckpt")
        cfg.ar.order = "raster"
    return cfg


@contextmanager
def math_attention():
    """FlopCounterMode counts no FLOPs inside SDPA on the CPU; the math backend is plain einsum."""
    from hybrid.nn.attention import get_default_backend, set_default_backend

    old = get_default_backend()
    set_default_backend("math")
    try:
        yield
    finally:
        set_default_backend(old)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with math_attention(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def example_batch(cfg, stage: str, module) -> dict:
    """One training batch as the stage's data loader gives it (AR with a token cache: codes)."""
    from torch.utils.data import default_collate

    from hybrid.data.procedural import ProceduralDataset

    n = int(cfg[stage].train.batch_size)
    data = ProceduralDataset(image_size=cfg.data.image_size, size=n, seed=cfg.seed, split="train",
                             two_object_prob=cfg.data.two_object_prob, glyph_prob=cfg.data.glyph_prob)
    batch = default_collate([data[i] for i in range(n)])
    if stage == "ar" and cfg.ar.token_cache:
        with torch.no_grad():
            batch["indices"] = module.tokenizer.encode(batch["image"]).indices
        del batch["image"]
    return batch


def training_flops(cfg, stage: str) -> dict:
    """FLOPs of one training step of `stage` (forward + backward of its LightningModule's loss) and of
    its whole budget; AR with a token cache adds the encoder FLOPs that filled the cache."""
    from hybrid.lit.runner import build_module

    torch.manual_seed(0)
    module = build_module(cfg, stage).train()
    batch = example_batch(cfg, stage, module)

    def step():
        loss, _ = module.compute_loss(batch)
        loss.backward()

    # an optimizer step of train.accumulate batches: the loss of each is computed and backpropagated
    accumulate = int(cfg[stage].train.get("accumulate", 1))
    per_step = count_flops(step) * accumulate
    steps = int(cfg[stage].train.max_steps)
    out = {"flops_per_step": per_step, "steps": steps, "batch_size": int(cfg[stage].train.batch_size),
           "accumulate": accumulate, "flops": per_step * steps,
           "params": sum(p.numel() for p in module.model.parameters())}
    if stage == "ar" and cfg.ar.token_cache:
        images = torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size)
        with torch.no_grad():
            per_image = count_flops(lambda: module.tokenizer.encode(images))
        from hybrid.lit.ar import token_pool_size

        pool = token_pool_size(cfg.ar, steps, out["batch_size"])
        out["token_cache_flops"] = per_image * pool
        out["flops"] += out["token_cache_flops"]
    return out


def stages_needed(systems: list[str]) -> dict[str, bool]:
    """{stage key: whether `systems` need it} (the raster AR is its own key)."""
    return {"ar": "ar" in systems or "hybrid" in systems, "refiner": "hybrid" in systems,
            "raster": "raster" in systems, "diffusion": "diffusion" in systems}


def step_budget_problem(cfg, systems: list[str], match_flops: bool = True) -> str | None:
    """Why the showdown cannot train these systems' stages, or None: their budgets, FLOPs and half-budget snapshots
    are counted in steps, so a stage with `max_steps` -1 (a time limit only) is refused before anything loads
    (the baseline's own value is not used when the FLOP match sets its steps)."""
    needed = {"ar" if key == "raster" else key for key, need in stages_needed(systems).items() if need}
    if match_flops and needed & {"ar", "refiner"}:
        needed.discard("diffusion")
    for stage in sorted(needed):
        if cfg[stage].train.max_steps == -1:
            return (f"config key '{stage}.train.max_steps' is -1 (a time limit only): the showdown compares "
                    f"training budgets in steps; give it a step count")
    return None


def train_system_stages(cfg, run_dir: Path, systems: list[str], match_flops: bool) -> dict:
    """Trains (or reuses) every stage the systems need; returns {stage key: {"final", "half", "flops"...}}."""
    from hybrid.checkpoints import final_path, load_checkpoint
    from hybrid.lit.runner import fit_stage

    fit_stage(cfg, "tokenizer")
    needs = stages_needed(systems)
    stages: dict[str, dict] = {}
    for key in ("ar", "refiner", "raster", "diffusion"):
        if not needs[key]:
            continue
        stage = "ar" if key == "raster" else key
        scfg = stage_cfg(cfg, run_dir, key)
        final = final_path(scfg.run_dir, stage)
        if key == "diffusion" and match_flops and not final.is_file():
            target = stages.get("ar", {}).get("flops", 0) + stages.get("refiner", {}).get("flops", 0)
            if target:
                per_step = training_flops(scfg, "diffusion")["flops_per_step"]
                steps = max(2, round(target / per_step))
                print(f"[showdown] diffusion: {steps} steps match the AR + refiner training FLOPs "
                      f"({target / 1e12:.2f} TFLOP at {per_step / 1e9:.2f} GFLOP per step)")
                scfg.diffusion.train.max_steps = steps
                scfg.diffusion.train.warmup_steps = min(int(scfg.diffusion.train.warmup_steps), steps // 2)
        if final.is_file():
            trained = load_checkpoint(final, expect_stage=stage)["hyper_parameters"]["config"]
            scfg[stage].train.max_steps = int(trained[stage]["train"]["max_steps"])
            if scfg[stage].train.max_steps == -1:
                raise ShowdownError(f"{final} was trained on a time limit alone (max_steps -1): the showdown "
                                    f"compares training budgets in steps; use another --run-dir")
            held = sorted(trained["data"].get("holdout") or [])
            if held != sorted(cfg.data.holdout):
                raise ShowdownError(
                    f"{final} was trained with data.holdout={held}, this showdown holds out "
                    f"{sorted(cfg.data.holdout)}: use another --run-dir, or pass data.holdout=[...] to match")
        half = max(1, int(scfg[stage].train.max_steps) // 2)
        folder = Path(scfg.run_dir) / stage / "curve"
        print(f"[showdown] {LABEL.get(key, key)}: stage '{stage}' in {scfg.run_dir}")
        reused, start = final.is_file(), time.perf_counter()
        fit_stage(scfg, stage, callbacks=[Snapshots(folder, [half])])
        snapshot = folder / f"step-{half}.ckpt"
        stages[key] = {"final": str(final), "half": str(snapshot) if snapshot.is_file() else None,
                       "half_step": half, "reused": reused, "seconds": time.perf_counter() - start,
                       **training_flops(scfg, stage)}
    return stages


def fairness(stages: dict) -> dict:
    """Parameters and training FLOPs of the diffusion baseline vs AR + refiner, with the +-20% verdict."""
    if "diffusion" not in stages or "ar" not in stages or "refiner" not in stages:
        return {}
    out = {}
    for what in ("params", "flops"):
        hybrid = stages["ar"][what] + stages["refiner"][what]
        ratio = stages["diffusion"][what] / hybrid
        out[what] = {"diffusion": stages["diffusion"][what], "hybrid": hybrid, "ratio": ratio,
                     "within_20_percent": abs(ratio - 1.0) <= TOLERANCE}
    return out


# ------------------------------------------------------------------------------------------------
# Judging
# ------------------------------------------------------------------------------------------------


def file_tag(*paths) -> str:
    """A short key for a set of checkpoint files (path, size, modification time)."""
    h = hashlib.sha1()
    for p in paths:
        if p:
            st = Path(p).stat()
            h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def settings_key(settings: dict) -> str:
    return ",".join(f"{k}={settings[k]}" for k in sorted(settings))


class Counters:
    """Counts the network evaluations of each stage while a batch is generated (hooks on the
    first block of each network, and on the tokenizer's decoder)."""

    def __init__(self, pipe) -> None:
        self.counts: dict[str, int] = {}
        self.handles = []
        nets = {"ar": pipe.ar, "refiner": pipe.refiner, "diffusion": pipe.diffusion,
                "decoder": pipe.tokenizer.autoencoder.decoder}
        for name, net in nets.items():
            if net is None:
                continue
            target = net.blocks[0] if hasattr(net, "blocks") else net
            self.handles.append(target.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(*_):
            self.counts[name] = self.counts.get(name, 0) + 1
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class Judge:
    """Generates, caches oracle features, and measures one (system, setting) at a time.

    Each row's pooled FID and each paired difference is judged against real images and, when `tokenizer` is given
    ((module, device, weights tag): the run's tokenizer, which every system shares), also against the same real
    images through it, decode(encode(x).z): the second reference (`eval.decoded_reference`; docs/results.md says
    why both). The sweep, the per-seed and the half-budget FIDs use the real images only."""

    def __init__(self, oracle, cfg, out_dir: Path, num_samples: int, seeds: int, bootstrap: int,
                 batch_size: int, tokenizer: tuple | None = None) -> None:
        from hybrid.eval.evaluate import make_requests, request_seed

        self.oracle, self.cfg, self.out_dir = oracle, cfg, out_dir
        self.cache = out_dir / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.n, self.seeds, self.bootstrap, self.batch_size = num_samples, seeds, bootstrap, batch_size
        self.real_kwargs = {"two_object_prob": cfg.data.two_object_prob, "glyph_prob": cfg.data.glyph_prob}
        self.tokenizer = tokenizer
        # (S*N, D) each, rendered a chunk at a time; `decoded` is None without a tokenizer
        self.real, self.decoded = self._render_references(num_samples * seeds)
        self.glyph_prob = float(cfg.data.glyph_prob)  # requests drawn as the real images are (FID: like with like)
        self.requests = [make_requests(num_samples, seed=request_seed(s), glyph_prob=self.glyph_prob)
                         for s in range(seeds)]
        self.holdout = [str(p) for p in cfg.data.holdout]
        # Cached features belong to the oracle that computed them (another oracle, e.g. one trained on
        # a later data version, must not reuse them).
        meta = getattr(oracle, "meta", {})
        self.oracle_id = f"{Path(getattr(oracle, 'path', 'oracle')).name}@{meta.get('created', '')}"

    # -- generated images -> cached features and adherence ----------------------------------------
    def _judged(self, pipe, mode, classes, seed, settings):
        """The images of `classes`, judged batch by batch as they are generated (`evaluate.ImageTally`)."""
        from hybrid.eval.evaluate import ImageTally, generation_seed

        tally = ImageTally(self.oracle)
        for start in progress_bar(range(0, len(classes), self.batch_size),
                                  desc=f"{mode} {settings_key(settings)} seed {seed}", leave=False, unit="batch"):
            tally.add(pipe(classes=classes[start:start + self.batch_size], mode=mode,
                           seed=generation_seed(seed, start), batch_size=self.batch_size, **settings).cpu())
        return tally

    def sample_set(self, pipe, tag: str, mode: str, settings: dict, seed: int, n: int | None = None,
                   kind: str = "class") -> dict:
        """{"features", "adherence"} of n images for class prompts (`kind`="class") or for held-out
        combinations ("holdout"), cached under <out>/cache."""
        n = n or self.n
        path = self._cache_path(pipe, tag, mode, settings, seed, n, kind)
        if path.is_file():
            return torch.load(path, weights_only=True)
        req = self._requests(seed, n, kind)
        tally = self._judged(pipe, mode, req["classes"][:n], seed, settings)
        return self._store(tally, req, n, path, grid=seed == 0 and kind == "class")

    def sample_pair(self, ar: tuple, hybrid: tuple, seed: int, n: int) -> tuple[dict, dict]:
        """`sample_set`'s (ar, hybrid) class-prompt sets for one seed, from one AR pass per batch when the two
        sample the AR alike (`pipe.ar_and_hybrid`: the same images that two `sample_set` calls give, since each
        batch is its own call, for the cost of one AR), else from two passes. `ar`, `hybrid`: (pipe, tag,
        settings); both are cached under the keys `sample_set` uses."""
        from hybrid.eval.evaluate import generation_seed

        (ar_pipe, ar_tag, ar_settings), (pipe, tag, settings) = ar, hybrid
        paths = (self._cache_path(ar_pipe, ar_tag, "ar", ar_settings, seed, n, "class"),
                 self._cache_path(pipe, tag, "hybrid", settings, seed, n, "class"))
        refiner_keys = ("steps", "sampler", "refiner_cfg")
        shared = ar_settings == {k: v for k, v in settings.items() if k not in refiner_keys}
        if all(p.is_file() for p in paths) or not (shared and pipe.hybrid_shares_ar_tokens):
            return (self.sample_set(ar_pipe, ar_tag, "ar", ar_settings, seed, n),
                    self.sample_set(pipe, tag, "hybrid", settings, seed, n))
        from hybrid.eval.evaluate import ImageTally

        req = self._requests(seed, n, "class")
        classes = req["classes"][:n]
        tallies = (ImageTally(self.oracle), ImageTally(self.oracle))  # judged batch by batch, images not kept
        for start in progress_bar(range(0, n, self.batch_size), desc=f"ar+hybrid seed {seed}", leave=False,
                                  unit="batch"):
            images = pipe.ar_and_hybrid(classes=classes[start:start + self.batch_size],
                                        seed=generation_seed(seed, start), batch_size=self.batch_size, **settings)
            for tally, part in zip(tallies, images):
                tally.add(part.cpu())
        return tuple(self._store(tally, req, n, path, grid=seed == 0) for tally, path in zip(tallies, paths))

    def _render_references(self, n: int, decoded: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Oracle features of `n` real images and (with a tokenizer and `decoded`) of the same images through it."""
        from hybrid.eval.evaluate import decoded_features
        from hybrid.eval.fid import real_features

        chunks = []
        on_chunk = None
        if self.tokenizer is not None and decoded:
            module, device, _ = self.tokenizer

            def on_chunk(images: torch.Tensor) -> None:
                chunks.append(decoded_features(module, self.oracle, images, device, self.batch_size))

        real = real_features(self.oracle, n, on_chunk=on_chunk, **self.real_kwargs)
        return real, torch.cat(chunks) if on_chunk is not None else None

    def references(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Oracle features of `n` real images and of the same images through the tokenizer (None without one):
        the first n rows of the references the rows are judged against, or (more than they hold) n fresh real
        images, each reference cached under <out>/cache (the real one under the key it had before the second
        reference existed)."""
        if n <= self.real.shape[0]:
            return self.real[:n], None if self.decoded is None else self.decoded[:n]
        from hybrid.checkpoints import atomic_torch_save

        key = f"real|{n}|{sorted(self.real_kwargs.items())}|{self.oracle_id}"
        paths = [self.cache / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"]
        if self.tokenizer is not None:
            key += f"|through tokenizer {self.tokenizer[2]}"
            paths.append(self.cache / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt")
        if not all(p.is_file() for p in paths):
            rendered = self._render_references(n, decoded=not paths[-1].is_file())
            for feats, path in zip(rendered, paths):
                if feats is not None and not path.is_file():
                    atomic_torch_save(feats, path)
        feats = [torch.load(p, weights_only=True) for p in paths]
        return feats[0], feats[1] if len(feats) > 1 else None

    def _cache_path(self, pipe, tag: str, mode: str, settings: dict, seed: int, n: int, kind: str) -> Path:
        from hybrid.config import EvalConfig
        from hybrid.eval.evaluate import DEFAULT_GLYPH_PROB

        key = f"{tag}|{mode}|{settings_key(settings)}|{seed}|{n}|{kind}|v{SAMPLING_VERSION}|{self.oracle_id}"
        if pipe.device.type != "cpu":  # a seed draws other images on another device (CPU keys stay as they were)
            key += f"|{pipe.device.type}"
        if self.glyph_prob != DEFAULT_GLYPH_PROB:  # other requests (the default's keys stay as they were)
            key += f"|glyph_prob={self.glyph_prob}"
        if self.batch_size != EvalConfig.batch_size:  # a batch shares its random draws: other images, other rows
            key += f"|batch={self.batch_size}"
        key = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.cache / f"{key}.pt"

    def _requests(self, seed: int, n: int, kind: str) -> dict:
        from hybrid.eval.evaluate import EVAL_REQUEST_SEED, make_requests, request_seed

        if kind == "holdout":
            return make_requests(n, seed=EVAL_REQUEST_SEED + 7, holdout=self.holdout, only_holdout=True,
                                 glyph_prob=self.glyph_prob)
        return self.requests[seed] if n == self.n and seed < len(self.requests) else make_requests(
            n, seed=request_seed(seed), glyph_prob=self.glyph_prob)

    def _store(self, tally, req: dict, n: int, path: Path, grid: bool) -> dict:
        """{"features", "adherence"} of a set judged batch by batch (`evaluate.ImageTally`), cached."""
        from hybrid.eval.adherence import adherence_from_logits
        from hybrid.eval.evaluate import class_request_attrs

        entry = {"features": tally.features(),
                 "adherence": adherence_from_logits(tally.predictions(),
                                                    class_request_attrs({k: v[:n] for k, v in req["attrs"].items()}))}
        return self._save(entry, tally.first() if grid else None, path)

    def _save(self, entry: dict, grid: torch.Tensor | None, path: Path) -> dict:
        """Writes the set's grid (when given) and its cache file (atomically: a run killed while writing leaves no
        half-written file that every later run would fail to load)."""
        from hybrid.checkpoints import atomic_torch_save
        from hybrid.images import save_grid

        if grid is not None:
            save_grid(grid, self.out_dir / "grids" / f"{path.stem}.png")
        atomic_torch_save(entry, path)
        return entry

    def fid(self, sets: list[dict], decoded: bool = False) -> dict | None:
        """bootstrap_fid of the pooled sets against the real images, or (`decoded`) against them through the
        tokenizer (None without one)."""
        from hybrid.eval.fid import bootstrap_fid

        reference = self.decoded if decoded else self.real
        if reference is None:
            return None
        feats = torch.cat([s["features"] for s in sets])
        return bootstrap_fid(feats, reference[: feats.shape[0]], self.bootstrap)

    def point_fid(self, image_set: dict) -> float:
        """The FID of one set against the real images, without an interval (the per-seed FIDs keep only this: a
        bootstrap each cost `bootstrap` resamples of both sides for nothing)."""
        from hybrid.eval.fid import frechet_distance

        feats = image_set["features"]
        return frechet_distance(feats, self.real[: feats.shape[0]])

    def measure(self, pipe, tag: str, mode: str, settings: dict, seeds: int | None = None) -> dict:
        """FID over `seeds` seeds (pooled, with interval; and per seed), against the decoded reference too when
        there is one, and mean class adherence."""
        sets = [self.sample_set(pipe, tag, mode, settings, s) for s in range(seeds or self.seeds)]
        pooled = self.fid(sets)
        per_seed = [self.point_fid(s) for s in sets] if len(sets) > 1 else [pooled["fid"]]
        attrs = sets[0]["adherence"].keys()
        adh = {a: float(np.mean([s["adherence"][a] for s in sets])) for a in attrs}
        out = {"fid": pooled["fid"], "fid_ci": pooled["ci"], "fid_n": pooled["n"], "fid_per_seed": per_seed,
               "adherence": adh}
        decoded = self.fid(sets, decoded=True)
        if decoded is not None:
            out.update(fid_decoded_ref=decoded["fid"], fid_decoded_ref_ci=decoded["ci"])
        return out

    def paired(self, first: tuple, second: tuple, decoded: bool = False) -> dict | None:
        """FID(first) - FID(second) with a paired bootstrap interval (`fid.paired_fid_difference`): both
        answer the same requests with the same seeds, row for row. Each is (pipe, tag, mode, settings);
        their image sets come from the cache `measure` filled. `decoded`: against the decoded reference (None
        without one)."""
        from hybrid.eval.fid import paired_fid_difference

        reference = self.decoded if decoded else self.real
        if reference is None:
            return None
        feats = [torch.cat([self.sample_set(pipe, tag, mode, settings, s)["features"] for s in range(self.seeds)])
                 for pipe, tag, mode, settings in (first, second)]
        out = paired_fid_difference(feats[0], feats[1], reference[: feats[0].shape[0]], self.bootstrap)
        return {"difference": out["difference"], "ci": out["ci"], "n": out["n"]}

    # -- cost ---------------------------------------------------------------------------------
    def cost(self, pipe, mode: str, settings: dict) -> dict:
        """images/s (batch 16), ms/image (batch 1), network evaluations and FLOPs per image."""
        from hybrid.eval.evaluate import TIMING_BATCH, fill_batch, measure_speed

        classes = self.requests[0]["classes"]
        out = measure_speed(pipe, mode, classes, repeats=TIMING_REPEATS, **settings)
        batch = fill_batch(classes, TIMING_BATCH)  # per image = per batch / its size, whatever --num-samples is
        counters = Counters(pipe)
        try:
            pipe(classes=batch, mode=mode, seed=0, batch_size=TIMING_BATCH, **settings)
        finally:
            counters.close()
        out["network_evals"] = counters.counts  # per batch = per image: a batch runs them once, in sequence
        out["sequential_evals"] = sum(counters.counts.values())
        out["flops_per_image"] = count_flops(
            lambda: pipe(classes=batch, mode=mode, seed=0, batch_size=TIMING_BATCH, **settings)) / TIMING_BATCH
        return out


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def load_pipes(run_dir: Path, stages: dict, device: torch.device, which: str = "final") -> dict:
    """{system: (pipeline on `device`, weights tag)} for the trained systems; which = "final" | "half"."""
    from hybrid.pipeline import HybridPipeline

    tok = run_dir / "tokenizer" / "final.ckpt"
    pick = {k: v[which] for k, v in stages.items()}
    pipes = {}
    wanted = {"ar": {"ar": pick.get("ar")}, "hybrid": {"ar": pick.get("ar"), "refiner": pick.get("refiner")},
              "raster": {"ar": pick.get("raster")}, "diffusion": {"diffusion": pick.get("diffusion")}}
    for system, parts in wanted.items():
        if any(v is None for v in parts.values()):
            continue
        pipes[system] = (HybridPipeline.from_checkpoints(tok, **parts, device=device), file_tag(tok, *parts.values()))
    return pipes


SAMPLERS = {"ddpm": ("ddim", "dpm"), "flow": ("euler", "dpm")}


def zero_or_at_least_2(text: str) -> int:
    """argparse `type` of --confirm-samples: 0 (off) or an FID's at least 2 images."""
    value = int(text)
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or >= 2 (FID needs 2 images), got {value}")
    return value


def candidates(system: str, cfg, cfg_sweep, samplers) -> list[dict]:
    """The guidance (and sampler) settings the sweep tries for a system: the AR's guidance for AR
    systems and the hybrid (whose refiner runs unguided), the denoiser's for the baseline; samplers
    (default: the stage's own) are those its training objective can use."""
    if system in ("ar", "raster"):
        return [{"cfg": float(g)} for g in cfg_sweep]
    section = cfg.refiner if system == "hybrid" else cfg.diffusion
    usable = [s for s in (samplers or [section.sampler]) if s in SAMPLERS[section.objective]]
    if not usable:
        raise ValueError(f"none of the samplers {samplers} fits {system}'s objective '{section.objective}' "
                         f"(it samples with {', '.join(SAMPLERS[section.objective])})")
    key = "cfg" if system == "hybrid" else "refiner_cfg"
    return [{key: float(g), "sampler": s} for g in cfg_sweep for s in usable]


def step_list(system: str, args) -> list[int | None]:
    return {"hybrid": args.refiner_steps, "diffusion": args.diffusion_steps}.get(system, [None])


def with_steps(settings: dict, steps: int | None) -> dict:
    return dict(settings) if steps is None else {**settings, "steps": int(steps)}


def operating_point(rows: list[dict]) -> dict:
    """The cheapest row whose FID lies within the interval of the best row: the fewest FLOPs per image (counted,
    so settings that run the same networks more often are ordered by the work, not by timing noise: 1 and
    2 refiner steps measured 57.0 and 57.1 images/s once), then the most images/s."""
    best = min(rows, key=lambda r: r["fid"])
    ok = [r for r in rows if r["fid"] <= best["fid_ci"][1]]
    return min(ok, key=lambda r: (r.get("flops_per_image", 0), -r["images_per_s"]))


def run(args, cfg, oracle, device: torch.device) -> dict:
    run_dir = Path(cfg.run_dir)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    systems = list(dict.fromkeys(args.systems))
    for system in systems:  # a sampler no denoiser can use is found now, not after all the training
        if system in ("hybrid", "diffusion"):
            try:
                candidates(system, cfg, args.cfg_sweep, args.samplers)
            except ValueError as err:
                raise ShowdownError(f"--samplers: {err}") from None
    if cfg.eval.num_real:
        print(f"[showdown] eval.num_real={cfg.eval.num_real} is not used here: each FID is judged against as many "
              "real images as generated ones (--num-samples x --seeds; --confirm-samples)")
    t0 = time.perf_counter()
    stages = train_system_stages(cfg, run_dir, systems, args.match_flops)
    train_seconds = time.perf_counter() - t0
    fair = fairness(stages)
    pipes = load_pipes(run_dir, stages, device)
    tokenizer = None
    if cfg.eval.decoded_reference and pipes:  # every system shares the run's tokenizer
        pipe = next(iter(pipes.values()))[0]
        tokenizer = (pipe.tokenizer, pipe.device, file_tag(run_dir / "tokenizer" / "final.ckpt"))
    judge = Judge(oracle, cfg, out_dir, args.num_samples, args.seeds, cfg.eval.bootstrap, cfg.eval.batch_size,
                  tokenizer)
    result: dict = {"systems": {}, "stages": stages, "fairness": fair}

    eval_seconds: dict[str, float] = {}
    for system in systems:
        if system not in pipes:
            print(f"[showdown] {system}: not trained, skipped", file=sys.stderr)
            continue
        start = time.perf_counter()
        pipe, tag = pipes[system]
        mode = MODE[system]
        fewest_steps = min(step_list(system, args), key=lambda s: s or 0)  # None for the AR systems
        # 1. the sweep
        sweep = []
        for cand in candidates(system, cfg, args.cfg_sweep, args.samplers):
            settings = with_steps(cand, fewest_steps)
            entry = judge.sample_set(pipe, tag, mode, settings, seed=0, n=args.sweep_samples)
            fid = judge.fid([entry])
            sweep.append({"settings": settings, "fid": fid["fid"], "fid_ci": fid["ci"]})
        chosen = min(sweep, key=lambda r: r["fid"])["settings"]
        chosen = {k: v for k, v in chosen.items() if k != "steps"}
        print(f"[showdown] {system}: sweep picks {settings_key(chosen)}", flush=True)
        # 2. every step count at that setting
        rows = []
        for steps in step_list(system, args):
            settings = with_steps(chosen, steps)
            row = {"steps": steps, "settings": settings, **judge.measure(pipe, tag, mode, settings),
                   **judge.cost(pipe, mode, settings)}
            rows.append(row)
            lo, hi = row["fid_ci"]
            print(f"[showdown] {system:9s} steps={steps}: FID {row['fid']:.2f} [{lo:.2f}, {hi:.2f}]  "
                  f"{row['images_per_s']:.1f} img/s  {row['sequential_evals']} sequential evals", flush=True)
        op = operating_point(rows)
        # 3. composition, text rendering, convergence at the operating point
        comp = judge.sample_set(pipe, tag, mode, op["settings"], seed=0, n=max(16, args.num_samples // 4),
                                kind="holdout")["adherence"] if judge.holdout else None
        entry = {"label": LABEL[system], "sweep": sweep, "chosen": chosen, "rows": rows,
                 "operating_point": op["steps"], "composition": comp,
                 "glyph_accuracy": text_rendering(pipe, mode, op["settings"], judge, system)}
        result["systems"][system] = entry
        result["systems"][system]["params"] = system_params(pipe, system)
        eval_seconds[system] = time.perf_counter() - start

    if "hybrid" in result["systems"] and "ar" in result["systems"]:
        # The hybrid against pure AR on the same requests and seeds (and, at the same AR settings, the same
        # tokens): the paired interval judges the refiner's own effect, which the two FIDs' intervals blur.
        ar_set = (*pipes["ar"], MODE["ar"], op_row(result["systems"]["ar"])["settings"])
        for row in result["systems"]["hybrid"]["rows"]:
            hybrid_set = (*pipes["hybrid"], MODE["hybrid"], row["settings"])
            row["fid_vs_ar"] = judge.paired(hybrid_set, ar_set)
            decoded = judge.paired(hybrid_set, ar_set, decoded=True)
            if decoded is not None:
                row["fid_vs_ar_decoded_ref"] = decoded
    start = time.perf_counter()
    halves = load_pipes(run_dir, stages, device, which="half")
    for system, entry in result["systems"].items():
        op = op_row(entry)
        if system not in halves:
            entry["half_budget"] = None
            continue
        pipe, tag = halves[system]
        # The snapshot answers the first `n` requests of seed 0; the full-budget images of those requests are
        # the first n of the operating point's judged seed-0 set (cached), so only the snapshot generates.
        n = min(args.sweep_samples, args.num_samples)
        half = judge.fid([judge.sample_set(pipe, tag, MODE[system], op["settings"], seed=0, n=n)])
        full_set = judge.sample_set(pipes[system][0], pipes[system][1], MODE[system], op["settings"], seed=0)
        full = judge.fid([{"features": full_set["features"][:n]}])
        entry["half_budget"] = {"fid": half["fid"], "fid_ci": half["ci"], "full_fid_seed0": full["fid"],
                                "full_fid_ci_seed0": full["ci"], "n": n,
                                "still_improving": full["ci"][1] < half["ci"][0]}
    eval_seconds["half_budget"] = time.perf_counter() - start
    if args.confirm_samples and "hybrid" in result["systems"] and "ar" in result["systems"]:
        start = time.perf_counter()
        result["confirmation"] = confirm_hybrid_vs_ar(judge, pipes, result["systems"], args.confirm_samples)
        eval_seconds["confirmation"] = time.perf_counter() - start
    start = time.perf_counter()
    result["side_by_side"] = side_by_side_speed(timed_operating_points(result["systems"], pipes),
                                                judge.requests[0]["classes"], rounds=SIDE_BY_SIDE_ROUNDS)
    print("[showdown] side by side, images/s at batch 16: "
          + ", ".join(f"{k} {v:.1f}" for k, v in result["side_by_side"]["images_per_s"].items()), flush=True)
    eval_seconds["side_by_side"] = time.perf_counter() - start
    result["verdicts"] = verdicts(result["systems"], result["side_by_side"]["images_per_s"], result.get("confirmation"))
    # judged image sets come from <out>/cache when they exist: a re-run's eval seconds are small
    result["seconds"] = {"training": train_seconds, "eval": eval_seconds, "total": time.perf_counter() - t0}
    return result


def confirm_hybrid_vs_ar(judge: Judge, pipes: dict, systems: dict, n: int) -> dict:
    """`--confirm-samples N`: the hybrid's and pure AR's operating points judged again on N fresh class prompts
    (draw CONFIRM_DRAW, which chose nothing) against N real images: each FID with its own interval, and the paired
    difference; with the judge's tokenizer, the same against those N real images through it. Both intervals shrink
    as 1/sqrt(N) (docs/results.md: +-0.38 at 100,000 on the default stages), so a gap the showdown's few thousand
    images leave inside the two intervals can be shown outside them."""
    from hybrid.eval.fid import RealResamples, bootstrap_fid, paired_fid_difference

    ar_settings, settings = op_row(systems["ar"])["settings"], op_row(systems["hybrid"])["settings"]
    ar_set, hybrid_set = judge.sample_pair((*pipes["ar"], ar_settings), (*pipes["hybrid"], settings), CONFIRM_DRAW, n)
    # each reference resampled once for its three intervals; the decoded one is None without a tokenizer
    real, decoded = (None if f is None else RealResamples(f) for f in judge.references(n))

    def judged(entry: dict) -> dict:
        fid = bootstrap_fid(entry["features"], real, judge.bootstrap)
        out = {"fid": fid["fid"], "fid_ci": fid["ci"], "adherence": entry["adherence"]}
        if decoded is not None:
            fid = bootstrap_fid(entry["features"], decoded, judge.bootstrap)
            out.update(fid_decoded_ref=fid["fid"], fid_decoded_ref_ci=fid["ci"])
        return out

    def difference(reference) -> dict:
        paired = paired_fid_difference(hybrid_set["features"], ar_set["features"], reference, judge.bootstrap)
        return {"difference": paired["difference"], "ci": paired["ci"]}

    out = {"n": n, "draw": CONFIRM_DRAW, "ar": judged(ar_set), "hybrid": judged(hybrid_set),
           "paired_difference": difference(real)}
    out["fid_better_outside_interval"] = bool(out["hybrid"]["fid_ci"][1] < out["ar"]["fid_ci"][0])
    line = (f"[showdown] confirmation on {n} fresh prompts: ar {fmt_fid(out['ar'])}, hybrid {fmt_fid(out['hybrid'])}, "
            f"paired {fmt_difference(out['paired_difference'])}")
    if decoded is not None:
        out["paired_difference_decoded_ref"] = difference(decoded)
        line += (f"; against decoded real images: ar {fmt_fid(out['ar'], DECODED)}, hybrid "
                 f"{fmt_fid(out['hybrid'], DECODED)}, paired {fmt_difference(out['paired_difference_decoded_ref'])}")
    print(line, flush=True)
    return out


def system_params(pipe, system: str) -> dict:
    counts = pipe.parameter_counts()
    used = {"ar": ("ar",), "raster": ("ar",), "hybrid": ("ar", "refiner"), "diffusion": ("diffusion",)}[system]
    return {"generator": sum(counts[k] for k in used), "tokenizer": counts["tokenizer"]}


def text_rendering(pipe, mode: str, settings: dict, judge: Judge, system: str) -> float | None:
    """Glyph accuracy for text-conditioned systems (None for class-conditioned ones: a class names
    no character)."""
    from hybrid.eval.adherence import glyph_accuracy
    from hybrid.eval.evaluate import EVAL_REQUEST_SEED, make_requests

    model = pipe.diffusion if mode == "diffusion" else pipe.ar
    if getattr(model, "condition", "class") != "text":
        return None
    req = make_requests(max(16, judge.n // 4), seed=EVAL_REQUEST_SEED + 1, glyph_prob=1.0)
    images = pipe(prompts=req["captions"], mode=mode, seed=0, batch_size=judge.batch_size, **settings)
    return glyph_accuracy(images, req["attrs"], judge.oracle)


def op_row(entry: dict) -> dict:
    """The row of a system's entry at its operating point."""
    return next(r for r in entry["rows"] if r["steps"] == entry["operating_point"])


def timed_operating_points(systems: dict, pipes: dict) -> dict:
    """{system: (pipeline, mode, operating-point settings)} for `side_by_side_speed`."""
    return {name: (pipes[name][0], MODE[name], op_row(entry)["settings"]) for name, entry in systems.items()}


def side_by_side_speed(ops: dict, classes: torch.Tensor, rounds: int) -> dict:
    """images/s at batch 16 of each system's operating point, timed interleaved: every round times one
    call of each system, in an order rotated round by round, after one untimed warm-up round, so a
    drift of the machine's speed (or whichever system happens to run first) falls on all of them
    alike. `ops`: {system: (pipeline, mode, settings)}. Each call is timed on its pipeline's device
    (`Stopwatch`: a CUDA device is synchronized). Returns {"images_per_s": {system: median}, "rounds": rounds}."""
    from hybrid.devices import Stopwatch
    from hybrid.eval.evaluate import TIMING_BATCH, fill_batch

    names = list(ops)
    batch = fill_batch(classes, TIMING_BATCH)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            pipe, mode, settings = ops[name]
            with Stopwatch(pipe.device) as watch:
                pipe(classes=batch, mode=mode, seed=r, batch_size=TIMING_BATCH, **settings)
            if r > 0:  # round 0 warms every pipeline up
                times[name].append(watch.seconds)
    return {"images_per_s": {n: TIMING_BATCH / float(np.median(t)) for n, t in times.items()}, "rounds": rounds}


def verdicts(systems: dict, side_by_side: dict | None = None, confirmation: dict | None = None) -> dict:
    """The issue's two targets, measured at the operating points; the speed ratios come from
    `side_by_side` ({system: images/s}, interleaved timing) when given, else from the rows' timings. FID(hybrid)
    below FID(AR) outside the two intervals counts on the showdown's own images or, when `confirmation`
    (`--confirm-samples`) is given, on its fresh ones instead (it decides, pass or fail)."""
    def op(name):
        s = systems.get(name)
        return None if s is None else op_row(s)

    def speed_of(name, row):
        return (side_by_side or {}).get(name, row["images_per_s"])

    out = {}
    h, d, a = op("hybrid"), op("diffusion"), op("ar")
    if h and d:
        speed = speed_of("hybrid", h) / speed_of("diffusion", d)
        no_worse = h["fid"] <= d["fid_ci"][1]
        # why the speed-up is what it is: speed-up = (FLOP ratio) x (the hybrid's FLOP/s over the baseline's)
        flop_ratio = d["flops_per_image"] / h["flops_per_image"]
        out["hybrid_vs_diffusion"] = {"speedup": speed, "fid_no_worse": no_worse, "target_speedup": 9.0,
                                      "met": bool(no_worse and speed >= 9.0), "flop_ratio": flop_ratio,
                                      "gflops_per_s": {"hybrid": speed_of("hybrid", h) * h["flops_per_image"] / 1e9,
                                                       "diffusion": speed_of("diffusion", d) * d["flops_per_image"]
                                                       / 1e9}}
    if h and a:
        slower = speed_of("ar", a) / speed_of("hybrid", h)
        better = h["fid_ci"][1] < a["fid_ci"][0]
        confirmed = bool(confirmation and confirmation["fid_better_outside_interval"])
        # the confirmation, when it ran, decides: its fresh prompts are many more, and chose nothing
        out["hybrid_vs_ar"] = {"fid_better_outside_interval": better, "ar_over_hybrid_speed": slower,
                               "met": bool((confirmed if confirmation else better) and slower <= 1.5)}
        if confirmation:
            out["hybrid_vs_ar"]["fid_better_outside_interval_confirmed"] = confirmed
            out["hybrid_vs_ar"]["confirmation_n"] = confirmation["n"]
        if h.get("fid_vs_ar"):  # the paired test, beside the target's own (the two FIDs' intervals)
            paired = h["fid_vs_ar"]
            out["hybrid_vs_ar"]["paired_difference"] = paired
            out["hybrid_vs_ar"]["fid_better_by_paired_interval"] = bool(paired["ci"][1] < 0)
        if h.get("fid_vs_ar_decoded_ref"):  # reported beside the verdict, which stays the real images' (#8)
            out["hybrid_vs_ar"]["paired_difference_decoded_ref"] = h["fid_vs_ar_decoded_ref"]
    return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


DECODED = "_decoded_ref"  # the suffix of every FID against the decoded reference (`Judge`)


def fmt_fid(r: dict, suffix: str = "") -> str:
    """'FID [lo, hi]' of `r["fid" + suffix]`; with a suffix, n/a where it is missing (a showdown.json from before
    the decoded reference, or `eval.decoded_reference=false`)."""
    if suffix and f"fid{suffix}" not in r:
        return "n/a"
    lo, hi = r[f"fid{suffix}_ci"]
    return f"{r[f'fid{suffix}']:.2f} [{lo:.2f}, {hi:.2f}]"


def fmt_difference(d: dict) -> str:
    """'+0.12 [-0.30, +0.50]' of a paired difference."""
    return f"{d['difference']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"


def steps_text(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


def paired_word(d: dict) -> str:
    """What a paired difference's interval says of the first against the second."""
    return "better" if d["ci"][1] < 0 else "worse" if d["ci"][0] > 0 else "not distinguishable"


def pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def pair(adherence: dict | None) -> str:
    """'shape / color' adherence, or n/a."""
    if not adherence:
        return "n/a"
    return f"{pct(adherence.get('shape'))} / {pct(adherence.get('color'))}"


def markdown(result: dict) -> str:
    decoded = any(f"fid{DECODED}" in r for s in result["systems"].values() for r in s["rows"])
    lines = [f"# Showdown ({result['machine'].get('gpu') or result['machine']['cpu']}, "
             f"{result['machine']['cores']} cores, {result['machine']['date']})", "",
             f"`{result['command']}`", ""]
    if decoded:
        lines += ["FID is against real images; the second FID column is against the same real images through the "
                  "run's tokenizer, decode(encode(x).z): the best a generator of latents can do, and the reference "
                  "under which detail the decoder cannot make costs nothing (docs/results.md).", ""]
    lines += ["| system | steps | setting | FID [95% CI] | " + ("FID vs decoded real | " if decoded else "")
              + "shape | color | images/s (b16) | ms/image (b1) | sequential evals | GFLOP/image |",
              "|---|---|---|---|" + ("---|" if decoded else "") + "---|---|---|---|---|---|"]
    for s in result["systems"].values():
        for r in s["rows"]:
            mark = " **(op)**" if r["steps"] == s["operating_point"] else ""
            lines.append(f"| {s['label']}{mark} | {r['steps'] or '-'} | {settings_key(s['chosen'])} | {fmt_fid(r)} "
                         + (f"| {fmt_fid(r, DECODED)} " if decoded else "")
                         + f"| {pct(r['adherence'].get('shape'))} "
                         f"| {pct(r['adherence'].get('color'))} "
                         f"| {r['images_per_s']:.1f} | {r['ms_per_image_b1']:.1f} | {r['sequential_evals']} "
                         f"| {r['flops_per_image'] / 1e9:.3f} |")
    hybrid_rows = [r for r in result["systems"].get("hybrid", {}).get("rows", []) if r.get("fid_vs_ar")]
    if hybrid_rows:
        lines += ["", "FID(hybrid) - FID(pure AR) on the same requests and seeds, paired 95% interval: "
                  + "; ".join(f"{steps_text(r['steps'])} {fmt_difference(r['fid_vs_ar'])}" for r in hybrid_rows) + "."]
        if all(r.get("fid_vs_ar_decoded_ref") for r in hybrid_rows):
            lines[-1] += (" Against the decoded real images: "
                          + "; ".join(f"{steps_text(r['steps'])} {fmt_difference(r['fid_vs_ar_decoded_ref'])}"
                                      for r in hybrid_rows) + ".")
    lines += ["", "## Fairness (diffusion baseline vs AR + refiner)", ""]
    for what, f in result["fairness"].items():
        lines.append(f"- {what}: {f['diffusion']:.4g} vs {f['hybrid']:.4g} (ratio {f['ratio']:.2f}, "
                     f"{'within' if f['within_20_percent'] else 'OUTSIDE'} +-20%)")
    lines += ["", "## Training budget per stage", "",
              "| stage | steps | params | GFLOP/step | total TFLOP | minutes (this run) |", "|---|---|---|---|---|---|"]
    for key, st in result["stages"].items():
        minutes = "reused" if st.get("reused") else (f"{st['seconds'] / 60:.1f}" if "seconds" in st else "n/a")
        lines.append(f"| {key} | {st['steps']} | {st['params']:,} | {st['flops_per_step'] / 1e9:.2f} "
                     f"| {st['flops'] / 1e12:.2f} | {minutes} |")
    sec = result.get("seconds", {})
    if sec:
        parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in sec.get("eval", {}).items())
        lines.append(f"\nWall time: {sec['total'] / 60:.1f} min in all; training {sec['training'] / 60:.1f} min"
                     + (f"; judging per system (min): {parts}" if parts else ""))
    half_n = {s["half_budget"].get("n") for s in result["systems"].values() if s.get("half_budget")}
    lines += ["", "## Convergence (FID at half and full budget, operating point, seed 0"
              + (f"'s first {half_n.pop()} requests)" if len(half_n) == 1 else ")"), ""]
    for s in result["systems"].values():
        hb = s.get("half_budget")
        if hb is None:
            lines.append(f"- {s['label']}: no half-budget snapshot (stage trained without one)")
            continue
        lo, hi = hb["fid_ci"]
        flo, fhi = hb["full_fid_ci_seed0"]
        lines.append(f"- {s['label']}: half {hb['fid']:.2f} [{lo:.2f}, {hi:.2f}] -> full {hb['full_fid_seed0']:.2f} "
                     f"[{flo:.2f}, {fhi:.2f}]" + (" (still improving)" if hb["still_improving"] else ""))
    lines += ["", "## Verdicts", ""]
    if result.get("side_by_side"):
        sbs = result["side_by_side"]
        retimed = sbs.get("retimed", {}).get("machine")  # --retime may run on another machine or device
        lines += [f"Speeds compared side by side (operating points timed interleaved, rotating order, medians of "
                  f"{sbs['rounds']} rounds, batch 16"
                  + (f"; re-timed on {retimed.get('gpu') or retimed['cpu']}, {retimed['date']}" if retimed else "")
                  + "): "
                  + ", ".join(f"{result['systems'][k]['label']} {v:.1f}" for k, v in sbs["images_per_s"].items())
                  + " images/s.", ""]
    v = result["verdicts"]
    if "hybrid_vs_diffusion" in v:
        x = v["hybrid_vs_diffusion"]
        lines.append(f"- hybrid vs diffusion: {x['speedup']:.1f}x the images/s (target >= 9x), FID no worse: "
                     f"{x['fid_no_worse']} -> {'met' if x['met'] else 'NOT met'}")
        if "flop_ratio" in x:
            g = x["gflops_per_s"]
            lines.append(f"  - why: the baseline spends {x['flop_ratio']:.1f}x the hybrid's FLOPs per image; "
                         f"the hybrid runs at {g['hybrid']:.1f} GFLOP/s, the baseline at {g['diffusion']:.1f} GFLOP/s "
                         f"(batch 16), so the speed-up is {x['flop_ratio']:.1f} x {g['hybrid'] / g['diffusion']:.2f}")
    if "hybrid_vs_ar" in v:
        x = v["hybrid_vs_ar"]
        if "confirmation_n" in x:  # the confirmation decides; the rows' own answer is shown beside it
            fid_verdict = (f"on {x['confirmation_n']:,} fresh prompts (the confirmation, which decides): "
                           f"{x['fid_better_outside_interval_confirmed']} (on the rows' images: "
                           f"{x['fid_better_outside_interval']})")
        else:
            fid_verdict = f"on the rows' images: {x['fid_better_outside_interval']}"
        lines.append(f"- hybrid vs pure AR: FID better outside the two intervals {fid_verdict}; "
                     f"AR is {x['ar_over_hybrid_speed']:.2f}x the hybrid's images/s (target <= 1.5x) -> "
                     f"{'met' if x['met'] else 'NOT met'}")
        if "confirmation_n" in x:
            c = result["confirmation"]
            d = c["paired_difference"]
            lines.append(f"  - on {c['n']:,} fresh prompts (--confirm-samples): pure AR {fmt_fid(c['ar'])}, hybrid "
                         f"{fmt_fid(c['hybrid'])}, paired {fmt_difference(d)}"
                         f" -> better outside the two intervals: {x['fid_better_outside_interval_confirmed']}")
            if "paired_difference_decoded_ref" in c:
                lines.append(f"  - the same images against the decoded real images: pure AR "
                             f"{fmt_fid(c['ar'], DECODED)}, hybrid {fmt_fid(c['hybrid'], DECODED)}, paired "
                             f"{fmt_difference(c['paired_difference_decoded_ref'])}")
        if "paired_difference" in x:
            d = x["paired_difference"]
            lines.append(f"  - paired (the same requests and seeds): FID(hybrid) - FID(AR) = {fmt_difference(d)} "
                         f"-> the hybrid is {paired_word(d)} by the paired interval")
        if "paired_difference_decoded_ref" in x:
            d = x["paired_difference_decoded_ref"]
            lines.append(f"  - the same pairs against the decoded real images (not part of the verdict): "
                         f"{fmt_difference(d)} -> the hybrid is {paired_word(d)}")
    lines += ["", "## The debate, measured (each system at its operating point)", "",
              "| | " + " | ".join(s["label"] for s in result["systems"].values()) + " |",
              "|---|" + "---|" * len(result["systems"])]
    ops = {k: op_row(s) for k, s in result["systems"].items()}
    rows = [
        ("generation steps (sequential network evaluations)", lambda k, r: str(r["sequential_evals"])),
        ("parallelism (network evaluations per stage)",
         lambda k, r: ", ".join(f"{c} {n}" for n, c in r["network_evals"].items())),
        ("text rendering (glyph accuracy)", lambda k, r: pct(result["systems"][k]["glyph_accuracy"])),
        ("instruction following (shape / color adherence)",
         lambda k, r: pair(r["adherence"])),
        ("composition (held-out pairs: shape / color)",
         lambda k, r: pair(result["systems"][k]["composition"])),
        ("image quality (FID)", lambda k, r: fmt_fid(r)),
        ("speed (images/s at b16; ms at b1)", lambda k, r: f"{r['images_per_s']:.1f}; {r['ms_per_image_b1']:.1f}"),
        ("GFLOP per image", lambda k, r: f"{r['flops_per_image'] / 1e9:.3f}"),
        ("generator parameters", lambda k, r: f"{result['systems'][k]['params']['generator']:,}"),
    ]
    if decoded:
        at = [name for name, _ in rows].index("image quality (FID)") + 1
        rows.insert(at, ("FID against the decoded real images", lambda k, r: fmt_fid(r, DECODED)))
    for name, fn in rows:
        lines.append(f"| {name} | " + " | ".join(fn(k, r) for k, r in ops.items()) + " |")
    return "\n".join(lines) + "\n"


def plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for s in result["systems"].values():
        xs = [r["images_per_s"] for r in s["rows"]]
        ys = [r["fid"] for r in s["rows"]]
        err = [[r["fid"] - r["fid_ci"][0] for r in s["rows"]], [r["fid_ci"][1] - r["fid"] for r in s["rows"]]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=s["label"])
        for r in s["rows"]:
            if r["steps"]:
                ax.annotate(str(r["steps"]), (r["images_per_s"], r["fid"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)  # 2, 5, 10, 20 ... instead of overlapping 2x10^0 labels
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel("images/s at batch 16 (log)")
    ax.set_ylabel("FID (oracle features), 95% CI")
    ax.set_title(f"FID vs speed ({result['machine'].get('gpu') or 'CPU'}, {result['machine']['cores']} cores)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "fid_vs_speed.png", dpi=120)
    plt.close(fig)
    written.append(str(out_dir / "fid_vs_speed.png"))
    if "hybrid" in result["systems"]:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        rows = result["systems"]["hybrid"]["rows"]
        ax.errorbar([r["steps"] for r in rows], [r["fid"] for r in rows],
                    yerr=[[r["fid"] - r["fid_ci"][0] for r in rows], [r["fid_ci"][1] - r["fid"] for r in rows]],
                    marker="o", capsize=3, label="hybrid")
        if "ar" in result["systems"]:
            r = result["systems"]["ar"]["rows"][0]
            ax.axhline(r["fid"], color="gray", linestyle="--", label="pure AR (z_q decoded)")
            ax.axhspan(r["fid_ci"][0], r["fid_ci"][1], color="gray", alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("refiner steps")
        ax.set_ylabel("FID (oracle features), 95% CI")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "fid_vs_refiner_steps.png", dpi=120)
        plt.close(fig)
        written.append(str(out_dir / "fid_vs_refiner_steps.png"))
    return written


def retime(run_dir: Path, out_dir: Path, device: torch.device) -> int:
    """`--retime`: the side-by-side timing again for an existing showdown.json, on `device` (recorded with it);
    verdicts and markdown rewritten."""
    from hybrid.eval.evaluate import EVAL_REQUEST_SEED, make_requests

    path = out_dir / "showdown.json"
    if not path.is_file():
        print(f"error: --retime needs an earlier run's '{path}'", file=sys.stderr)
        return 2
    try:  # everything the re-timing reads from the file, checked before minutes of timing
        result = json.loads(path.read_text())
        {stage: paths["final"] for stage, paths in result["stages"].items()}  # what load_pipes picks
        {name: (MODE[name], op_row(entry)["settings"]) for name, entry in result["systems"].items()}
        markdown(result)
        verdicts(result["systems"], None, result.get("confirmation"))  # what is recomputed after the timing
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, StopIteration) as err:
        print(f"error: '{path}' cannot be re-timed: it is damaged or from another version of the showdown "
              f"({type(err).__name__}: {err}); run the showdown again without --retime", file=sys.stderr)
        return 2
    pipes = load_pipes(run_dir, result["stages"], device)
    if set(result["systems"]) - set(pipes):
        print(f"error: '{path}' names no checkpoint for {', '.join(sorted(set(result['systems']) - set(pipes)))} "
              f"in its \"stages\"; run the showdown again without --retime", file=sys.stderr)
        return 2
    start = time.perf_counter()
    classes = make_requests(TIMING_CLASSES, seed=EVAL_REQUEST_SEED)["classes"]
    result["side_by_side"] = side_by_side_speed(timed_operating_points(result["systems"], pipes), classes,
                                                rounds=SIDE_BY_SIDE_ROUNDS)
    result["side_by_side"]["retimed"] = {"machine": machine(device), "seconds": time.perf_counter() - start}
    result["verdicts"] = verdicts(result["systems"], result["side_by_side"]["images_per_s"], result.get("confirmation"))
    write_result(path, result)
    (out_dir / "showdown.md").write_text(markdown(result))
    print(markdown(result))
    print(f"rewrote {path} and {out_dir / 'showdown.md'}")
    return 0


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="trains into / reuses stages from this run directory")
    parser.add_argument("--out", required=True, type=output_folder,
                        help="folder for showdown.json, showdown.md, plots and the cache")
    parser.add_argument("--config", default=None)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--num-samples", type=at_least(2), default=1000, help="images per seed per setting (>= 2: FID)")
    parser.add_argument("--seeds", type=at_least(1), default=3)
    parser.add_argument("--sweep-samples", type=at_least(2), default=500)
    parser.add_argument("--cfg-sweep", type=non_negative_float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--samplers", nargs="+", default=None,
                        choices=sorted({s for names in SAMPLERS.values() for s in names}),
                        help="denoiser samplers to sweep (default: each "
                        "denoiser's own: refiner.sampler for the hybrid, diffusion.sampler for the baseline)")
    parser.add_argument("--refiner-steps", type=at_least(1), nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--diffusion-steps", type=at_least(1), nargs="+", default=[10, 25, 50])
    parser.add_argument("--holdout", action=argparse.BooleanOptionalAction, default=True,
                        help="when data.holdout is empty, hold oracle.holdout's color:shape pairs out of the "
                        "generators' training data (composition is measured on them)")
    parser.add_argument("--match-flops", action=argparse.BooleanOptionalAction, default=True,
                        help="set the diffusion baseline's step budget to AR + refiner training FLOPs")
    parser.add_argument("--confirm-samples", type=zero_or_at_least_2, default=0, metavar="N",
                        help="judge the hybrid's and pure AR's operating points again on N fresh class prompts, "
                        "each FID with its own interval (0 = off; 100000 separated a gap of 1.5 on the default "
                        "stages)")
    parser.add_argument("--retime", action="store_true", help="only re-run the side-by-side timing of the operating "
                        "points recorded in OUT/showdown.json (on a quiet machine) and rewrite its verdicts and "
                        "markdown; nothing is trained or judged")
    add_device_argument(parser, "images are generated, judged and timed (the stages train on trainer.accelerator's)")
    args, overrides = parse_with_overrides(parser, argv)
    device = benchmark_device(args.device)
    if device is None:
        return 2
    if args.retime:
        return retime(Path(args.run_dir), Path(args.out), device)
    cfg, oracle = config_and_oracle(args.config, [f"run_dir={args.run_dir}", *overrides], device,
                                    refuse=lambda c: step_budget_problem(c, args.systems, args.match_flops))
    if cfg is None:
        return oracle
    if args.holdout and not cfg.data.holdout:
        cfg.data.holdout = list(cfg.oracle.holdout)
        print(f"[showdown] held out of the generators' training data: {', '.join(cfg.data.holdout)}")
    result = {"machine": machine(device),
              "command": "python benchmarks/showdown.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "args": vars(args)}
    try:
        result.update(run(args, cfg, oracle, device))
    except ShowdownError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    write_result(out_dir / "showdown.json", result)
    (out_dir / "showdown.md").write_text(markdown(result))
    result_plots = plots(result, out_dir)
    print(markdown(result))
    print(f"wrote {out_dir / 'showdown.md'} and {', '.join(result_plots)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
