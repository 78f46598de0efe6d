"""Stage 2, the coarse AR model: causality, KV cache == full forward, guidance, determinism, learning.

Toy sizes: width 32, depth 2, heads 2, scales [1, 2, 3], codebook 16, latent channels 4. The tokenizer is
stood in for by `ToyLayout` (random codebook, bilinear upsampling), so these tests do not depend on it.
"""

import pytest
import torch
import torch.nn.functional as F

from hybrid.ar import ARModel, draw_categorical, filter_logits, guidance_scale, sample_logits
from hybrid.nn.attention import get_default_backend, set_default_backend

SCALES, V, C, NUM_CLASSES = [1, 2, 3], 16, 4, 5
B = 2
CAPTIONS = ["red", "a big blue square"]  # prefixes of different lengths: the first is padded
ORDERS = ["next_scale", "raster"]
CONDITIONS = ["class", "text"]


class ToyLayout:
    """The duck-typed part of the tokenizer the AR model samples with: random codebook, bilinear upsampling."""

    def __init__(self, scales=SCALES, codebook_size=V, channels=C, seed=0):
        self.scales = list(scales)
        self.codebook_size = codebook_size
        self.latent_channels = channels
        self.codebook = torch.randn(codebook_size, channels, generator=torch.Generator().manual_seed(seed))

    def downsample(self, z, s):
        return F.interpolate(z, size=(s, s), mode="area")  # (B, C, s, s)

    def accumulate(self, z_acc, idx, k):
        h = self.scales[-1]
        code = self.codebook.to(idx.device)[idx].permute(0, 3, 1, 2)  # (B, C, s_k, s_k)
        up = F.interpolate(code, size=(h, h), mode="bilinear", align_corners=False)  # (B, C, h, h)
        return up if z_acc is None else z_acc + up

    def next_scale_inputs(self, indices):
        out, z = [], None
        for k in range(len(indices) - 1):
            z = self.accumulate(z, indices[k], k)
            out.append(self.downsample(z, self.scales[k + 1]))
        return out


LAYOUT = ToyLayout()


def make_model(order="next_scale", condition="class", seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"cond_drop": 0.0, **kw}
    model = ARModel(scales=SCALES, codebook_size=V, latent_channels=C, num_classes=NUM_CLASSES, order=order,
                    condition=condition, width=32, depth=2, heads=2, **kw)
    # a freshly built model has a zero head (uniform logits) and adaLN-Zero blocks (identity); give
    # every test a non-trivial function
    torch.nn.init.normal_(model.head.linear.weight, std=0.5)
    for m in model.modules():
        if hasattr(m, "ada"):
            torch.nn.init.normal_(m.ada[1].weight, std=0.2)
            torch.nn.init.normal_(m.ada[1].bias, std=0.2)
    return model.eval()


def random_indices(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (batch, s, s), generator=g) for s in SCALES]


def make_cond(condition, batch=B):
    if condition == "class":
        return torch.arange(batch) % NUM_CLASSES
    return (CAPTIONS * batch)[:batch]


def logits_of(model, indices, cond):
    inputs = LAYOUT.next_scale_inputs(indices) if model.order == "next_scale" else None
    return model(indices, cond, inputs)  # (B, L_img, V)


