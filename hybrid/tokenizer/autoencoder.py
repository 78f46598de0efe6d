"""The continuous half of the tokenizer: image (B, 3, H, W) in [-1, 1] <-> latent z (B, C, H/f, W/f).

Two interchangeable autoencoders with the same small interface (`encode`, `decode`, `latent_channels`,
`downsample`, `trainable`):

- `Autoencoder`: ours, trained from scratch. A deterministic autoencoder built from diffusers' VAE
  `Encoder` / `Decoder` blocks (`double_z=False`, no KL term). Their mid-block attention would call SDPA
  directly, so it is switched off (`mid_block_add_attention=False`): at 8x8 latents the conv stack sees
  the whole image anyway. An optional space-to-depth stem (`patch_size` p: pixel_unshuffle before the
  encoder, pixel_shuffle after the decoder) moves the costly full-resolution convs to H/p, which is
  what makes a CPU training step cheap; the conv levels then downsample by downsample / p.
  With `shortcut` (default) both halves get a fixed, parameter-free low-pass path, in the spirit of
  DC-AE's space-to-channel shortcuts ("residual autoencoding", Chen et al. 2024): the encoder adds the
  area-downsampled RGB image to the first three latent channels, the decoder adds the bicubic upsampling
  of those channels to its output, and both conv stacks' output convs start at zero. The autoencoder
  starts as "downsample + bicubic" (about 26 dB on the procedural images) and the conv stacks learn the
  rest; without it the GroupNorm before each output conv makes colour and brightness slow to learn.
  Without the shortcut the latent is divided by its RMS per image instead, since nothing else pins its
  scale (no KL term) and a latent that grows fast leaves the EMA codebook behind.
- `PretrainedAutoencoder`: a frozen diffusers `AutoencoderKL` loaded from a local folder. Its latent is
  the posterior mean, shifted and scaled by its config (`(mean - shift_factor) * scaling_factor`), so it
  is roughly unit-variance. Its trained mid-block attention is kept and routed through the project's
  one attention entry point (`HybridAttnProcessor`). Its `config` (the AutoencoderKL's architecture as
  plain JSON values) rebuilds it without the folder, with random weights that a state dict then
  replaces: that is how checkpoints and exports, which hold its weights, stay self-contained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder, Encoder


def level_channels(channels: list[int] | tuple[int, ...], downsample: int, patch_size: int = 1) -> list[int]:
    """Channels per conv level of a `downsample`x autoencoder: log2(downsample / patch_size) + 1 levels.

    A shorter list is padded with its last entry ([16, 32] at 4x -> [16, 32, 32]); a longer one is an error.
    """
    if downsample < 2 or downsample & (downsample - 1):
        raise ValueError(f"tokenizer.downsample must be a power of two >= 2, got {downsample}")
    if patch_size < 1 or patch_size & (patch_size - 1) or patch_size > downsample:
        raise ValueError(f"tokenizer.patch_size must be a power of two <= downsample {downsample}, got {patch_size}")
    levels = int(math.log2(downsample // patch_size)) + 1
    channels = [int(c) for c in channels]
    if not channels:
        raise ValueError("tokenizer.channels is empty; give the channels per resolution level, e.g. [64, 128, 128]")
    if len(channels) > levels:
        raise ValueError(
            f"tokenizer.channels has {len(channels)} levels but downsample {downsample} with patch_size "
            f"{patch_size} uses {levels}: {channels}")
    return channels + [channels[-1]] * (levels - len(channels))


def default_norm_groups(channels: list[int]) -> int:
    """The largest group count <= 32 that divides every level's channels with >= 2 channels per group."""
    for groups in (32, 16, 8, 4, 2, 1):
        if all(c % groups == 0 and (c // groups >= 2 or groups == 1) for c in channels):
            return groups
    return 1


class Autoencoder(nn.Module):
    """Deterministic conv autoencoder from diffusers VAE blocks.

    encode: (B, 3, H, W) -> (B, latent_channels, H/downsample, W/downsample); decode: the inverse map
    (outputs are not clamped). With patch_size p the convs run on (B, 3p^2, H/p, W/p). See the module
    docstring for `shortcut`.
    """

    trainable = True

    def __init__(
        self,
        downsample: int = 4,
        latent_channels: int = 4,
        channels: list[int] | tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        norm_num_groups: int | None = None,
        patch_size: int = 2,
        shortcut: bool = True,
    ):
        super().__init__()
        levels = level_channels(channels, downsample, patch_size)
        groups = norm_num_groups or default_norm_groups(levels)
        bad = [c for c in levels if c % groups]
        if bad:
            raise ValueError(f"tokenizer norm_num_groups {groups} does not divide the channels {bad} of {levels}")
        self.downsample = downsample
        self.latent_channels = latent_channels
        self.channels = levels
        self.patch_size = patch_size
        self.encoder = Encoder(
            in_channels=3 * patch_size**2,
            out_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * len(levels),
            block_out_channels=tuple(levels),
            layers_per_block=layers_per_block,
            norm_num_groups=groups,
            double_z=False,
            mid_block_add_attention=False,
        )
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=3 * patch_size**2,
            up_block_types=("UpDecoderBlock2D",) * len(levels),
            block_out_channels=tuple(levels),
            layers_per_block=layers_per_block,
            norm_num_groups=groups,
            mid_block_add_attention=False,
        )
        self.shortcut = shortcut
        if shortcut:  # start as the low-pass shortcut alone
            for conv in (self.encoder.conv_out, self.decoder.conv_out):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> z (B, C, H/f, W/f)."""
        x = F.pixel_unshuffle(images, self.patch_size) if self.patch_size > 1 else images  # (B, 3p^2, H/p, W/p)
        z = self.encoder(x)  # (B, C, h, w)
        if not self.shortcut:
            rms = z.float().pow(2).mean((1, 2, 3), keepdim=True).add(1e-6).sqrt()  # (B, 1, 1, 1)
            return (z / rms).to(z.dtype)  # unit RMS per image
        low = F.interpolate(images, size=z.shape[-2:], mode="area")  # (B, 3, h, w)
        c = min(3, self.latent_channels)
        return torch.cat([z[:, :c] + low[:, :c].to(z.dtype), z[:, c:]], dim=1)  # (B, C, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) -> images (B, 3, h*f, w*f)."""
        out = self.decoder(z)  # (B, 3p^2, H/p, W/p)
        if self.patch_size > 1:
            out = F.pixel_shuffle(out, self.patch_size)  # (B, 3, H, W)
        if self.shortcut:
            c = min(3, self.latent_channels)
            low = F.interpolate(z[:, :c], size=out.shape[-2:], mode="bicubic", align_corners=False)  # (B, c, H, W)
            out = torch.cat([out[:, :c] + low.to(out.dtype), out[:, c:]], dim=1)  # (B, 3, H, W)
        return out


class HybridAttnProcessor:
    """A diffusers attention processor that calls `hybrid.nn.attention.attention` instead of SDPA.

    Covers self- and cross-attention of diffusers' `Attention` (group/spatial norm, q/k norms, residual,
    output rescale) without masks, which the VAE never passes.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        from hybrid.nn.attention import attention

        if attention_mask is not None:
            raise NotImplementedError("HybridAttnProcessor: attention masks are not supported (the VAE uses none)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # (B, L, C)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        q = attn.to_q(hidden_states)  # (B, L, H*D)
        k = attn.to_k(encoder_hidden_states)  # (B, Lk, H*D)
        v = attn.to_v(encoder_hidden_states)  # (B, Lk, H*D)
        head_dim = k.shape[-1] // attn.heads
        q = q.view(batch, -1, attn.heads, head_dim)  # (B, L, H, D)
        k = k.view(batch, -1, attn.heads, head_dim)  # (B, Lk, H, D)
        v = v.view(batch, -1, attn.heads, head_dim)  # (B, Lk, H, D)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if abs(attn.scale - head_dim**-0.5) > 1e-8:  # attention() scales by 1/sqrt(D); fold any other scale into q
            q = q * (attn.scale * head_dim**0.5)
        out = attention(q, k, v)  # (B, L, H, D)
        out = out.reshape(batch, -1, attn.heads * head_dim).to(q.dtype)  # (B, L, H*D)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)  # (B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _plain(value: Any) -> Any:
    """A config value as JSON builtins: mappings -> dict, tuples and other sequences -> list (a config
    read back from a checkpoint arrives as omegaconf containers, which are both)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _load_autoencoder_kl(path: str):
    """diffusers' `AutoencoderKL.from_pretrained(path)`, refused (ValueError naming tokenizer.pretrained and the
    folder) unless every weight comes from the folder: without `accelerate`, diffusers fills missing weights at
    random and only logs it, so another model class's folder or a partial file built a frozen autoencoder of
    noise (found by a review: a UNet folder trained until its first step failed deep inside diffusers)."""
    from diffusers import AutoencoderKL

    folder = Path(path)
    where = f"tokenizer.pretrained: '{path}'"
    if not folder.is_dir():
        raise FileNotFoundError(f"{where} is not a folder with a diffusers AutoencoderKL")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        raise ValueError(f"{where} holds a whole pipeline: give its autoencoder, tokenizer.pretrained={folder / 'vae'}")
    try:
        kind = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    except (OSError, ValueError, AttributeError):
        kind = "AutoencoderKL"  # no or unreadable config.json: diffusers' own error below names it
    if kind != "AutoencoderKL":
        raise ValueError(f"{where} holds a diffusers {kind}, not an AutoencoderKL")
    plain = any((folder / f"diffusion_pytorch_model.{ext}").is_file() for ext in ("safetensors", "bin"))
    variant = "fp16" if not plain and (folder / "diffusion_pytorch_model.fp16.safetensors").is_file() else None
    try:
        vae, info = AutoencoderKL.from_pretrained(path, output_loading_info=True, variant=variant)
    except Exception as err:
        raise ValueError(f"{where}: cannot load an AutoencoderKL from it: {_first_line(err)}") from err
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = info.get(what) or []
        if keys:
            shown = ", ".join(str(k) for k in list(keys)[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise ValueError(f"{where}: its weights do not fit its config.json ({len(keys)} "
                             f"{what.replace('_', ' ')}: {shown})")
    return vae


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class PretrainedAutoencoder(nn.Module):
    """A frozen diffusers `AutoencoderKL` from a local folder; latent = scaled posterior mean.

    encode: (B, 3, H, W) -> (B, C, H/f, W/f) with f = 2 ** (levels - 1) of the loaded model.
    With `config` (a previous instance's `config`, as a checkpoint or an export stores it) the model is
    built from it with random weights and the folder is not read: the caller loads the weights.
    """

    trainable = False

    def __init__(self, path: str, config: dict | None = None):
        super().__init__()
        from diffusers import AutoencoderKL

        if config:
            try:
                vae = AutoencoderKL.from_config(_plain(config))
            except Exception as err:
                raise ValueError(f"tokenizer.pretrained_config: cannot build an AutoencoderKL from it: {err}") from err
        else:
            vae = _load_autoencoder_kl(path)
        vae.set_attn_processor(HybridAttnProcessor())
        self.vae = vae.requires_grad_(False).eval()
        self.path = str(path)
        # diffusers' private keys are left out: `_name_or_path` is the folder, the others are bookkeeping
        self.config = {k: _plain(v) for k, v in vae.config.items() if not k.startswith("_")}
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: always in eval mode
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> z (B, C, H/f, W/f), scaled posterior mean."""
        mean = self.vae.encode(images).latent_dist.mean  # (B, C, h, w)
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) -> images (B, 3, h*f, w*f)."""
        return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample
