"""The attention entry point: every mask against a hand-built one, backends agree, no NaN rows."""

import importlib

import pytest
import torch

from hybrid.nn.attention import AttnMask, attention, resolve_backend, xformers_bias
from hybrid.nn.blocks import KVCache, TransformerBlock
from hybrid.nn.embeddings import ByteTextEncoder, encode_text, sincos_2d

attention_module = importlib.import_module("hybrid.nn.attention")  # the package re-exports the function by that name

B, H, D = 2, 2, 8


def qkv(lq, lk, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, lq, H, D, generator=g).to(device, dtype)
    k = torch.randn(B, lk, H, D, generator=g).to(device, dtype)
    v = torch.randn(B, lk, H, D, generator=g).to(device, dtype)
    return q, k, v


def hand_mask(kind, lq, lk, lengths=None, padding=None):
    """Reference masks built with loops, True = attend; (B, Lq, Lk)."""
    m = torch.ones(B, lq, lk, dtype=torch.bool)
    block = []
    for i, n in enumerate(lengths or []):
        block += [i] * n
    for b in range(B):
        for i in range(lq):
            qpos = lk - lq + i
            for j in range(lk):
                ok = True
                if "causal" in kind:
                    ok &= j <= qpos
                if "stair" in kind:
                    ok &= block[j] <= block[qpos]
                if padding is not None:
                    ok &= bool(padding[b, j])
                m[b, i, j] = ok
    return m


PADDING = torch.tensor([[True] * 7 + [False], [False, False] + [True] * 6])  # (B, 8)
CASES = {
    "none": (AttnMask(), 8, 8, None, None),
    "causal": (AttnMask(causal=True), 8, 8, None, None),
    "causal_kv": (AttnMask(causal=True), 3, 8, None, None),
    "stair": (AttnMask(scale_lengths=(1, 3, 4)), 8, 8, (1, 3, 4), None),
    "stair_kv": (AttnMask(scale_lengths=(1, 3, 4)), 4, 8, (1, 3, 4), None),
    "padding": (AttnMask(key_padding=PADDING), 8, 8, None, PADDING),
    "causal_padding": (AttnMask(causal=True, key_padding=PADDING), 8, 8, None, PADDING),
    "causal_padding_kv": (AttnMask(causal=True, key_padding=PADDING), 2, 8, None, PADDING),
    "stair_padding": (AttnMask(scale_lengths=(2, 2, 4), key_padding=PADDING), 8, 8, (2, 2, 4), PADDING),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mask_matches_hand_built(name):
    mask, lq, lk, lengths, padding = CASES[name]
    kind = name
    dense = mask.dense(B, lq, lk)
    ref = hand_mask(kind, lq, lk, lengths, padding)
    if dense is None:
        assert ref.all()
    else:
        assert torch.equal(dense[:, 0].expand(B, lq, lk), ref)


@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_matches_math(name):
    mask, lq, lk, *_ = CASES[name]
    q, k, v = qkv(lq, lk)
    ref = attention(q, k, v, mask, backend="math")
    out = attention(q, k, v, mask, backend="sdpa")
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_keys", [attention_module.CPU_BF16_MATMUL_MAX_KEYS, 0])  # matmul path, flash path
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_bf16_sdpa_matches_fp32_math(name, max_keys, monkeypatch):
    # bf16 on the CPU takes its own paths (bf16 matmuls around an fp32 softmax up to CPU_BF16_MATMUL_MAX_KEYS
    # keys, the flash kernel in fp32 beyond): both must agree with the fp32 reference to bf16 precision,
    # zero the rows that see no key, and pass finite gradients back
    monkeypatch.setattr(attention_module, "CPU_BF16_MATMUL_MAX_KEYS", max_keys)
    mask, lq, lk, *_ = CASES[name]
    q, k, v = qkv(lq, lk)
    ref = attention(q, k, v, mask, backend="math")
    qb, kb, vb = (t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v))
    out = attention(qb, kb, vb, mask, backend="sdpa")
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    assert torch.equal(out.float() == 0, ref == 0)  # exactly the rows with no visible key
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (qb, kb, vb))


def test_fully_masked_rows_are_zero_in_every_backend():
    # Left-padded sample 1: under a causal mask its first two queries see no real key.
    mask = AttnMask(causal=True, key_padding=PADDING)
    q, k, v = qkv(8, 8)
    q.requires_grad_(True)
    for backend in ("math", "sdpa"):
        out = attention(q, k, v, mask, backend=backend)
        assert torch.isfinite(out).all()
        assert out[1, :2].abs().max() == 0
        assert out[1, 2:].abs().max() > 0
        out.sum().backward()
        assert torch.isfinite(q.grad).all()
        q.grad = None