@pytest.fixture(params=["sdpa", "math"])
def backend(request):
    old = get_default_backend()
    set_default_backend(request.param)
    yield request.param
    set_default_backend(old)


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("condition", CONDITIONS)
def test_shapes_loss_and_finite_gradients(order, condition):
    model = make_model(order, condition).train()
    indices = random_indices()
    inputs = LAYOUT.next_scale_inputs(indices) if order == "next_scale" else None
    loss, metrics = model.loss(indices, make_cond(condition), inputs)
    assert model(indices, make_cond(condition), inputs).shape == (B, sum(s * s for s in SCALES), V)
    loss.backward()
    assert torch.isfinite(loss)
    assert set(metrics) == {"loss", "acc", "acc/scale1", "acc/scale2", "acc/scale3"}
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_next_scale_causality():
    """Changing the tokens of scale j changes only the inputs of scales > j: logits of scales <= j stay."""
    model = make_model("next_scale")
    indices = random_indices()
    cond = make_cond("class")
    base = logits_of(model, indices, cond)
    ends = torch.tensor([s * s for s in SCALES]).cumsum(0).tolist()
    for j in range(len(SCALES) - 1):
        changed = [i.clone() for i in indices]
        changed[j] = (changed[j] + 1) % V
        out = logits_of(model, changed, cond)
        torch.testing.assert_close(out[:, : ends[j]], base[:, : ends[j]], rtol=0, atol=0)
        assert not torch.allclose(out[:, ends[j] :], base[:, ends[j] :])


def test_raster_causality():
    """Changing token t changes only the logits of tokens after t."""
    model = make_model("raster")
    indices = random_indices()
    cond = make_cond("class")
    base = logits_of(model, indices, cond)
    codes = torch.cat([i.flatten(1) for i in indices], 1)
    for t in (0, 3, 7, codes.shape[1] - 2):
        changed_codes = codes.clone()
        changed_codes[:, t] = (changed_codes[:, t] + 1) % V
        changed = [c.view(B, s, s) for c, s in zip(changed_codes.split([s * s for s in SCALES], 1), SCALES)]
        out = logits_of(model, changed, cond)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize("order", ORDERS)
def test_text_padding_is_invisible(order):
    """Pad bytes (their ids, and how many columns of padding) do not change any logit."""
    model = make_model(order, "text")
    indices = random_indices()
    trimmed = model.prepare_condition(CAPTIONS)
    ids, valid = trimmed
    assert ids.shape[1] == len(CAPTIONS[1])
    wide_ids = torch.full((B, model.max_text_len), 77)  # garbage in the pads, full width
    wide_valid = torch.zeros(B, model.max_text_len, dtype=torch.bool)
    wide_ids[:, : ids.shape[1]] = torch.where(valid, ids, torch.full_like(ids, 99))
    wide_valid[:, : ids.shape[1]] = valid
    base = logits_of(model, indices, trimmed)
    torch.testing.assert_close(logits_of(model, indices, (wide_ids, wide_valid)), base, rtol=1e-5, atol=1e-5)
    # the prompt itself matters
    assert not torch.allclose(logits_of(model, indices, ["green", "a big blue square"])[0], base[0])


@pytest.mark.parametrize("adaln", [True, False])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("condition", CONDITIONS)
def test_kv_cache_equals_full_forward(order, condition, backend, adaln):
    """The logits the cached sampler drew from equal a full teacher-forced forward on its tokens (fp32)."""
    model = make_model(order, condition, adaln=adaln)
    cond = make_cond(condition)
    tokens, cached = model.generate(cond, LAYOUT, torch.Generator().manual_seed(0), return_logits=True)
    assert [tuple(t.shape) for t in tokens] == [(B, s, s) for s in SCALES]
    full = logits_of(model, tokens, cond)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ORDERS)
def test_guidance_scale_one_equals_conditional_sampling(order):
    """cfg=1 through the doubled (cond + null) batch draws the same tokens as plain conditional sampling."""
    model = make_model(order)
    cond = make_cond("class")
    plain = model.generate(cond, LAYOUT, torch.Generator().manual_seed(3), cfg=1.0)
    doubled = model.generate(cond, LAYOUT, torch.Generator().manual_seed(3), cfg=1.0, double_batch=True)
    for a, b in zip(plain, doubled):
        assert torch.equal(a, b)
    guided = model.generate(cond, LAYOUT, torch.Generator().manual_seed(3), cfg=4.0, cfg_schedule="linear")
    assert [tuple(t.shape) for t in guided] == [tuple(t.shape) for t in plain]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("condition", CONDITIONS)
