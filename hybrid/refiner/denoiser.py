"""The conditional denoiser of the refiner and of the pure-diffusion baseline.

One class, `Denoiser`, two architectures over a continuous latent grid (B, C, h, w):

- `arch="dit"` (default): a small DiT. Patch size 1, so every latent position is one token; the
  per-position input is the noisy target concatenated with the coarse latent z_q (2C channels; C
  when `coarse=False`), projected to `width`; fixed 2D sin/cos positions; `depth` transformer blocks
  with adaLN-Zero conditioning on (timestep + condition); an adaLN-modulated, zero-initialised
  final layer back to C channels.
- `arch="mlp"`: a per-position MLP of adaLN-Zero residual blocks, like the diffusion heads of MAR and
  HART. Positions never mix; each one is conditioned on its own z_q (and its 2D position) plus the
  timestep and the condition, i.e. the adaLN condition is per position (B, h*w, width).

The condition (`condition=`) is, beyond z_q: "none"; "class" (`ClassEmbedder`, id `num_classes` is
the null class used for classifier-free guidance); or "text" (the pooled output of a small
`ByteTextEncoder` trained with the denoiser; an all-padding caption is the null condition).

`coarse=True` is the refiner (input x_t and z_q); `coarse=False` is the pure-diffusion baseline
(input x_t only, z_q must be None). The refiner standardises z_q per channel before it enters the
network, (z_q - coarse_mean) / coarse_std, with statistics `set_coarse_stats` takes from the
tokenizer (`hybrid.models.build_denoiser` does it). Raw, the tokenizer's learned channels have a
std of 0.05-0.20 beside the unit-variance noisy target, so the z_q half of the input projection
would learn far slower than the x_t half. Measured (issue #5): standardising did not change the
refiner's FID on its own; it is kept so that both input halves start on an equal footing. The
statistics are saved with the weights; a checkpoint from before they existed loads with the
identity (mean 0, std 1), which is what it was trained with.

Init (DiT's adaLN-Zero): every block starts as the identity and the final projection is zero, so
a fresh denoiser outputs exactly zero, whatever the input.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from hybrid.nn.blocks import FinalLayer, TransformerBlock, modulate
from hybrid.nn.embeddings import ByteTextEncoder, ClassEmbedder, TimestepEmbedder, encode_text, sincos_2d

ARCHS = ("dit", "mlp")
CONDITIONS = ("none", "class", "text")

# Size presets (DiT style). "refiner-*" are the few-step residual refiners, "diffusion-*" the
# pure-diffusion baselines (the refiner scaled up, no coarse input, 25-50 steps).
DENOISER_PRESETS: dict[str, dict] = {
    "refiner-T": dict(arch="dit", width=64, depth=2, heads=2),
    "refiner-S": dict(arch="dit", width=128, depth=4, heads=4),  # = refiner config default
    "refiner-MLP": dict(arch="mlp", width=192, depth=4),
    "diffusion-S": dict(arch="dit", width=192, depth=6, heads=4),  # = diffusion config default
    "diffusion-B": dict(arch="dit", width=384, depth=8, heads=6),
}

Cond = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


class ResBlock(nn.Module):
    """adaLN-Zero residual MLP block on (B, L, D) with a per-position condition (B, L, D) or (B, D)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.SiLU, drop=dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(cond).chunk(3, dim=-1)  # (B, [L,] D) each
        if gate.dim() == 2:
            gate = gate[:, None]
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))  # (B, L, D)


