"""The one attention entry point of the project.

Every model calls `attention(q, k, v, mask)`; nobody calls SDPA or xformers directly.

Layout: q (B, Lq, H, D), k and v (B, Lk, H, D) -> (B, Lq, H, D).

Masks (`AttnMask`), freely combined:
- none;
- `causal=True`: key j is visible to query i when j <= i;
- `scale_lengths=(n0, n1, ...)`: the next-scale "staircase" — the sequence is cut into blocks of these
  lengths and a token sees every token of its own block and of earlier blocks;
- `key_padding` (B, Lk) bool, True for real keys: padded keys are invisible (variable-length prefixes).

When queries are shorter than keys (KV-cache decoding), the query block is aligned bottom-right:
query i sits at position Lk - Lq + i. A query row whose keys are all masked outputs zeros in every
backend, never NaN.

Backends: `xformers` (memory_efficient_attention; its bias classes where one fits, else a dense
additive bias, padded as xformers requires), `sdpa` (torch's scaled_dot_product_attention with
explicit masks), `math` (explicit softmax, the reference). `auto` picks xformers on CUDA when it
imports and runs, else sdpa, and logs its choice once. xformers is imported lazily.
"""

from __future__ import annotations

import logging
import math as _math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "xformers", "sdpa", "math")
_default_backend = "auto"
_logged_choice: set[str] = set()


def set_default_backend(name: str) -> None:
    """Sets the backend used when `attention(..., backend=None)` (config key `attention.backend`)."""
    global _default_backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend '{name}' is unknown; choose one of {', '.join(BACKENDS)}")
    _default_backend = name


def get_default_backend() -> str:
    return _default_backend