def test_same_generator_same_tokens(order, condition):
    model = make_model(order, condition)
    cond = make_cond(condition, batch=4)
    kw = {"cfg": 2.0, "temperature": 1.0, "top_k": 8, "top_p": 0.95}

    def run(seed):
        return torch.cat([t.flatten(1) for t in model.generate(cond, LAYOUT, torch.Generator().manual_seed(seed),
                                                                 **kw)], 1)

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.min() >= 0 and first.max() < V


@pytest.mark.parametrize("order", ORDERS)
def test_num_scales_gives_the_first_scales_of_the_same_draw(order):
    """What a refiner of the first scales reads: the full draw's first m scales and no more, under a guidance
    schedule that still spans all K scales (tokens)."""
    model = make_model(order, "class")
    cond = make_cond("class", batch=4)
    kw = {"cfg": 3.0, "cfg_schedule": "linear", "temperature": 1.0}
    full = model.generate(cond, LAYOUT, torch.Generator().manual_seed(7), **kw)
    for m in range(1, len(SCALES)):
        first = model.generate(cond, LAYOUT, torch.Generator().manual_seed(7), num_scales=m, **kw)
        assert len(first) == m and all(torch.equal(a, b) for a, b in zip(first, full))
    with pytest.raises(ValueError, match="num_scales=0"):
        model.generate(cond, LAYOUT, torch.Generator(), num_scales=0)


@pytest.mark.parametrize("condition", CONDITIONS)
def test_given_scales_are_kept_and_the_rest_follow_them(condition):
    """`given`: the first m scales are the given codes; given the model's own draw, the same generator
    reproduces the whole sample (the KV cache and the accumulated latent see the given codes); given other
    codes, the later scales change."""
    model = make_model("next_scale", condition)
    cond = make_cond(condition, batch=4)
    kw = {"cfg": 2.0, "temperature": 1.0}
    own = model.generate(cond, LAYOUT, torch.Generator().manual_seed(7), **kw)
    other = random_indices(seed=11, batch=4)
    for m in range(1, len(SCALES) + 1):
        again = model.generate(cond, LAYOUT, torch.Generator().manual_seed(7), given=own[:m], **kw)
        assert all(torch.equal(a, b) for a, b in zip(own, again))
        moved = model.generate(cond, LAYOUT, torch.Generator().manual_seed(7), given=other[:m], **kw)
        assert all(torch.equal(a, b) for a, b in zip(moved[:m], other[:m]))
        if m < len(SCALES):
            assert not all(torch.equal(a, b) for a, b in zip(moved[m:], own[m:]))
    with pytest.raises(ValueError, match="given scale 0 has shape"):
        model.generate(cond, LAYOUT, torch.Generator(), given=[other[0][:2]])
    with pytest.raises(ValueError, match="next_scale order"):
        make_model("raster", condition).generate(cond, LAYOUT, torch.Generator(), given=other[:1])


