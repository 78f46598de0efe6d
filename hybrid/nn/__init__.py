"""Shared neural-network parts: the attention entry point, transformer blocks and embeddings."""

from hybrid.nn.attention import AttnMask, attention, set_default_backend
from hybrid.nn.blocks import FinalLayer, KVCache, TransformerBlock

__all__ = ["AttnMask", "attention", "set_default_backend", "FinalLayer", "KVCache", "TransformerBlock"]
