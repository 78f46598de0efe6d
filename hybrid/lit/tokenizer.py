"""Stage 1 in Lightning: the hybrid tokenizer (autoencoder + multi-scale residual quantizer).

Each step decodes either the continuous latent z or the discrete z_q (probability
`tokenizer.discrete_prob`, drawn from (seed, step) so every DDP rank takes the same path). Logs the
reconstruction PSNR of the path taken, the commitment loss, codebook usage and perplexity per scale,
and a PNG grid of originals / discrete / continuous reconstructions. At the end it measures the
per-channel standard deviation of the residual r (and of z) on validation images (training images
when there are none) and stores it with the weights.
"""

from __future__ import annotations

import zlib

import torch

from hybrid.lit.base import StageModule
from hybrid.models import build_tokenizer, with_pretrained_config


class TokenizerModule(StageModule):
    stage = "tokenizer"

    def __init__(self, config: dict) -> None:
        tokenizer = build_tokenizer(config)
        # with tokenizer.pretrained the saved config records the AutoencoderKL's architecture (its weights are in
        # the state dict), so the checkpoint rebuilds it without the folder
        super().__init__(with_pretrained_config(config, tokenizer))
        self.tokenizer = tokenizer
        self.tokenizer.quantizer.seed = int(self.cfg.seed)  # codebook (re)starts draw from (seed, update)
        self._preview: torch.Tensor | None = None

    def _take_discrete_path(self) -> bool:
        key = f"{self.cfg.seed}:{self.global_step}:path".encode()
        gen = torch.Generator().manual_seed(zlib.crc32(key))
        return bool(torch.rand((), generator=gen) < self.cfg.tokenizer.discrete_prob)

    def compute_loss(self, batch: dict):
        images = batch["image"]  # (B, 3, H, W)
        if self._preview is None:
            self._preview = images[:8].detach().clone()
        discrete = self._take_discrete_path()
        out = self.tokenizer.training_losses(images, discrete=discrete, step=self.global_step)
        logs = {k: v for k, v in out.items() if k not in ("loss", "recon_images", "psnr", "discrete")}
        logs[f"psnr_{'discrete' if discrete else 'continuous'}"] = out["psnr"]
        return out["loss"], logs

    def preview_images(self):
        if self._preview is None:
            return None
        images = self._preview.to(self.device)
        enc = self.tokenizer.encode(images)
        discrete = self.tokenizer.decode(enc.z_q)
        continuous = self.tokenizer.decode(enc.z)
        # rows: originals / discrete / continuous
        return {"recon": torch.cat([images, discrete, continuous]).clamp(-1, 1)}

    @torch.no_grad()
    def on_train_end(self) -> None:
        self.measure_statistics()
        super().on_train_end()

    @torch.no_grad()
    def measure_statistics(self, batches: int = 16) -> None:
        """Per-channel mean/std of z and r over `batches` validation batches, stored in the tokenizer's buffers.

        Without validation data (data.source=shards with no validation shards) they are measured on as many
        training batches instead: left at their 0/1 defaults, the refiner and the diffusion baseline would
        train on unscaled targets.
        """
        dm = self.trainer.datamodule if self._trainer is not None else None
        loader = dm.val_dataloader() if dm is not None else None
        if loader is None:
            return
        was_training = self.tokenizer.training
        self.tokenizer.eval()
        images = self._first_images(loader, batches)
        if not images:
            images = self._first_images(dm.train_dataloader(), batches)
            if self.global_rank == 0:
                print(f"[{self.stage}] no validation data: measuring the latent and residual statistics on "
                      f"{len(images)} training batches")
        if images:
            self.tokenizer.measure_residual_std(images)
        self.tokenizer.train(was_training)

    def _first_images(self, loader, batches: int) -> list[torch.Tensor]:
        """The images of the first `batches` batches of `loader`, on this module's device."""
        images = []
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            images.append(batch["image"].to(self.device))
        return images