@pytest.mark.parametrize("adaln", [True, False])
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("order", ORDERS)
def test_conditioning_learns(order, condition, adaln):
    """On a fixed tiny batch whose tokens depend only on the condition, the loss falls and the model
    predicts the first token exactly (impossible without reading the condition: two conditions, two tokens)."""
    torch.manual_seed(0)
    model = make_model(order, condition, adaln=adaln).train()
    torch.nn.init.zeros_(model.head.linear.weight)
    indices = random_indices(seed=5, batch=2)
    indices[0] = torch.tensor([3, 11]).view(2, 1, 1)
    indices = [i.repeat(2, 1, 1) for i in indices]  # 4 rows: two copies of each condition's image
    cond = torch.tensor([1, 4, 1, 4]) if condition == "class" else ["red circle", "blue", "red circle", "blue"]
    inputs = LAYOUT.next_scale_inputs(indices) if order == "next_scale" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss, metrics = model.loss(indices, cond, inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    _, metrics = model.loss(indices, cond, inputs)
    assert metrics["acc/scale1"] == 1.0


def test_fully_padded_text_prefix_is_finite():
    """The dropped text condition (every byte padded) gives finite logits, gradients and samples."""
    for order in ORDERS:
        model = make_model(order, "text").train()
        indices = random_indices()
        inputs = LAYOUT.next_scale_inputs(indices) if order == "next_scale" else None
        loss, _ = model.loss(indices, ["", ""], inputs)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.eval()
        tokens = model.generate(["", ""], LAYOUT, torch.Generator().manual_seed(0), cfg=3.0)
        assert all(t.min() >= 0 and t.max() < V for t in tokens)


@pytest.mark.parametrize("condition", CONDITIONS)
def test_cond_drop_uses_the_null_condition(condition):
    model = make_model("next_scale", condition, cond_drop=1.0)
    indices = random_indices()
    cond = model.prepare_condition(make_cond(condition))
    null = model.null_condition(cond)
    expected = logits_of(model.eval(), indices, null)
    torch.testing.assert_close(logits_of(model.train(), indices, cond), expected)


def test_adaln_blocks_start_as_identity_and_old_configs_build_without_them():
    """adaLN-Zero: a fresh model's blocks pass their input through unchanged, whatever the condition; a
    config stored before `ar.adaln` existed (no such key) rebuilds the in-context-only model it describes."""
    from types import SimpleNamespace

    from hybrid.config import load_config, to_dict
    from hybrid.models import build_ar

    torch.manual_seed(0)
    fresh = ARModel(scales=SCALES, codebook_size=V, latent_channels=C, num_classes=NUM_CLASSES, width=32, depth=2,
                    heads=2)
    x = torch.randn(B, sum(s * s for s in SCALES), 32)
    for cls in (torch.tensor([0, 1]), torch.tensor([2, 3])):
        c = fresh._cond_vector(*fresh._embed_condition(fresh.prepare_condition(cls)))
        assert torch.equal(fresh._transformer(x, 0, None, c=c), x)
    layout = SimpleNamespace(scales=SCALES, codebook_size=V, latent_channels=C)
    cfg = to_dict(load_config(overrides=["ar.width=32", "ar.depth=1", "ar.heads=2"]))
    assert build_ar(cfg, layout).adaln
    del cfg["ar"]["adaln"]
    old = build_ar(cfg, layout)
    assert not old.adaln and not hasattr(old.blocks[0], "ada")
    cfg["ar"]["adaln"] = False
    assert not build_ar(cfg, layout).adaln


def test_state_dict_round_trip():
    model = make_model("next_scale", "text")
    clone = make_model("next_scale", "text", seed=1)
    clone.load_state_dict(model.state_dict())
    indices = random_indices()
    torch.testing.assert_close(logits_of(clone, indices, CAPTIONS), logits_of(model, indices, CAPTIONS))


def test_layout_mismatch_and_bad_arguments_are_clear_errors():
    model = make_model("next_scale")
    with pytest.raises(ValueError, match="scales"):
        model.generate(make_cond("class"), ToyLayout(scales=[1, 2, 4]), torch.Generator())
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(make_cond("class"), None, torch.Generator())
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.generate(make_cond("class"), LAYOUT, torch.Generator(), cfg_schedule="cosine")
    with pytest.raises(ValueError, match="scale_inputs"):
        model(random_indices(), make_cond("class"))
    with pytest.raises(ValueError, match="order"):
        ARModel(scales=SCALES, codebook_size=V, latent_channels=C, num_classes=2, order="zigzag")
    with pytest.raises(ValueError, match="bytes"):
        make_model("raster", "text").prepare_condition(["x" * 100])


def test_preallocated_kv_cache_matches_the_growing_one():
    from hybrid.ar.model import PreallocatedKVCache
    from hybrid.nn.blocks import KVCache

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, n, 2, 4, generator=g) for n in (3, 1, 2)]
    grow, pre = KVCache(), PreallocatedKVCache(6)
    for c in chunks:
        a, b = grow.append(c, -c), pre.append(c, -c)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and grow.length == pre.length
    pre.repeat(2)
    assert pre.k.shape == (4, 6, 2, 4) and torch.equal(pre.k[2:], grow.k)
    with pytest.raises(ValueError, match="at most 6"):
        pre.append(chunks[1], chunks[1])
    pre.reset()
    assert pre.length == 0


