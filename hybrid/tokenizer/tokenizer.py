"""HybridTokenizer: autoencoder + multi-scale residual quantizer, the interface every later stage reads.

    images (B, 3, H, W) in [-1, 1]
      -> z (B, C, h, w)                                  autoencoder.encode
      -> indices [(B, s_k, s_k) for each scale], z_q      quantizer (sum of upsampled codes)
      -> residual r = z - z_q                             what the refiner learns
    latent (z, z_q or z_q + r) -> images                  autoencoder.decode

Hybrid training (as in HART): each batch the decoder reconstructs from the continuous z or, with
probability `discrete_prob`, from z_q (straight-through to the encoder, unless
`straight_through=False`). `training_losses` returns the loss and its terms; the LightningModule only
has to call it and step the optimizer over the parameters that require grad (with a pretrained,
frozen AutoencoderKL that is the quantizer's phi conv).
After training call `measure_residual_std(batches)` to store the latent/residual statistics that the
refiner and the pure-diffusion baseline standardise with.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid.tokenizer.autoencoder import Autoencoder, PretrainedAutoencoder
from hybrid.tokenizer.quantizer import MultiScaleQuantizer, area_downsample, code_counts, usage_stats

log = logging.getLogger(__name__)

_SCALE_LADDER = (1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)
LOSSES = ("l1", "mse")


def default_scales(latent_size: int) -> list[int]:
    """A next-scale ladder ending at the latent size: 8 -> [1, 2, 3, 4, 6, 8], 16 -> [1, ..., 10, 13, 16]."""
    if latent_size < 1:
        raise ValueError(f"latent size must be >= 1, got {latent_size}")
    return [s for s in _SCALE_LADDER if s < latent_size] + [latent_size]


class TokenizerOutput(NamedTuple):
    """What `HybridTokenizer.encode` returns; z == z_q + residual."""

    indices: list[torch.Tensor]  # one (B, s_k, s_k) long map per scale
    z_q: torch.Tensor  # (B, C, h, w) sum of the upsampled codes
    residual: torch.Tensor  # (B, C, h, w) z - z_q
    z: torch.Tensor  # (B, C, h, w) continuous latent


class HybridTokenizer(nn.Module):
    """Image <-> (coarse multi-scale tokens, continuous residual).

    Keyword arguments mirror `TokenizerConfig` (hybrid/config.py) plus `image_size`:
        image_size: H = W of the images.
        downsample: 4 or 8 (ignored with `pretrained`: the loaded model decides).
        latent_channels: C (ignored with `pretrained`).
        channels: channels per resolution level of our autoencoder (padded with its last entry).
        layers_per_block: resnets per level (the decoder has one more, as in diffusers).
        scales: token map sizes, strictly increasing, ending at the latent size; None = default_scales.
        coarse_grid: allow scales to end below the latent size (a coarser token grid; the residual keeps
            the finer detail). Without it such scales are an error (a pretrained autoencoder's latent
            gets default_scales instead, with a warning).
        codebook_size: K codes shared by all scales; code dimension = C.
        commitment: weight of the commitment loss |z - sg(z_q)|^2.
        discrete_prob: probability that a training batch decodes z_q instead of z.
        straight_through: a z_q batch's reconstruction gradient reaches the encoder (straight-through);
            False = only z batches and the commitment loss train the encoder (the decoder still
            learns to decode z_q), so the encoder is not pulled toward what the codes can express.
        loss: reconstruction loss, "l1" or "mse".
        dead_code_steps: restart codes unused for this many training steps.
        pretrained: local diffusers AutoencoderKL folder (frozen); "" = train our own autoencoder.
        pretrained_config: with `pretrained`, the AutoencoderKL's architecture as `pretrained_config` returned
            it: the model is built from it (random weights, for a state dict to replace) and the folder is
            not read. None = load the folder.
        phi_ratio: residual ratio of the quantizer's shared refinement conv (VAR's phi); 0 = none.
        ema_decay: decay of the EMA codebook.
        norm_num_groups: GroupNorm groups of our autoencoder; None = the largest that fits the channels.
        patch_size: space-to-depth stem of our autoencoder (1 = none); the conv levels downsample by
            downsample / patch_size.
        shortcut: fixed low-pass shortcut around our autoencoder's conv stacks (see autoencoder.py).
    """

    def __init__(
        self,
        image_size: int = 32,
        downsample: int = 4,
        latent_channels: int = 4,
        channels: list[int] | tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        scales: list[int] | None = None,
        codebook_size: int = 1024,
        commitment: float = 0.25,
        discrete_prob: float = 0.5,
        straight_through: bool = True,
        coarse_grid: bool = False,
        loss: str = "l1",
        dead_code_steps: int = 50,
        pretrained: str = "",
        pretrained_config: dict | None = None,
        phi_ratio: float = 0.0,
        ema_decay: float = 0.99,
        norm_num_groups: int | None = None,
        patch_size: int = 2,
        shortcut: bool = True,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"tokenizer.loss is '{loss}'; choose one of {', '.join(LOSSES)}")
        if not 0.0 <= discrete_prob <= 1.0:
            raise ValueError(f"tokenizer.discrete_prob must be a probability, got {discrete_prob}")
        if pretrained:
            self.autoencoder = PretrainedAutoencoder(pretrained, pretrained_config)
            if phi_ratio <= 0:  # the frozen autoencoder leaves phi as the only gradient-trained part
                log.info("tokenizer.pretrained: using phi_ratio 0.5 (phi is the only trainable part)")
                phi_ratio = 0.5
        else:
            self.autoencoder = Autoencoder(downsample, latent_channels, channels, layers_per_block, norm_num_groups,
                                           patch_size, shortcut)
        self.downsample_factor = self.autoencoder.downsample
        if image_size % self.downsample_factor:
            which = f"tokenizer.pretrained '{pretrained}'" if pretrained else "tokenizer.downsample"
            raise ValueError(f"data.image_size {image_size} is not divisible by the downsampling "
                             f"{self.downsample_factor} of {which}")
        self.image_size = image_size
        self.latent_channels = self.autoencoder.latent_channels
        self.latent_size = image_size // self.downsample_factor
        if scales is None:
            scales = default_scales(self.latent_size)
        scales = [int(s) for s in scales]
        finest = max(scales, default=self.latent_size)  # an unordered list is the quantizer's error to name
        fits = finest == self.latent_size or (coarse_grid and finest < self.latent_size)
        if pretrained and not fits:
            adapted = default_scales(self.latent_size)
            log.warning("tokenizer.scales %s do not fit the pretrained latent size %d; using %s",
                        scales, self.latent_size, adapted)
            scales = adapted
        elif finest < self.latent_size and not coarse_grid:
            raise ValueError(f"tokenizer.scales {scales} end below the latent size {self.latent_size}; "
                             "set tokenizer.coarse_grid=true for a token grid coarser than the latent")
        self.quantizer = MultiScaleQuantizer(self.latent_channels, self.latent_size, scales, codebook_size,
                                             dead_code_steps, ema_decay, phi_ratio)
        self.commitment = commitment
        self.discrete_prob = discrete_prob
        self.straight_through = bool(straight_through)
        self.loss_type = loss
        c = self.latent_channels
        self.register_buffer("latent_mean", torch.zeros(c))  # (C,)
        self.register_buffer("latent_std", torch.ones(c))  # (C,)
        self.register_buffer("residual_mean", torch.zeros(c))  # (C,)
        self.register_buffer("residual_std", torch.ones(c))  # (C,)

    @classmethod
    def from_config(cls, tok_cfg, image_size: int) -> HybridTokenizer:
        """Build from a `TokenizerConfig`-like object (attribute access; no omegaconf needed)."""
        keys = ("downsample", "latent_channels", "channels", "layers_per_block", "scales", "codebook_size",
                "commitment", "discrete_prob", "straight_through", "coarse_grid", "loss", "dead_code_steps",
                "pretrained", "pretrained_config", "phi_ratio", "ema_decay", "patch_size", "shortcut")
        kwargs = {k: getattr(tok_cfg, k) for k in keys if hasattr(tok_cfg, k)}
        for k in ("channels", "scales"):
            if kwargs.get(k) is not None:
                kwargs[k] = [int(v) for v in kwargs[k]]
        return cls(image_size=int(image_size), **kwargs)

    # ---- scale layout -------------------------------------------------------------------------

    @property
    def scales(self) -> list[int]:
        return self.quantizer.scales

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def tokens_per_scale(self) -> list[int]:
        return [s * s for s in self.scales]

    @property
    def seq_len(self) -> int:
        return sum(self.tokens_per_scale)

    @property
    def trainable(self) -> bool:
        """Whether the autoencoder trains (False with a pretrained, frozen AutoencoderKL)."""
        return self.autoencoder.trainable

    @property
    def pretrained_config(self) -> dict:
        """The pretrained AutoencoderKL's architecture (plain JSON values) that rebuilds it without its folder;
        {} for our own autoencoder, which the other keyword arguments describe."""
        return dict(getattr(self.autoencoder, "config", {}))

    # ---- encode / decode ------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> TokenizerOutput:
        """images (B, 3, H, W) in [-1, 1] -> TokenizerOutput(indices, z_q, residual, z). Never updates the codebook."""
        if images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"tokenizer.encode: images of shape {tuple(images.shape[1:])}, expected "
                             f"(3, {self.image_size}, {self.image_size})")
        z = self.autoencoder.encode(images).float()  # (B, C, h, w)
        with torch.autocast(z.device.type, enabled=False):
            indices, z_q = self.quantizer(z, update=False)
        return TokenizerOutput(indices, z_q, z - z_q, z)

    def indices_to_latent(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """One (B, s_k, s_k) index map per scale -> z_q (B, C, h, w); exactly encode's z_q."""
        self._check_indices(indices)
        with torch.autocast(indices[0].device.type, enabled=False):
            return self.quantizer.indices_to_latent(indices)

    def latent_from_scales(self, indices: list[torch.Tensor], num_scales: int) -> torch.Tensor:
        """The latent (B, C, h, w) accumulated from the first `num_scales` index maps alone (the coarse input of a
        refiner with `refiner.coarse_scales`); num_scales = len(scales) is `indices_to_latent`, 0 a zero latent."""
        if not 0 <= num_scales <= len(self.scales) or len(indices) < max(num_scales, 1):
            raise ValueError(f"tokenizer.latent_from_scales: {num_scales} scales asked, {len(indices)} index maps "
                             f"given (at least one, for the batch size), the tokenizer has {len(self.scales)} scales")
        if num_scales == len(self.scales):
            return self.indices_to_latent(list(indices))
        first = indices[0]
        z = torch.zeros(first.shape[0], self.latent_channels, self.latent_size, self.latent_size, device=first.device)
        with torch.autocast(first.device.type, enabled=False):
            for k in range(num_scales):
                z = self.accumulate(z, indices[k], k)
        return z

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, C, h, w) (z, z_q or z_q + residual) -> images (B, 3, H, W), not clamped."""
        return self.autoencoder.decode(latent)

    def reconstruct(self, images: torch.Tensor, discrete: bool = False) -> torch.Tensor:
        """images -> decode(z_q if discrete else z) (B, 3, H, W)."""
        out = self.encode(images)
        return self.decode(out.z_q if discrete else out.z)

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        """(z - latent_mean) / latent_std per channel: the pure-diffusion baseline's target. (B, C, h, w)."""
        return (z - self.latent_mean.to(z)[None, :, None, None]) / self.latent_std.to(z)[None, :, None, None]

    def unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `standardize`: x * latent_std + latent_mean. (B, C, h, w)."""
        return x * self.latent_std.to(x)[None, :, None, None] + self.latent_mean.to(x)[None, :, None, None]

    def lookup(self, indices):
        """Code vectors: idx (B, s, s) -> (B, C, s, s); a list of index maps gives a list."""
        if isinstance(indices, (list, tuple)):
            return [self.quantizer.lookup(i) for i in indices]
        return self.quantizer.lookup(indices)

    # ---- next-scale helpers for the AR stage ----------------------------------------------------

    def downsample(self, z: torch.Tensor, s: int) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, s, s) by area averaging."""
        return area_downsample(z, s)

    def accumulate(self, z_acc: torch.Tensor | None, idx: torch.Tensor, k: int) -> torch.Tensor:
        """z_acc (B, C, h, w) or None (before scale 0) + scale k's upsampled codes idx (B, s_k, s_k)."""
        s = self.scales[k]
        if idx.shape[-2:] != (s, s):
            raise ValueError(f"tokenizer.accumulate: scale {k} expects ({s}, {s}) indices, got {tuple(idx.shape)}")
        return self.quantizer.accumulate(z_acc, idx)

    def next_scale_inputs(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Teacher-forcing inputs of scales 1..K-1: [(B, C, s_k, s_k)], the latent accumulated from
        scales < k (at full h x w) downsampled to s_k. Scale 0's input is the start/condition token."""
        self._check_indices(indices)
        inputs, z_acc = [], None
        for k in range(1, len(self.scales)):
            z_acc = self.accumulate(z_acc, indices[k - 1], k - 1)  # (B, C, h, w)
            inputs.append(self.downsample(z_acc, self.scales[k]))  # (B, C, s_k, s_k)
        return inputs

    def corrupt_indices(self, indices: list[torch.Tensor], prob: float,
                        generator: torch.Generator | None = None, neighbors: int = 0) -> list[torch.Tensor]:
        """Replace each index, with probability `prob`, by another code (new tensors).

        neighbors = 0: a uniformly random code of the whole codebook. neighbors = k > 0: one of the k
        codes nearest (L2) to the true one, a near miss like the AR model's own mistakes; a random
        code of the shared multi-scale codebook is mostly a coarse-scale vector, tens of times larger
        than the fine-scale residual it replaces.
        """
        out = []
        device = generator.device if generator is not None else indices[0].device
        near = None
        if neighbors > 0:
            cb = self.quantizer.codebook.float()  # (K, C)
            k = min(int(neighbors), self.codebook_size - 1)
            near = torch.cdist(cb, cb).fill_diagonal_(float("inf")).topk(k, largest=False).indices  # (K, k)
        for idx in indices:
            hit = torch.rand(idx.shape, generator=generator, device=device) < prob
            if near is None:
                rnd = torch.randint(self.codebook_size, idx.shape, generator=generator, device=device)
            else:
                pick = torch.randint(near.shape[1], idx.shape, generator=generator, device=device)
                rnd = near.to(idx.device)[idx, pick.to(idx.device)]
            out.append(torch.where(hit.to(idx.device), rnd.to(idx.device), idx))
        return out

    def _check_indices(self, indices: list[torch.Tensor]) -> None:
        shapes = [tuple(i.shape[-2:]) for i in indices]
        want = [(s, s) for s in self.scales]
        if shapes != want:
            raise ValueError(f"tokenizer: index maps of sizes {shapes} do not match the scales {self.scales}")

    # ---- training ------------------------------------------------------------------------------

    def training_losses(self, images: torch.Tensor, discrete: bool | None = None,
                        generator: torch.Generator | None = None, step: int | None = None) -> dict[str, torch.Tensor]:
        """One hybrid training step's loss and statistics.

        images (B, 3, H, W) in [-1, 1]. `discrete` None draws it with `discrete_prob` (from `generator`
        when given). In training mode the EMA codebook is updated and dead codes restarted. `step` is
        accepted for the caller's convenience (the quantizer counts its own updates).
        Returns {"loss" (with grad), "recon", "commit", "quant" (phi alignment), "psnr" (of the decoded
        latent, dB, images in [-1, 1]), "recon_images" (B, 3, H, W), "discrete" (1.0 or 0.0),
        "usage/s{k}", "perplexity/s{k}", "usage_pooled", "perplexity_pooled", "usage_finest",
        "dead_restarts"}; everything but "loss" is detached. With a frozen pretrained autoencoder the
        reconstruction is computed without gradients and is not part of the loss.
        """
        del step
        if discrete is None:
            draw = torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu")
            discrete = bool(draw < self.discrete_prob)
        z = self.autoencoder.encode(images).float()  # (B, C, h, w)
        with torch.autocast(z.device.type, enabled=False):
            indices, z_q = self.quantizer(z, update=self.training)  # z_q has grads into phi only
            commit = F.mse_loss(z, z_q.detach())
            quant = F.mse_loss(z_q, z.detach())
        loss = self.commitment * commit + (quant if self.quantizer.phi is not None else 0.0)
        # straight-through: the value is z_q, the gradient reaches the encoder (and phi); without it only phi
        latent = (z_q + (z - z.detach()) if self.straight_through else z_q) if discrete else z  # (B, C, h, w)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            recon = self.decode(latent)  # (B, 3, H, W)
            recon_loss = F.l1_loss(recon, images) if self.loss_type == "l1" else F.mse_loss(recon, images)
        if self.trainable:
            loss = loss + recon_loss
        restarts = float(self.quantizer.last_restarts) if self.training else 0.0
        stats = {"loss": loss, "recon": recon_loss.detach(), "commit": commit.detach(), "quant": quant.detach(),
                 "psnr": psnr(recon.detach(), images), "recon_images": recon.detach(),
                 "discrete": torch.tensor(float(discrete), device=z.device),
                 "dead_restarts": torch.tensor(restarts, device=z.device)}
        stats.update(usage_stats(code_counts(indices, self.codebook_size)))
        return stats

    @torch.no_grad()
    def measure_residual_std(self, batches: Iterable, max_batches: int | None = None) -> dict[str, torch.Tensor]:
        """Per-channel mean/std of z and of r = z - z_q over `batches`; stores them in the buffers.

        Each batch is an image tensor (B, 3, H, W) or a dict with "image". Returns {"latent_mean",
        "latent_std", "residual_mean", "residual_std"} (each (C,)). Sums are all-reduced under DDP.
        """
        device = self.residual_std.device
        sums = torch.zeros(4, self.latent_channels, dtype=torch.float64, device=device)  # z, z^2, r, r^2
        count = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            images = batch["image"] if isinstance(batch, dict) else batch
            out = self.encode(images.to(device))
            z, r = out.z.double(), out.residual.double()
            sums += torch.stack([z.sum((0, 2, 3)), z.pow(2).sum((0, 2, 3)), r.sum((0, 2, 3)), r.pow(2).sum((0, 2, 3))])
            count += z.numel() / z.shape[1]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(count)
        if count == 0:
            raise ValueError("measure_residual_std: no batches given")
        mean_z, mean_r = sums[0] / count, sums[2] / count
        std_z = (sums[1] / count - mean_z**2).clamp_min(1e-12).sqrt()
        std_r = (sums[3] / count - mean_r**2).clamp_min(1e-12).sqrt()
        for name, value in (("latent_mean", mean_z), ("latent_std", std_z), ("residual_mean", mean_r),
                            ("residual_std", std_r)):
            getattr(self, name).copy_(value.float())
        return {"latent_mean": self.latent_mean.clone(), "latent_std": self.latent_std.clone(),
                "residual_mean": self.residual_mean.clone(), "residual_std": self.residual_std.clone()}


def psnr(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of images (B, 3, H, W) against target, both in [-1, 1] (images are clamped)."""
    mse = (images.clamp(-1, 1).float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()
