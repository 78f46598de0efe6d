"""Stage 1: the hybrid tokenizer (autoencoder + multi-scale residual quantizer)."""

from hybrid.tokenizer.autoencoder import Autoencoder, HybridAttnProcessor, PretrainedAutoencoder
from hybrid.tokenizer.quantizer import MultiScaleQuantizer, code_counts, usage_stats
from hybrid.tokenizer.tokenizer import HybridTokenizer, TokenizerOutput, default_scales, psnr

__all__ = [
    "Autoencoder",
    "HybridAttnProcessor",
    "HybridTokenizer",
    "MultiScaleQuantizer",
    "PretrainedAutoencoder",
    "TokenizerOutput",
    "code_counts",
    "default_scales",
    "psnr",
    "usage_stats",
]