def test_sampling_helpers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=g)
    best = logits.argmax(-1)
    assert torch.equal(sample_logits(logits, g, top_k=1), best)
    assert torch.equal(sample_logits(logits, g, top_p=1e-6), best)
    assert torch.equal(sample_logits(logits, g, temperature=0), best)
    kept = torch.isfinite(filter_logits(logits, top_k=3)).sum(-1)
    assert (kept == 3).all()
    assert guidance_scale(3.0, "constant", 0, 6) == 3.0
    assert [guidance_scale(3.0, "linear", k, 3) for k in range(3)] == [1.0, 2.0, 3.0]


def test_draw_categorical_follows_the_probabilities_and_never_draws_a_zero():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])  # zeros first, inside and last
    n = 200_000
    draws = draw_categorical(probs.expand(n, -1), g)
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[probs == 0].sum() == 0
    expected = probs.double() * n
    chi2 = ((counts - expected)[probs > 0] ** 2 / expected[probs > 0]).sum()
    assert chi2 < 13.8  # 2 degrees of freedom: p = 0.001
    # unnormalised rows, each with one entry: always that entry (u can never reach the row's total)
    one_hot = torch.eye(6)[torch.randint(0, 6, (1000,), generator=g)] * 7.5
    assert torch.equal(draw_categorical(one_hot, g), one_hot.argmax(-1))
    # the generator alone decides
    a = draw_categorical(probs.expand(50, -1), torch.Generator().manual_seed(3))
    b = draw_categorical(probs.expand(50, -1), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Lightning


class _ImageBatches(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.classes = torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "class_id": int(self.classes[i]), "caption": f"shape number {i}"}


def _toy_config(tmp_path, *overrides):
    from pathlib import Path

    from hybrid.config import load_config, to_dict

    toy = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    return to_dict(load_config(toy, [f"run_dir={tmp_path}", "ar.train.max_steps=2", "ar.train.warmup_steps=1",
                                     *overrides]))


def _trainer(pl, tmp_path, steps=2):
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))


