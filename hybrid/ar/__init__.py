"""Stage 2: the coarse autoregressive token model (next-scale or raster order, class or text condition)."""

from hybrid.ar.model import MODEL_KEYS, ARModel
from hybrid.ar.sampling import draw_categorical, filter_logits, guidance_scale, guide, sample_logits

__all__ = ["ARModel", "MODEL_KEYS", "draw_categorical", "filter_logits", "guidance_scale", "guide", "sample_logits"]