@dataclass(frozen=True, eq=False)
class AttnMask:
    """Which keys each query may see. See the module docstring."""

    causal: bool = False
    scale_lengths: tuple[int, ...] | None = None
    key_padding: torch.Tensor | None = None  # (B, Lk) bool, True = real key

    @property
    def is_empty(self) -> bool:
        return not self.causal and self.scale_lengths is None and self.key_padding is None

    def dense(self, batch: int, lq: int, lk: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The boolean mask, True = attend: (B or 1, 1, Lq, Lk), or None when nothing is masked."""
        if self.is_empty:
            return None
        if lq > lk:
            raise ValueError(f"attention mask: {lq} queries cannot be aligned to {lk} keys")
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
        qpos = torch.arange(lk - lq, lk, device=device)[:, None]  # (Lq, 1), bottom-right aligned
        kpos = torch.arange(lk, device=device)[None, :]  # (1, Lk)
        if self.causal:
            allowed &= kpos <= qpos
        if self.scale_lengths is not None:
            if sum(self.scale_lengths) != lk:
                raise ValueError(f"attention mask: scale_lengths sum to {sum(self.scale_lengths)}, keys are {lk}")
            block = torch.repeat_interleave(
                torch.arange(len(self.scale_lengths), device=device),
                torch.tensor(self.scale_lengths, device=device),
            )  # (Lk,) block id per position
            allowed &= block[None, :] <= block[lk - lq :, None]
        allowed = allowed[None, None]  # (1, 1, Lq, Lk)
        if self.key_padding is not None:
            if self.key_padding.shape[-1] != lk:
                raise ValueError(f"attention mask: key_padding has {self.key_padding.shape[-1]} keys, expected {lk}")
            allowed = allowed & self.key_padding.to(device=device, dtype=torch.bool)[:, None, None, :]
        return allowed.expand(max(batch if self.key_padding is not None else 1, 1), 1, lq, lk)


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------


def _math_attention(q, k, v, allowed):
    scale = 1.0 / _math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k).float() * scale  # (B, H, Lq, Lk)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
        any_key = allowed.any(dim=-1, keepdim=True)  # (B|1, 1, Lq, 1)
        scores = torch.where(any_key, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
        probs = torch.softmax(scores, dim=-1) * any_key
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)  # (B, Lq, H, D)


def _sdpa_attention(q, k, v, mask: AttnMask):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    lq, lk = q.shape[1], k.shape[1]
    if mask.is_empty:
        out = F.scaled_dot_product_attention(qh, kh, vh)
        return out.transpose(1, 2)
    if mask.causal and mask.scale_lengths is None and mask.key_padding is None and lq == lk:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)  # top-left == bottom-right here
        return out.transpose(1, 2)
    allowed = mask.dense(q.shape[0], lq, lk, q.device)  # (B|1, 1, Lq, Lk)
    any_key = allowed.any(dim=-1, keepdim=True)
    safe = allowed | ~any_key  # a fully masked row attends everywhere, then is zeroed
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=safe)
    out = out * any_key.to(out.dtype)
    return out.transpose(1, 2)


@lru_cache(maxsize=1)
def _xformers_ops():
    """xformers.ops, or None when it does not import (imported on first use only)."""
    try:
        import xformers.ops as xops  # noqa: PLC0415

        return xops
    except Exception as err:  # ImportError, or a broken build
        log.debug("xformers unavailable: %s", err)
        return None


def xformers_bias(mask: AttnMask, batch: int, heads: int, lq: int, lk: int, dtype, device):
    """The xformers attention bias for `mask`: a bias class where one fits, else a dense tensor.

    Returns (bias, any_key) where any_key (B|1, 1, Lq, 1) marks rows with at least one visible key
    (None when every row has one).
    """
    from xformers.ops import fmha  # noqa: PLC0415

    if mask.is_empty:
        return None, None
    if mask.causal and mask.scale_lengths is None and mask.key_padding is None:
        if lq == lk:
            return fmha.attn_bias.LowerTriangularMask(), None
        return fmha.attn_bias.LowerTriangularFromBottomRightMask(), None
    allowed = mask.dense(batch, lq, lk, device)  # (B|1, 1, Lq, Lk)
    any_key = allowed.any(dim=-1, keepdim=True)
    safe = (allowed | ~any_key).expand(batch, heads, lq, lk)
    # xformers wants the bias memory aligned: allocate the key dim padded to a multiple of 8, then slice.
    padded = (lk + 7) // 8 * 8
    storage = torch.zeros(batch, heads, lq, padded, dtype=dtype, device=device)
    bias = storage[..., :lk]
    bias.masked_fill_(~safe, float("-inf"))
    return bias, any_key


def _xformers_attention(q, k, v, mask: AttnMask):
    xops = _xformers_ops()
    if xops is None:
        raise RuntimeError("attention backend 'xformers' was asked for, but xformers does not import")
    bias, any_key = xformers_bias(mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.dtype, q.device)
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # (B, Lq, H, D)
    if any_key is not None:
        out = out * any_key.transpose(1, 2).to(out.dtype)  # (B|1, Lq, 1, 1)
    return out


@lru_cache(maxsize=8)
def _xformers_works(device_type: str, dtype: torch.dtype) -> bool:
    xops = _xformers_ops()
    if xops is None or device_type != "cuda":
        return False
    try:
        t = torch.randn(1, 8, 1, 32, device="cuda", dtype=dtype)
        xops.memory_efficient_attention(t, t, t)
        return True
    except Exception as err:  # NotImplementedError, missing kernels
        log.warning("xformers imports but its kernels do not run here (%s); using sdpa", err)
        return False


def resolve_backend(backend: str | None, q: torch.Tensor) -> str:
    name = backend or _default_backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend '{name}' is unknown; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    chosen = "xformers" if q.is_cuda and _xformers_works(q.device.type, q.dtype) else "sdpa"
    key = f"{q.device.type}:{chosen}"
    if key not in _logged_choice:
        _logged_choice.add(key)
        log.info("attention backend auto -> %s on %s", chosen, q.device.type)
    return chosen


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttnMask | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention. q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D)."""
    mask = mask or AttnMask()
    name = resolve_backend(backend, q)
    if name == "math":
        return _math_attention(q, k, v, mask.dense(q.shape[0], q.shape[1], k.shape[1], q.device))
    if name == "sdpa":
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            return _cpu_bf16_attention(q, k, v, mask)
        return _sdpa_attention(q, k, v, mask)
    return _xformers_attention(q, k, v, mask)


# Keys up to which the CPU bf16 path uses plain matmuls; above it torch's flash kernel (in fp32) is faster.
# Measured forward + backward on 2 CPU cores (2026-11-28): 130 keys 35.9 ms against 44.4 (the default AR,
# batch 64), 192 keys 42.2 against 31.8, 256 keys 76.5 against 45.9 (batch 32, causal).
CPU_BF16_MATMUL_MAX_KEYS = 160


def _cpu_bf16_attention(q, k, v, mask: AttnMask) -> torch.Tensor:
    """bf16 attention on the CPU: two bf16 matmuls around an fp32 softmax for short sequences, else
    torch's flash kernel in fp32 (with autocast off, or it would cast back to bf16).

    The CPU flash kernel is slower in bf16 than in fp32, and slower than plain matmuls for short
    sequences. In the default AR's bf16 training step (batch 64, 130 tokens, fused AdamW; medians of 9,
    in alternation, 2 CPU cores, 2026-11-28) the step took 0.774 s with matmuls against 0.822 s with the
    flash kernel in fp32 (and 1.00 s against 0.81 s for the flash kernel in bf16 against fp32, in an
    earlier run). The matmul path materialises the (B, H, Lq, Lk) scores.
    """
    if k.shape[1] > CPU_BF16_MATMUL_MAX_KEYS:
        with torch.autocast("cpu", enabled=False):
            out = _sdpa_attention(q.float(), k.float(), v.float(), mask)
        return out.to(torch.bfloat16)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    scores = torch.matmul(qh * (1.0 / _math.sqrt(q.shape[-1])), kh.transpose(-1, -2))  # (B, H, Lq, Lk)
    allowed = mask.dense(q.shape[0], q.shape[1], k.shape[1], q.device)  # (B|1, 1, Lq, Lk) or None
    if allowed is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    else:
        any_key = allowed.any(dim=-1, keepdim=True)  # (B|1, 1, Lq, 1)
        scores = scores.masked_fill(~(allowed | ~any_key), float("-inf"))  # a fully masked row sees all, then is zeroed
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32) * any_key
    return torch.matmul(probs.to(v.dtype), vh).transpose(1, 2)  # (B, Lq, H, D)
