"""Stage 3 in Lightning: the residual refiner and the pure-diffusion baseline (one base, two stage kinds).

Both read the frozen tokenizer (`TokenizerConsumer`) and train a `Denoiser` (held as `self.model`,
so the pipeline finds its weights under the "model." prefix) with the `Diffusion` wrapper of
`cfg.<stage>` (objective x sampler). EMA weights (`WarmupEMA`) are what checkpoints hold.

- `RefinerModule` (stage "refiner"): x0 = (z - z_q) / residual_std ("residual") or z ("latent"),
  conditioned on the coarse latent z_q. With `refiner.coarse_scales` = N below the tokenizer's scale
  count, z_q holds scales 1..N only and the residual's std is the refiner's own `target_std`.
  Repair training: with `refiner.corrupt_prob` > 0 a fraction of the coarse tokens is replaced by
  near-miss codes (one of the `refiner.corrupt_neighbors` nearest; 0 = any code) before z_q is
  formed, and the target is still the residual to the true z, so the refiner learns to repair AR
  mistakes.
- `DiffusionModule` (stage "diffusion"): the pure-diffusion baseline on the whole latent,
  x0 = (z - latent_mean) / latent_std (the tokenizer's per-channel statistics), no coarse input.

Both drop the condition with probability `cond_drop` (classifier-free guidance) and log the loss per
noise-level bucket (`train/loss_t0-25`, ...). Previews: originals / z_q decoded / refined / z
decoded (refiner); originals / samples of the same conditions (diffusion).
"""

from __future__ import annotations

from typing import Any

import torch

from hybrid.lit.base import TokenizerConsumer, WarmupEMA
from hybrid.models import build_denoiser, build_diffusion, coarse_scales, refiner_target_std
from hybrid.nn.embeddings import fit_caption
from hybrid.refiner.diffusion import refiner_compose, refiner_target


class DenoiserStage(TokenizerConsumer):
    """What the refiner and the diffusion baseline share; subclasses set `stage` and `coarse`."""

    stage = "?"
    coarse = True
    preview_count = 8

    def __init__(self, config: dict, **kwargs: Any) -> None:
        """kwargs: tokenizer_path (fresh run) or tokenizer_config/tokenizer_hash (from a checkpoint)."""
        super().__init__(config, **kwargs)
        self.section = self.cfg[self.stage]
        self.model = build_denoiser(self.cfg, self.stage, self.tokenizer)
        self.diffusion = build_diffusion(self.cfg, self.stage)
        self._preview: dict[str, Any] | None = None

    # -- pieces the subclasses define --------------------------------------------------------------
    def targets(self, images: torch.Tensor, generator: torch.Generator):
        """images (B, 3, H, W) -> (x0 (B, C, h, w), z_q (B, C, h, w) or None, encoder output)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------
    def condition_of(self, batch: dict):
        """The denoiser's condition from a data batch: class ids, captions (cut to max_text_len), or None."""
        kind = self.model.condition
        if kind == "class":
            return batch["class_id"].to(self.device)
        if kind == "text":
            return [fit_caption(c, self.model.max_text_len) for c in batch["caption"]]
        return None

    def compute_loss(self, batch: dict):
        images = batch["image"]  # (B, 3, H, W)
        if self._preview is None:
            n = self.preview_count
            self._preview = {"image": images[:n].detach().clone(),
                             "class_id": batch["class_id"][:n].clone() if "class_id" in batch else None,
                             "caption": list(batch["caption"][:n]) if "caption" in batch else None}
        gen = self.step_generator()
        x0, z_q, _ = self.targets(images, gen)
        cond = self.condition_of(batch)
        loss, buckets = self.diffusion.loss(self.model, x0, z_q, cond, gen, cond_drop=self.section.cond_drop)
        logs = dict(buckets)
        logs["x0_std"] = x0.detach().float().std()
        return loss, logs

    def extra_callbacks(self):
        tcfg = self.tcfg
        if tcfg.ema_decay <= 0:
            return []
        if str(self.cfg.trainer.strategy) == "fsdp":
            print(f"[{self.stage}] trainer.strategy=fsdp: training without EMA (Lightning's weight averaging "
                  "needs the full parameters on every rank)")
            return []
        return [WarmupEMA(decay=tcfg.ema_decay, warmup=tcfg.ema_warmup)]

    def _preview_generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(self.cfg.seed))