@pytest.mark.parametrize("order,condition", [("next_scale", "class"), ("raster", "text")])
def test_lightning_smoke_run_and_checkpoint_round_trip(tmp_path, order, condition):
    import pytorch_lightning as pl

    from hybrid.lit.ar import ARModule

    config = _toy_config(tmp_path, f"data.num_classes={NUM_CLASSES}", f"ar.order={order}",
                         f"ar.condition={condition}")
    module = ARModule(config, tokenizer_config=config)  # a random tokenizer stands in for a trained one
    trainer = _trainer(pl, tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(_ImageBatches(), batch_size=4))
    assert list((tmp_path / "ar" / "images").glob("*.png")), "previews are written at the end"
    path = tmp_path / "stage.ckpt"
    trainer.save_checkpoint(path)
    loaded = ARModule.load_from_checkpoint(path, map_location="cpu")
    module.eval()
    cond = torch.tensor([0, 3]) if condition == "class" else ["a", "bc"]
    a = loaded.generate(cond, torch.Generator().manual_seed(0))
    b = module.generate(cond, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_token_pool_grows_so_that_no_image_is_drawn_more_than_token_cache_passes_times(tmp_path):
    from hybrid.config import ConfigError, load_config
    from hybrid.lit.ar import token_pool_size

    ar = load_config(None).ar  # the defaults: pool 20,000, at most 4 draws per image
    assert token_pool_size(ar, 1000, 64) == 20000  # the default AR: 64,000 draws fit 4 per image in 20,000
    assert token_pool_size(ar, 6000, 64) == 96000  # a 6000-step AR: grown to 384,000 / 4
    assert token_pool_size(ar, 10, 64) == 640  # never more than the run draws
    fixed = load_config(None, ["ar.token_cache_passes=0"]).ar
    assert token_pool_size(fixed, 6000, 64) == 20000  # 0: the pool stays at token_cache_size
    # max_steps -1 (a time limit only): the draws are unknown; was max(1, -64) = a pool of one image
    assert token_pool_size(ar, -1, 64) == 20000
    with pytest.raises(ConfigError, match="ar.token_cache_passes"):
        load_config(None, ["ar.token_cache_passes=-1"])


def test_token_cache_is_built_once_and_reused(tmp_path, capsys):
    import pytorch_lightning as pl

    from hybrid.lit.ar import TOKEN_CACHE_FILE, ARModule, TokenCacheDataModule

    config = _toy_config(tmp_path, "ar.token_cache=true", "ar.token_cache_size=12", "ar.train.batch_size=4",
                         "data.batches_per_epoch=2", "data.val_size=4")
    module = ARModule(config, tokenizer_config=config)
    dm = module.make_datamodule()
    assert isinstance(dm, TokenCacheDataModule) and dm.pool_size == 8  # max_steps 2 x batch 4 < 12
    _trainer(pl, tmp_path).fit(module, datamodule=dm)
    path = tmp_path / "ar" / TOKEN_CACHE_FILE
    saved = torch.load(path, weights_only=True)
    assert [tuple(i.shape) for i in saved["indices"]] == [(8, s, s) for s in (1, 2, 4)]
    assert len(saved["caption"]) == 8 and saved["class_id"].shape == (8,)
    # the pool holds exactly what the tokenizer makes of those images
    images = dm.pool_images.train_dataloader()
    batch = next(iter(images))
    with torch.no_grad():
        expect = module.tokenizer.encode(batch["image"]).indices
    assert all(torch.equal(e, s[:4].long()) for e, s in zip(expect, saved["indices"]))
    capsys.readouterr()
    again = ARModule(config, tokenizer_config=config)
    again.load_state_dict(module.state_dict())
    again.token_pool(dm.pool_images, 8)
    out = capsys.readouterr().out  # read back, not encoded again
    assert "[ar] token cache: 8 encoded images from " in out and "[ar] token cache: encoded" not in out, out
    good = path.read_bytes()
    for damaged in (b"not a cache\n", good[:len(good) // 2], b""):  # was a KeyError / OSError / EOFError traceback
        path.write_bytes(damaged)
        pool = again.token_pool(dm.pool_images, 8)
        out = capsys.readouterr().out
        assert f"[ar] token cache {path} cannot be read (" in out and "[ar] token cache: encoded 8 images" in out, out
        assert all(torch.equal(p, s) for p, s in zip(pool.indices, saved["indices"]))
        assert path.read_bytes() != damaged and torch.load(path, weights_only=True)["key"] == saved["key"]


def test_token_pool_holds_the_first_images_when_its_size_is_not_a_whole_number_of_batches(tmp_path):
    from hybrid.lit.ar import ARModule

    config = _toy_config(tmp_path, "ar.token_cache=true", "ar.train.batch_size=4", "data.batches_per_epoch=2",
                         "trainer.progress_bar=false")
    module = ARModule(config, tokenizer_config=config)
    dm = module.make_datamodule()
    dm.setup("fit")
    batches = list(dm.images.train_dataloader())  # 2 batches of 4: the same stream the pool reads
    images = torch.cat([b["image"] for b in batches])
    with torch.no_grad():
        expect = module.tokenizer.encode(images).indices
    classes = torch.cat([b["class_id"] for b in batches])
    captions = [c for b in batches for c in b["caption"]]

    pool = module.token_pool(dm.images, 6)  # one batch and half of the next
    assert len(pool) == 6 and all(t.dtype == torch.int16 for t in pool.indices)
    assert all(torch.equal(e[:6], t.long()) for e, t in zip(expect, pool.indices))
    assert torch.equal(pool.class_ids, classes[:6]) and pool.captions == captions[:6]

    short = module.token_pool(dm.images, 11)  # the loader runs out at 8: the pool keeps those 8
    assert len(short) == 8 and [tuple(t.shape) for t in short.indices] == [tuple(e.shape) for e in expect]
    assert all(torch.equal(e, t.long()) for e, t in zip(expect, short.indices))


# ------------------------------------------------------------------------------------------------
# CUDA (xformers through the 'auto' backend)


@pytest.mark.gpu
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("condition", CONDITIONS)
def test_kv_cache_equals_full_forward_on_cuda(order, condition):
    model = make_model(order, condition).cuda()
    layout = ToyLayout()
    layout.codebook = layout.codebook.cuda()
    cond = make_cond(condition)
    cond = cond.cuda() if torch.is_tensor(cond) else cond
    tokens, cached = model.generate(cond, layout, torch.Generator("cuda").manual_seed(0), return_logits=True)
    inputs = layout.next_scale_inputs(tokens) if order == "next_scale" else None
    full = model(tokens, cond, inputs)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    again = model.generate(cond, layout, torch.Generator("cuda").manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(tokens, again))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = model.train().loss(tokens, cond, inputs)
        guided = model.eval().generate(cond, layout, torch.Generator("cuda").manual_seed(0), cfg=2.0)
    loss.backward()
    assert torch.isfinite(loss) and all(t.device.type == "cuda" for t in guided)


def test_ar_efficiency_benchmark_times_fp32_bf16_and_compiled_steps_side_by_side(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "eff.json"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "benchmarks.ar_efficiency", "--out", str(out), "--width", "16", "--depth",
                    "1", "--heads", "2", "--scales", "1", "2", "--codebook", "16", "--channels", "4", "--train-batch",
                    "4", "--train-steps", "2", "--parts", "training", "--device", "cpu", "--compile"],
                   cwd=root, check=True, capture_output=True, text=True)
    training = json.loads(out.read_text())["training"]
    side = training["precision_side_by_side"]
    assert [len(side["times"][k]) for k in ("32-true", "bf16-mixed")] == [2, 2]
    assert side["32-true"] > 0 and side["bf16-mixed"] > 0
    assert side["speedup"] == pytest.approx(side["32-true"] / side["bf16-mixed"])
    compiled = training["compile_side_by_side"]
    assert compiled["precision"] == "bf16-mixed"
    assert [len(compiled["times"][k]) for k in ("compiled", "eager")] == [2, 2]
    assert compiled["speedup"] == pytest.approx(compiled["eager"] / compiled["compiled"])
    assert training["flops_per_step"] > 0


def test_ar_efficiency_benchmark_decode_sampling_and_draw_parts_run_on_a_tiny_model(tmp_path):
    """The README's `python -m benchmarks.ar_efficiency --out FILE` runs every part; the decode part crashed on the
    adaLN AR (the default) because it called the blocks without their condition."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "eff.json"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ar_efficiency", "--out", str(out), "--width", "16",
                           "--depth", "1", "--heads", "2", "--scales", "1", "2", "--codebook", "16", "--channels", "4",
                           "--sample-batch", "2", "--repeats", "2", "--parts", "decode", "sampling", "draw",
                           "--device", "cpu"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["decode"]["batches"]) == {"1", "2"}  # batch 1 and --sample-batch
    for batch in result["decode"]["batches"].values():
        assert batch["full"]["ms_per_token_step"] > 0 and batch["quarter"]["ms_per_token_step"] > 0
    orders = result["sampling"]["orders"]  # scales 1, 2: one forward per scale, or one per token (1 + 4)
    assert orders["next_scale"]["forwards_per_generation"] == 2 and orders["raster"]["forwards_per_generation"] == 5
    assert all(o["images_per_second"] > 0 for o in orders.values())
    assert result["sampling"]["next_scale_speedup"] == pytest.approx(
        orders["next_scale"]["images_per_second"] / orders["raster"]["images_per_second"])
    assert result["draw"]["codebook"] == 16 and all(ms > 0 for ms in result["draw"]["ms"].values())