def test_math_reference_is_softmax_attention():
    q, k, v = qkv(4, 4)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    torch.testing.assert_close(attention(q, k, v, backend="math"), ref)


def test_unknown_backend_is_a_clear_error():
    q, k, v = qkv(2, 2)
    with pytest.raises(ValueError, match="unknown"):
        attention(q, k, v, backend="flash9")


def test_auto_picks_sdpa_on_cpu():
    q, _, _ = qkv(2, 2)
    assert resolve_backend("auto", q) == "sdpa"


@pytest.mark.parametrize("name", list(CASES))
def test_xformers_bias_materializes_to_reference(name):
    pytest.importorskip("xformers.ops")
    mask, lq, lk, lengths, padding = CASES[name]
    bias, any_key = xformers_bias(mask, B, H, lq, lk, torch.float32, "cpu")
    ref = hand_mask(name, lq, lk, lengths, padding)  # (B, Lq, Lk)
    if bias is None:
        assert ref.all()
        return
    dense = bias if isinstance(bias, torch.Tensor) else bias.materialize((B, H, lq, lk))
    dense = dense.expand(B, H, lq, lk)
    visible = dense == 0
    # Fully masked rows are opened (then zeroed after attention), so compare rows that have a key.
    has_key = ref.any(-1)  # (B, Lq)
    for h in range(H):
        assert torch.equal(visible[:, h][has_key], ref[has_key])
    if any_key is not None:
        assert torch.equal(any_key[:, 0, :, 0].expand(B, lq), has_key)
    if isinstance(bias, torch.Tensor):
        assert bias.storage_offset() == 0 and bias.stride(-2) % 8 == 0  # aligned as xformers requires


def test_causal_kv_bias_is_bottom_right():
    pytest.importorskip("xformers.ops")
    from xformers.ops import fmha

    bias, _ = xformers_bias(AttnMask(causal=True), 1, 1, 2, 5, torch.float32, "cpu")
    assert isinstance(bias, fmha.attn_bias.LowerTriangularFromBottomRightMask)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xformers_matches_sdpa_on_cuda(name, dtype):
    pytest.importorskip("xformers.ops")
    mask, lq, lk, *_ = CASES[name]
    if mask.key_padding is not None:
        mask = AttnMask(mask.causal, mask.scale_lengths, mask.key_padding.cuda())
    q, k, v = qkv(lq, lk, device="cuda", dtype=dtype)
    ref = attention(q, k, v, mask, backend="sdpa")
    out = attention(q, k, v, mask, backend="xformers")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_kv_cache_equals_full_forward():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, cond_dim=16).eval()
    torch.nn.init.normal_(block.ada[1].weight, std=0.1)  # leave the identity start
    x = torch.randn(2, 6, 32)
    cond = torch.randn(2, 16)
    full = block(x, cond, AttnMask(causal=True))
    cache = KVCache()
    parts = [block(x[:, :3], cond, AttnMask(causal=True), cache)]
    for i in range(3, 6):
        parts.append(block(x[:, i : i + 1], cond, AttnMask(causal=True), cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_adaln_zero_block_starts_as_identity_and_has_gradients():
    block = TransformerBlock(32, 4, cond_dim=16)
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = block(x, torch.randn(2, 16))
    assert torch.equal(out, x)
    out.pow(2).sum().backward()
    assert block.ada[1].weight.grad is not None and torch.isfinite(block.ada[1].weight.grad).all()


def test_text_encoder_pools_and_handles_empty_captions():
    ids, valid = encode_text(["a red circle", ""], max_len=16)
    assert ids.shape == (2, 16) and valid[0].sum() == 12 and valid[1].sum() == 0
    enc = ByteTextEncoder(32, depth=1, heads=4, max_len=16)
    tokens, pooled = enc(ids, valid)
    assert tokens.shape == (2, 16, 32) and pooled.shape == (2, 32)
    assert torch.isfinite(tokens).all() and torch.equal(pooled[1], enc.null)
    with pytest.raises(ValueError, match="at most 16"):
        encode_text(["x" * 17], max_len=16)


def test_sincos_2d_shape_and_distinct_rows():
    emb = sincos_2d(3, 4, 16)
    assert emb.shape == (12, 16)
    assert torch.cdist(emb, emb).add(torch.eye(12)).min() > 0