class RefinerModule(DenoiserStage):
    """The residual refiner: learns p(r | z_q, cond) in a few steps."""

    stage = "refiner"
    coarse = True
    # a warm start re-measures the residual's scale on this run's tokenizer and data (its first batch)
    not_warm_started = ("tokenizer.", "model.target_std")

    @torch.no_grad()
    def coarse_latent(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """The tokenizer's output and the z_q the refiner sees: the first `refiner.coarse_scales` scales (all by
        default), with repair corruption when given a generator."""
        enc = self.tokenizer.encode(images)
        n = coarse_scales(self.cfg, self.tokenizer)
        indices = enc.indices
        prob = self.section.corrupt_prob
        if generator is not None and prob > 0:
            indices = self.tokenizer.corrupt_indices(indices, prob, generator,
                                                     neighbors=self.section.corrupt_neighbors)
        elif n == len(self.tokenizer.scales):
            return enc, enc.z_q
        return enc, self.tokenizer.latent_from_scales(indices, n)  # (B, C, h, w)

    @torch.no_grad()
    def _measure_target_std(self, enc) -> None:
        """Sets the model's `target_std` (refiners with fewer coarse scales than the tokenizer has) from one
        batch's uncorrupted residual, averaged over ranks; a resumed refiner keeps its own (a warm-started one
        measures it again: `init_from` does not load it)."""
        std = getattr(self.model, "target_std", None)
        if std is None or bool((std > 0).all()):
            return
        r = enc.z - self.tokenizer.latent_from_scales(enc.indices, coarse_scales(self.cfg, self.tokenizer))
        var = r.float().var(dim=(0, 2, 3))  # (C,)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(var)
            var /= torch.distributed.get_world_size()
        std.copy_(var.sqrt().clamp_min(1e-6))

    def targets(self, images, generator):
        enc, z_q = self.coarse_latent(images, generator)
        self._measure_target_std(enc)
        x0 = refiner_target(enc.z, z_q, refiner_target_std(self.model, self.tokenizer), self.section.target)
        return x0, z_q, enc  # x0, z_q (B, C, h, w)

    def coarse_of(self, enc) -> torch.Tensor:
        """The refiner's coarse input from an encoder output (no corruption)."""
        return self.tokenizer.latent_from_scales(enc.indices, coarse_scales(self.cfg, self.tokenizer))

    @torch.no_grad()
    def refine(self, z_q: torch.Tensor, cond=None, steps: int | None = None, generator=None, cfg: float = 1.0):
        """z_q (B, C, h, w) -> the refined latent z (B, C, h, w)."""
        x0 = self.diffusion.sample(self.model, tuple(z_q.shape), z_q, cond, steps or self.section.steps,
                                   generator, cfg=cfg)
        return refiner_compose(x0, z_q, refiner_target_std(self.model, self.tokenizer), self.section.target)

    def preview_images(self):
        if self._preview is None:
            return None
        images = self._preview["image"].to(self.device)
        enc = self.tokenizer.encode(images)
        cond = self.condition_of(self._preview)
        z_q = self.coarse_of(enc)
        z = self.refine(z_q, cond, generator=self._preview_generator())
        decode = self.tokenizer.decode
        # rows: originals / coarse z_q / refined z_q + r / continuous z
        return {"refine": torch.cat([images, decode(z_q), decode(z), decode(enc.z)]).clamp(-1, 1)}


class DiffusionModule(DenoiserStage):
    """The pure-diffusion baseline: the denoiser on the whole (standardised) latent, no coarse input."""

    stage = "diffusion"
    coarse = False

    @torch.no_grad()
    def targets(self, images, generator):
        enc = self.tokenizer.encode(images)
        return self.tokenizer.standardize(enc.z), None, enc  # (B, C, h, w)

    @torch.no_grad()
    def generate(self, cond, batch: int, steps: int | None = None, generator=None, cfg: float = 1.0):
        """-> latents z (B, C, h, w) sampled from pure noise (B = `batch`)."""
        C, h = self.tokenizer.latent_channels, self.tokenizer.latent_size
        x0 = self.diffusion.sample(self.model, (batch, C, h, h), None, cond, steps or self.section.steps,
                                   generator, cfg=cfg, device=self.device)
        return self.tokenizer.unstandardize(x0)

    def preview_images(self):
        if self._preview is None:
            return None
        images = self._preview["image"].to(self.device)
        cond = self.condition_of(self._preview)
        z = self.generate(cond, images.shape[0], generator=self._preview_generator())
        # rows: originals (their conditions) / samples of the same conditions
        return {"samples": torch.cat([images, self.tokenizer.decode(z)]).clamp(-1, 1)}
