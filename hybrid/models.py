"""Builds each stage's plain model from a resolved config (dict or DictConfig) — one place, used by
the LightningModules and by the pipeline alike, so a checkpoint's config always rebuilds the same
architecture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from hybrid.config import from_dict
from hybrid.data.attributes import NUM_CLASSES

if TYPE_CHECKING:
    import torch


def _cfg(config):
    return from_dict(config) if isinstance(config, dict) else config


def num_classes(config) -> int:
    cfg = _cfg(config)
    return cfg.data.num_classes or NUM_CLASSES


def build_tokenizer(config, source: str | os.PathLike | None = None):
    """A HybridTokenizer with the architecture of a tokenizer-stage config; random weights.

    With `tokenizer.pretrained` the AutoencoderKL is built from `tokenizer.pretrained_config`, which the
    tokenizer stage records (`with_pretrained_config`), so a checkpoint or an export rebuilds it without the
    folder; a config without it (a fresh run, a checkpoint saved before it was recorded) loads the folder.
    `source`, the file the config was read from, is named when such an old one's folder is missing.
    """
    from hybrid.tokenizer import HybridTokenizer

    cfg = _cfg(config)
    tok = cfg.tokenizer
    if source is not None and tok.pretrained and not tok.pretrained_config and not Path(tok.pretrained).is_dir():
        from hybrid.checkpoints import CheckpointError

        raise CheckpointError(
            f"'{source}' needs the AutoencoderKL folder '{tok.pretrained}' (tokenizer.pretrained), which does not "
            "exist here: it was saved before checkpoints carried the autoencoder's architecture; put the folder "
            "back at that path")
    return HybridTokenizer.from_config(tok, cfg.data.image_size)


def with_pretrained_config(config: dict, tokenizer) -> dict:
    """The plain config `config` with `tokenizer.pretrained_config` filled from `tokenizer` (built from it) when
    that quantizes a pretrained AutoencoderKL, so `build_tokenizer` rebuilds it from the config alone; any other
    config is returned as it is. What a tokenizer checkpoint, a later stage's `tokenizer_config` and an export
    store."""
    stored = tokenizer.pretrained_config
    if not stored or config["tokenizer"].get("pretrained_config") == stored:
        return config
    return {**config, "tokenizer": {**config["tokenizer"], "pretrained_config": stored}}


def build_ar(config, tokenizer):
    """The coarse AR model for `config.ar`, laid out on the tokenizer's scales and codebook."""
    from hybrid.ar.model import ARModel

    cfg = _cfg(config)
    a = cfg.ar
    # a config stored before `ar.adaln` existed describes a model without it
    adaln = bool(a.adaln) and not (isinstance(config, dict) and "adaln" not in config.get("ar", {}))
    return ARModel(
        scales=list(tokenizer.scales),
        codebook_size=tokenizer.codebook_size,
        latent_channels=tokenizer.latent_channels,
        num_classes=num_classes(cfg),
        order=a.order,
        condition=a.condition,
        width=a.width,
        depth=a.depth,
        heads=a.heads,
        mlp_ratio=a.mlp_ratio,
        dropout=a.dropout,
        drop_path=a.drop_path,
        cond_drop=a.cond_drop,
        max_text_len=a.max_text_len,
        adaln=adaln,
    )


def build_denoiser(config, stage: str, tokenizer):
    """The refiner (stage="refiner", reads z_q) or the pure-diffusion baseline (stage="diffusion")."""
    from hybrid.refiner.denoiser import build_denoiser as _build

    cfg = _cfg(config)
    if stage not in ("refiner", "diffusion"):
        raise ValueError(f"build_denoiser: stage must be 'refiner' or 'diffusion', got '{stage}'")
    model = _build(
        cfg[stage],
        latent_channels=tokenizer.latent_channels,
        latent_size=tokenizer.latent_size,
        coarse=stage == "refiner",
        num_classes=num_classes(cfg),
    )
    if model.coarse:  # z_q enters standardised with the tokenizer's latent statistics
        model.set_coarse_stats(tokenizer.latent_mean, tokenizer.latent_std.clamp_min(1e-4))
        n = int(cfg.refiner.get("coarse_scales", 0))
        if n and not 0 < n <= len(tokenizer.scales):
            raise ValueError(f"refiner.coarse_scales={n}: the tokenizer has {len(tokenizer.scales)} scales "
                             f"({list(tokenizer.scales)}); choose 0 (all) to {len(tokenizer.scales)}")
        if n and n < len(tokenizer.scales):
            import torch

            # the std of z - z_q(scales 1..n), per channel; zero until the refiner's first training batch measures it
            model.register_buffer("target_std", torch.zeros(tokenizer.latent_channels))
    return model


def coarse_scales(config, tokenizer) -> int:
    """How many token scales the refiner's z_q holds (`refiner.coarse_scales`, 0 = all)."""
    n = int(_cfg(config).refiner.get("coarse_scales", 0))
    return n if n > 0 else len(tokenizer.scales)


def refiner_target_std(model, tokenizer) -> torch.Tensor:
    """The per-channel scale of the refiner's residual target (C,): its own measured `target_std` when it
    refines from fewer scales than the tokenizer has, else the tokenizer's `residual_std`."""
    std = getattr(model, "target_std", None)
    if std is None:
        return tokenizer.residual_std
    if not bool((std > 0).all()):
        raise ValueError("the refiner's target_std was never measured (a refiner with refiner.coarse_scales "
                         "measures it on its first training batch): train it before sampling")
    return std


def build_diffusion(config, stage: str):
    """The diffusers-scheduler wrapper (trainer x sampler) for `config.<stage>`."""
    from hybrid.refiner.diffusion import Diffusion

    return Diffusion.from_config(_cfg(config)[stage])
