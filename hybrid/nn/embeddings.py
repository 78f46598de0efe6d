"""Embeddings the stages share: timestep, class, byte-level text, 2D position, scale."""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from hybrid.nn.attention import AttnMask
from hybrid.nn.blocks import TransformerBlock

TEXT_VOCAB = 256  # UTF-8 bytes


class TimestepEmbedder(nn.Module):
    """Diffusion timestep (B,) float -> (B, dim): sinusoidal features + MLP (diffusers' layers)."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freqs = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(freq_dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.freqs(t).to(self.mlp.linear_1.weight.dtype))  # (B, dim)


class ClassEmbedder(nn.Module):
    """Class id (B,) -> (B, dim). The id `num_classes` is the null (unconditional) class."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    @property
    def null_id(self) -> int:
        return self.num_classes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)  # (B, dim)


def drop_condition(ids: torch.Tensor, prob: float, null_id: int, generator: torch.Generator | None = None):
    """Replaces each id by `null_id` with probability `prob` (classifier-free guidance training)."""
    if prob <= 0:
        return ids
    keep = torch.rand(ids.shape[0], device=ids.device, generator=generator) >= prob
    return torch.where(keep, ids, torch.full_like(ids, null_id))


def fit_caption(text: str, max_len: int) -> str:
    """`text` cut to at most `max_len` UTF-8 bytes (never inside a character): how training fits captions to a
    text encoder's `max_len`, and how the evaluation fits the data's captions the same way."""
    return text.encode("utf-8")[:max_len].decode("utf-8", errors="ignore")


def encode_text(captions: list[str], max_len: int, device: torch.device | str = "cpu"):
    """UTF-8 bytes, right-padded: -> ids (B, max_len) long in 0..255, valid (B, max_len) bool.

    Raises ValueError naming the caption when it is longer than `max_len` bytes.
    """
    ids = torch.zeros(len(captions), max_len, dtype=torch.long)
    valid = torch.zeros(len(captions), max_len, dtype=torch.bool)
    for i, text in enumerate(captions):
        data = text.encode("utf-8")
        if len(data) > max_len:
            raise ValueError(f"prompt {text!r} is {len(data)} bytes; this model takes at most {max_len}")
        ids[i, : len(data)] = torch.tensor(list(data), dtype=torch.long)
        valid[i, : len(data)] = True
    return ids.to(device), valid.to(device)


class ByteTextEncoder(nn.Module):
    """A small transformer over UTF-8 bytes: ids (B, L), valid (B, L) -> tokens (B, L, dim), pooled (B, dim).

    An empty caption (no valid byte: the dropped condition) pools to a learned null vector.
    """

    def __init__(self, dim: int, depth: int = 2, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(TEXT_VOCAB, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.null = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = ids.shape[1]
        x = self.embed(ids) + self.pos[:, :L]  # (B, L, dim)
        mask = AttnMask(key_padding=valid)
        for block in self.blocks:
            x = block(x, mask=mask)
        x = self.norm(x)  # (B, L, dim)
        w = valid.to(x.dtype)[..., None]  # (B, L, 1)
        count = w.sum(1)  # (B, 1)
        pooled = (x * w).sum(1) / count.clamp(min=1)  # (B, dim)
        pooled = torch.where(count > 0, pooled, self.null.expand_as(pooled))
        return x, pooled


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """positions (N,) float -> (N, dim) sin/cos features."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)  # (half,)
    angles = positions.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(h: int, w: int, dim: int, extent: float | None = None) -> torch.Tensor:
    """Fixed 2D sin/cos position embedding, row-major: (h*w, dim).

    With `extent`, coordinates are rescaled to [0, extent) so grids of different sizes (the scales of
    next-scale prediction) share one coordinate frame.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    ys = torch.arange(h, dtype=torch.float32)
    xs = torch.arange(w, dtype=torch.float32)
    if extent is not None:
        ys = (ys + 0.5) * extent / h
        xs = (xs + 0.5) * extent / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w)
    return torch.cat([sincos_1d(gy.flatten(), dim // 2), sincos_1d(gx.flatten(), dim // 2)], dim=1)


class ScaleEmbedding(nn.Module):
    """Learned embedding of the scale index each token belongs to: scale ids (L,) -> (L, dim)."""

    def __init__(self, num_scales: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(num_scales, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, scale_ids: torch.Tensor) -> torch.Tensor:
        return self.table(scale_ids)

    @staticmethod
    def ids_for(scales: list[int], device=None) -> torch.Tensor:
        """Scale index of every token in the coarse-to-fine sequence: (sum s^2,) long."""
        lengths = torch.tensor([s * s for s in scales], device=device)
        return torch.repeat_interleave(torch.arange(len(scales), device=device), lengths)