class Denoiser(nn.Module):
    """Conditional denoiser on latents: (x_t, t, z_q, cond) -> model output of x_t's shape.

    Args mirror `DenoiserConfig` (arch, width, depth, heads, mlp_ratio, condition) plus the shapes:
    latent_channels C, latent_size h (= w), coarse (take z_q), num_classes, max_text_len, text_depth.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        latent_size: int = 8,
        coarse: bool = True,
        arch: str = "dit",
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        condition: str = "class",
        num_classes: int = 1,
        max_text_len: int = 64,
        text_depth: int = 2,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"denoiser arch '{arch}' is unknown; choose one of {', '.join(ARCHS)}")
        if condition not in CONDITIONS:
            raise ValueError(f"denoiser condition '{condition}' is unknown; choose one of {', '.join(CONDITIONS)}")
        if width % 4:
            raise ValueError(f"denoiser width {width} must be divisible by 4 (2D sin/cos positions)")
        self.latent_channels = latent_channels
        self.latent_size = latent_size
        self.coarse = coarse
        self.arch = arch
        self.condition = condition
        self.max_text_len = max_text_len
        C = latent_channels

        self.t_embed = TimestepEmbedder(width)
        if condition == "class":
            self.class_embed = ClassEmbedder(num_classes, width)
        elif condition == "text":
            self.text_encoder = ByteTextEncoder(width, depth=text_depth, heads=heads, max_len=max_text_len)
        self.register_buffer("pos", sincos_2d(latent_size, latent_size, width), persistent=False)  # (h*w, D)

        if arch == "dit":
            self.x_proj = nn.Linear(2 * C if coarse else C, width)
            self.blocks = nn.ModuleList(
                TransformerBlock(width, heads, mlp_ratio, dropout=dropout, cond_dim=width) for _ in range(depth)
            )
        else:
            self.x_proj = nn.Linear(C, width)
            self.zq_proj = nn.Linear(C, width) if coarse else None
            self.blocks = nn.ModuleList(ResBlock(width, mlp_ratio, dropout) for _ in range(depth))
        self.final = FinalLayer(width, C, cond_dim=width)
        if coarse:
            self.register_buffer("coarse_mean", torch.zeros(C))  # (C,)
            self.register_buffer("coarse_std", torch.ones(C))  # (C,)
        self._init_weights()

    def set_coarse_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics (C,) each used to standardise z_q on the way in (refiners only)."""
        if not self.coarse:
            raise ValueError("set_coarse_stats: this denoiser has no coarse input (coarse=False)")
        mean, std = torch.as_tensor(mean).float().flatten(), torch.as_tensor(std).float().flatten()
        if mean.numel() != self.latent_channels or std.numel() != self.latent_channels:
            raise ValueError(f"set_coarse_stats: expected {self.latent_channels} channels, got mean "
                             f"{tuple(mean.shape)} and std {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError(f"set_coarse_stats: every std must be > 0, got {std.tolist()}")
        self.coarse_mean.copy_(mean)
        self.coarse_std.copy_(std)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints from before the z_q statistics existed were trained on raw z_q: load them as the identity
        if self.coarse:
            for name, value in (("coarse_mean", 0.0), ("coarse_std", 1.0)):
                state_dict.setdefault(prefix + name, torch.full((self.latent_channels,), value))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _init_weights(self) -> None:
        # Linear layers: xavier (DiT); the adaLN and final projections were zeroed by their modules
        # and stay zero (adaLN-Zero), so a fresh denoiser outputs exactly 0.
        zeroed = {id(m.ada[1]) for m in self.modules() if hasattr(m, "ada")} | {id(self.final.linear)}
        skip = {id(m) for m in self.t_embed.modules()}
        if self.condition == "text":
            skip |= {id(m) for m in self.text_encoder.modules()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in zeroed and id(m) not in skip:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed.mlp.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp.linear_2.weight, std=0.02)

    # -- conditions -------------------------------------------------------------------------------
    def prepare_condition(self, cond, device: torch.device | str | None = None) -> Cond:
        """Any accepted condition -> the tensors `forward` embeds, on `device`.

        Class ids (B,) long; text as (ids (B, L) long, valid (B, L) bool) or captions list[str]
        (encoded with `encode_text`; "" is the null caption); None for condition="none"."""
        if self.condition == "none" or cond is None:
            return None
        if self.condition == "class":
            if not torch.is_tensor(cond) or cond.dim() != 1:
                raise ValueError("this denoiser is class-conditioned: pass class ids as a (B,) LongTensor")
            return cond.to(device=device, dtype=torch.long)
        if isinstance(cond, (list, tuple)) and all(isinstance(c, str) for c in cond):
            return encode_text(list(cond), self.max_text_len, device or "cpu")
        ids, valid = cond
        return ids.to(device=device, dtype=torch.long), valid.to(device=device, dtype=torch.bool)

    def embed_condition(self, cond: Cond, batch: int) -> torch.Tensor | None:
        """cond (see `prepare_condition`) -> (B, width), or None for condition="none"."""
        if self.condition == "none":
            return None
        if cond is None:
            raise ValueError(f"this denoiser is conditioned on '{self.condition}': pass cond (or its null_condition)")
        if self.condition == "class":
            return self.class_embed(cond)  # (B, D)
        ids, valid = cond
        if ids.shape[1] > self.max_text_len:
            raise ValueError(f"text condition of {ids.shape[1]} bytes; this denoiser takes at most {self.max_text_len}")
        return self.text_encoder(ids, valid)[1]  # (B, D)

    def null_condition(self, cond: Cond) -> Cond:
        """The unconditional version of `cond` (same batch size): null class ids / empty captions."""
        if self.condition == "none" or cond is None:
            return cond
        cond = self.prepare_condition(cond, _device_of(cond))
        if self.condition == "class":
            return torch.full_like(cond, self.class_embed.null_id)
        ids, valid = cond
        return torch.zeros_like(ids), torch.zeros_like(valid)

    def drop_condition(self, cond: Cond, prob: float, generator: torch.Generator | None = None) -> Cond:
        """Replaces each sample's condition by the null one with probability `prob` (guidance training).

        The coin flips are drawn on the generator's device and moved to the condition's."""
        if self.condition == "none" or cond is None or prob <= 0:
            return cond
        cond = self.prepare_condition(cond, _device_of(cond))
        ids = cond if self.condition == "class" else cond[0]
        gen_device = generator.device if generator is not None else ids.device
        keep = torch.rand(ids.shape[0], generator=generator, device=gen_device).to(ids.device) >= prob  # (B,)
        if self.condition == "class":
            return torch.where(keep, cond, torch.full_like(cond, self.class_embed.null_id))
        ids, valid = cond
        return ids * keep[:, None], valid & keep[:, None]

    @staticmethod
    def cat_condition(a: Cond, b: Cond) -> Cond:
        """Concatenates two prepared conditions along the batch (for the doubled guidance batch)."""
        if a is None:
            return None
        if isinstance(a, torch.Tensor):
            return torch.cat([a, b])
        return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z_q: torch.Tensor | None = None, cond: Cond = None):
        """x_t (B, C, h, w) noisy target; t (B,) or () timesteps (float or long, in the training
        scheduler's units); z_q (B, C, h, w) coarse latent (coarse=True) or None; cond: class ids (B,),
        text as (ids, valid) (B, L) each or captions list[str], or None -> (B, C, h, w) model output."""
        B, C, h, w = x_t.shape
        if C != self.latent_channels:
            raise ValueError(f"denoiser takes {self.latent_channels} latent channels, got x_t {tuple(x_t.shape)}")
        if (h, w) != (self.latent_size, self.latent_size):
            raise ValueError(f"denoiser was built for a {self.latent_size}x{self.latent_size} latent, got {h}x{w}")
        if self.coarse and z_q is None:
            raise ValueError("this denoiser is a refiner (coarse=True): pass z_q")
        if not self.coarse and z_q is not None:
            raise ValueError("this denoiser has no coarse input (coarse=False): z_q must be None")
        t = t.to(x_t.device).float().expand(B) if t.dim() == 0 else t.to(x_t.device).float()  # (B,)

        c = self.t_embed(t)  # (B, D)
        ce = self.embed_condition(self.prepare_condition(cond, x_t.device), B)
        if ce is not None:
            c = c + ce  # (B, D)
        x = x_t.flatten(2).transpose(1, 2)  # (B, L, C), L = h*w row-major
        zq = None
        if z_q is not None:
            zq = (z_q - self.coarse_mean.to(z_q)[None, :, None, None]) / self.coarse_std.to(z_q)[None, :, None, None]
            zq = zq.flatten(2).transpose(1, 2)  # (B, L, C) standardised

        if self.arch == "dit":
            if zq is not None:
                x = torch.cat([x, zq], dim=-1)  # (B, L, 2C)
            x = self.x_proj(x) + self.pos.to(x.dtype)  # (B, L, D)
            for block in self.blocks:
                x = block(x, c)  # (B, L, D)
        else:
            x = self.x_proj(x)  # (B, L, D)
            c = c[:, None] + self.pos.to(x.dtype)  # (B, L, D) per-position condition
            if zq is not None:
                c = c + self.zq_proj(zq)  # (B, L, D)
            for block in self.blocks:
                x = block(x, c)  # (B, L, D)
        out = self.final(x, c)  # (B, L, C)
        return out.transpose(1, 2).reshape(B, C, h, w)  # (B, C, h, w)


def _device_of(cond) -> torch.device | None:
    if torch.is_tensor(cond):
        return cond.device
    if isinstance(cond, (list, tuple)) and cond and torch.is_tensor(cond[0]):
        return cond[0].device
    return None


def build_denoiser(section, latent_channels: int, latent_size: int, coarse: bool, num_classes: int) -> Denoiser:
    """A Denoiser from a `refiner`/`diffusion` config section (a DenoiserConfig-like object)."""
    return Denoiser(
        latent_channels=latent_channels,
        latent_size=latent_size,
        coarse=coarse,
        arch=section.arch,
        width=section.width,
        depth=section.depth,
        heads=section.heads,
        mlp_ratio=section.mlp_ratio,
        condition=section.condition,
        num_classes=num_classes,
        max_text_len=section.max_text_len,
    )
