"""Image helpers: [-1, 1] tensors to uint8, PNG files and grids."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Writes one (H, W, 3) uint8 image atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        Image.fromarray(image).save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed save (a full disk) leaves no partial file


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, upscale: int = 1) -> None:
    """Saves (B, 3, H, W) images in [-1, 1] as one PNG grid (nrow defaults to ~sqrt(B))."""
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=1, pad_value=1.0)  # (3, H', W')
    if upscale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=upscale, mode="nearest")[0]
    save_png(to_uint8(grid[None])[0], path)
