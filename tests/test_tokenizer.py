"""Stage 1: the hybrid tokenizer (autoencoder + multi-scale residual quantizer). Toy shapes throughout."""

from __future__ import annotations

import io
import re

import pytest
import torch

from hybrid.tokenizer import (
    Autoencoder,
    HybridTokenizer,
    MultiScaleQuantizer,
    code_counts,
    default_scales,
    usage_stats,
)

TOY = dict(image_size=16, downsample=4, latent_channels=4, channels=[16, 32], codebook_size=64, scales=[1, 2, 4])


def make(**overrides) -> HybridTokenizer:
    torch.manual_seed(0)
    return HybridTokenizer(**{**TOY, **overrides})


def images(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def trained(tok: HybridTokenizer, steps: int = 2) -> HybridTokenizer:
    """A few training updates so the codebook holds data vectors rather than its initial noise."""
    tok.train()
    for i in range(steps):
        tok.training_losses(images(seed=i), discrete=bool(i % 2))
    return tok.eval()


@pytest.mark.parametrize("phi_ratio", [0.0, 0.5])
def test_indices_round_trip_is_exact(phi_ratio):
    tok = trained(make(phi_ratio=phi_ratio))
    with torch.no_grad():
        out = tok.encode(images())
        assert [tuple(i.shape) for i in out.indices] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
        assert all(i.dtype == torch.long and 0 <= int(i.min()) and int(i.max()) < 64 for i in out.indices)
        assert out.z_q.shape == out.z.shape == out.residual.shape == (2, 4, 4, 4)
        torch.testing.assert_close(tok.indices_to_latent(out.indices), out.z_q, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.z_q + out.residual, out.z, rtol=1e-6, atol=1e-6)
        # the first m scales alone (a refiner's coarse input with refiner.coarse_scales=m): each scale's share summed
        shares = [tok.accumulate(None, idx, k) for k, idx in enumerate(out.indices)]
        for m in range(4):
            expected = sum(shares[:m], torch.zeros_like(out.z_q))
            torch.testing.assert_close(tok.latent_from_scales(out.indices[:max(m, 1)], m), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(tok.latent_from_scales(out.indices, 3), out.z_q, rtol=0, atol=1e-6)
        assert shares[2].abs().max() > 0  # so m = 2 and m = 3 differ
        with pytest.raises(ValueError, match="4 scales asked"):
            tok.latent_from_scales(out.indices, 4)
        with pytest.raises(ValueError, match="at least one"):
            tok.latent_from_scales([], 0)


def test_a_token_grid_coarser_than_the_latent_leaves_the_detail_to_the_residual():
    """scales ending below the latent size: the finest codes are upsampled, so z_q cannot hold the
    latent's finest detail; the residual does, and the round trip stays exact."""
    with pytest.raises(ValueError, match="tokenizer.coarse_grid=true"):
        make(scales=[1, 2, 3])
    tok = trained(make(scales=[1, 2, 3], coarse_grid=True))
    with torch.no_grad():
        out = tok.encode(images())
        assert [tuple(i.shape) for i in out.indices] == [(2, 1, 1), (2, 2, 2), (2, 3, 3)]
        assert out.z_q.shape == out.z.shape == (2, 4, 4, 4)
        torch.testing.assert_close(tok.indices_to_latent(out.indices), out.z_q, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.z_q + out.residual, out.z, rtol=1e-6, atol=1e-6)
        assert out.residual.abs().max() > 0


def test_encode_never_touches_the_codebook():
    tok = trained(make())
    before = {k: v.clone() for k, v in tok.quantizer.state_dict().items()}
    tok.train()
    tok.encode(images())
    for k, v in tok.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k
    tok.eval()
    tok.training_losses(images())  # eval mode: statistics only, no update
    for k, v in tok.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_usage_of_a_single_code():
    tok = make()
    tok.quantizer.codebook.zero_()  # every code alike: argmin picks code 0 everywhere
    out = tok.encode(images())
    assert all(int(i.max()) == 0 for i in out.indices)
    stats = usage_stats(code_counts(out.indices, tok.codebook_size))
    for k, s in enumerate(tok.scales):
        assert stats[f"usage/s{k}"].item() == pytest.approx(1 / min(64, 2 * s * s))
        assert stats[f"perplexity/s{k}"].item() == pytest.approx(1.0)
    assert stats["usage_pooled"].item() == pytest.approx(1 / min(64, 2 * (1 + 4 + 16)))
    assert stats["usage_finest"].item() == pytest.approx(1 / 32)


def test_usage_of_distinct_codes():
    counts = torch.zeros(2, 8, dtype=torch.long)
    counts[0, :4] = 1  # 4 positions, 4 codes
    counts[1] = 2  # 16 positions, all 8 codes equally
    stats = usage_stats(counts)
    assert stats["usage/s0"].item() == pytest.approx(1.0)
    assert stats["perplexity/s0"].item() == pytest.approx(4.0)
    assert stats["usage/s1"].item() == pytest.approx(1.0)
    assert stats["perplexity/s1"].item() == pytest.approx(8.0)
    assert stats["usage_pooled"].item() == pytest.approx(1.0)


def test_dead_code_restart_changes_only_dead_codes():
    q = MultiScaleQuantizer(4, 4, [1, 2, 4], codebook_size=16, dead_code_steps=3)
    q.codebook.copy_(torch.randn(16, 4))
    q.code_age.zero_()
    dead = torch.tensor([1, 5, 6, 15])
    q.code_age[dead] = 3
    before = q.codebook.clone()
    pool = torch.randn(40, 4) + 10.0  # far from every live code
    assert q.restart_dead_codes(pool) == 4
    changed = (q.codebook != before).any(1)
    assert changed.nonzero().flatten().tolist() == dead.tolist()
    assert (q.codebook[dead] - 10.0).abs().max() < 6  # drawn from the pool
    assert int(q.code_age.max()) == 0


def test_restarts_keep_the_codebook_in_use():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(4, 8, [1, 2, 4, 8], codebook_size=32, dead_code_steps=2)
    for _ in range(20):
        indices, _ = q(torch.randn(8, 4, 8, 8), update=True)
    stats = usage_stats(code_counts(indices, 32))
    assert stats["usage_pooled"].item() >= 0.9
    assert stats["usage_finest"].item() >= 0.5

def test_restarts_resume_exactly_and_ignore_the_global_rng():
    """A run interrupted after 6 updates and resumed from its state dict (with the global RNG
    reseeded, as a restarted process does) ends with the codebook of an uninterrupted run."""
    batches = [torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(12)]

    def fresh():
        q = MultiScaleQuantizer(4, 8, [1, 2, 4, 8], codebook_size=32, dead_code_steps=2)
        q.seed = 7
        return q

    whole = fresh()
    torch.manual_seed(0)
    for z in batches:
        whole(z, update=True)
    first = fresh()
    torch.manual_seed(0)
    for z in batches[:6]:
        first(z, update=True)
    resumed = fresh()
    resumed.load_state_dict(first.state_dict())
    torch.manual_seed(12345)  # a different global RNG state: must not matter
    for z in batches[6:]:
        resumed(z, update=True)
    assert int(resumed.updates) == 12
    assert torch.equal(resumed.codebook, whole.codebook)
    assert torch.equal(resumed.code_age, whole.code_age)



@pytest.mark.parametrize("downsample,patch_size,latent,shortcut",
                         [(4, 1, 4, True), (8, 1, 2, False), (4, 2, 4, True), (8, 4, 2, True), (8, 2, 2, False)])
def test_autoencoder_shapes(downsample, patch_size, latent, shortcut):
    ae = Autoencoder(downsample=downsample, latent_channels=4, channels=[16, 32], patch_size=patch_size,
                     shortcut=shortcut)
    x = images()
    z = ae.encode(x)
    assert z.shape == (2, 4, latent, latent)
    assert ae.decode(z).shape == x.shape


def test_shortcut_autoencoder_starts_as_downsample_plus_bicubic():
    import torch.nn.functional as F

    ae = Autoencoder(downsample=4, latent_channels=4, channels=[16, 32], patch_size=2)
    x = images()
    with torch.no_grad():
        z = ae.encode(x)
        torch.testing.assert_close(z[:, :3], F.interpolate(x, size=(4, 4), mode="area"))
        assert torch.equal(z[:, 3:], torch.zeros_like(z[:, 3:]))
        up = F.interpolate(z[:, :3], size=(16, 16), mode="bicubic", align_corners=False)
        torch.testing.assert_close(ae.decode(z), up)


def test_without_shortcut_the_latent_has_unit_rms():
    ae = Autoencoder(downsample=4, latent_channels=4, channels=[16, 32], shortcut=False)
    with torch.no_grad():
        z = ae.encode(images())
    torch.testing.assert_close(z.pow(2).mean((1, 2, 3)), torch.ones(2), rtol=1e-4, atol=1e-4)


def test_channel_levels_are_checked():
    with pytest.raises(ValueError, match="tokenizer.channels"):
        Autoencoder(downsample=4, channels=[16, 32, 32, 32])
    with pytest.raises(ValueError, match="tokenizer.scales must not exceed the latent size 4"):
        make(scales=[1, 2, 8])
    with pytest.raises(ValueError, match="tokenizer.scales must be strictly increasing"):
        make(scales=[1, 4, 2])
    with pytest.raises(ValueError, match="tokenizer.loss"):
        make(loss="l3")


def test_state_dict_round_trip():
    tok = trained(make(phi_ratio=0.5))
    tok.measure_residual_std([images(seed=5)])
    buf = io.BytesIO()
    torch.save(tok.state_dict(), buf)
    buf.seek(0)
    other = make(phi_ratio=0.5)
    other.load_state_dict(torch.load(buf, weights_only=True))
    other.eval()
    x = images(seed=3)
    with torch.no_grad():
        a, b = tok.encode(x), other.encode(x)
        assert all(torch.equal(i, j) for i, j in zip(a.indices, b.indices))
        assert torch.equal(a.z_q, b.z_q) and torch.equal(a.residual, b.residual)
        assert torch.equal(tok.decode(a.z), other.decode(b.z))
    assert torch.equal(tok.residual_std, other.residual_std)


@pytest.mark.parametrize("discrete", [False, True])
def test_training_losses_give_finite_gradients(discrete):
    tok = make(phi_ratio=0.5).train()
    out = tok.training_losses(images(), discrete=discrete)
    for key in ("loss", "recon", "commit", "quant", "psnr", "usage_pooled", "usage_finest", "usage/s0",
                "perplexity/s2"):
        assert torch.isfinite(out[key]), key
    out["loss"].backward()
    grads = {n: p.grad for n, p in tok.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items()
                                                                                      if g is None]
    # straight-through: the decoder's loss reaches the encoder in both modes
    assert grads["autoencoder.encoder.conv_out.weight"].abs().sum() > 0
    assert out["discrete"].item() == float(discrete)


@pytest.mark.parametrize("straight_through", [True, False])
def test_straight_through_decides_whether_a_z_q_batch_trains_the_encoder(straight_through):
    tok = make(commitment=0.0, straight_through=straight_through).train()
    out = tok.training_losses(images(), discrete=True)
    out["loss"].backward()
    encoder = tok.autoencoder.encoder.conv_out.weight.grad
    decoder = tok.autoencoder.decoder.conv_out.weight.grad
    assert decoder is not None and decoder.abs().sum() > 0  # the decoder learns to decode z_q either way
    if straight_through:
        assert encoder is not None and encoder.abs().sum() > 0
    else:
        assert encoder is None or encoder.abs().sum() == 0
    # a z batch trains the encoder whatever the setting
    tok.zero_grad()
    tok.training_losses(images(), discrete=False)["loss"].backward()
    assert tok.autoencoder.encoder.conv_out.weight.grad.abs().sum() > 0


def test_discrete_draw_follows_the_generator():
    tok = make(discrete_prob=0.5).eval()
    x = images()

    def draws(seeds):
        with torch.no_grad():
            return [tok.training_losses(x, generator=torch.Generator().manual_seed(s))["discrete"].item()
                    for s in seeds]

    expected = [float(torch.rand((), generator=torch.Generator().manual_seed(s)) < 0.5) for s in range(4)]
    assert draws(range(4)) == expected
    tok.discrete_prob = 1.0
    assert draws([0]) == [1.0]


def test_next_scale_inputs_match_step_by_step_accumulation():
    tok = trained(make(scales=[1, 2, 3, 4]))
    with torch.no_grad():
        out = tok.encode(images())
        inputs = tok.next_scale_inputs(out.indices)
        assert [tuple(t.shape) for t in inputs] == [(2, 4, 2, 2), (2, 4, 3, 3), (2, 4, 4, 4)]
        z_acc = None
        for k in range(1, len(tok.scales)):
            z_acc = tok.accumulate(z_acc, out.indices[k - 1], k - 1)
            torch.testing.assert_close(inputs[k - 1], tok.downsample(z_acc, tok.scales[k]), rtol=0, atol=0)
        z_acc = tok.accumulate(z_acc, out.indices[-1], len(tok.scales) - 1)
        torch.testing.assert_close(z_acc, out.z_q, rtol=0, atol=0)
    assert tok.tokens_per_scale == [1, 4, 9, 16] and tok.seq_len == 30
    assert tok.downsample(out.z, 4) is out.z
    with pytest.raises(ValueError, match="scale 1"):
        tok.accumulate(None, out.indices[0], 1)


def test_lookup_and_corrupt_indices():
    tok = trained(make())
    out = tok.encode(images())
    codes = tok.lookup(out.indices[1])
    assert codes.shape == (2, 4, 2, 2)
    torch.testing.assert_close(codes[:, :, 0, 1], tok.quantizer.codebook[out.indices[1][:, 0, 1]])
    same = tok.corrupt_indices(out.indices, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(same, out.indices))
    a = tok.corrupt_indices(out.indices, 0.5, torch.Generator().manual_seed(1))
    b = tok.corrupt_indices(out.indices, 0.5, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) and x.shape == y.shape for x, y in zip(a, b))
    assert all(0 <= int(x.min()) and int(x.max()) < tok.codebook_size for x in a)
    big = [torch.zeros(4, 16, 16, dtype=torch.long)]
    hit = (tok.corrupt_indices(big, 1.0, torch.Generator().manual_seed(0))[0] != 0).float().mean()
    assert hit > 0.9  # nearly every index replaced (a random code may be 0 again)
    # near misses: every replaced code is one of the 3 codes nearest to the true one, never itself
    cb = tok.quantizer.codebook
    near = torch.cdist(cb, cb).fill_diagonal_(float("inf")).topk(3, largest=False).indices  # (K, 3)
    true = [torch.randint(tok.codebook_size, (4, 8, 8), generator=torch.Generator().manual_seed(2))]
    swapped = tok.corrupt_indices(true, 1.0, torch.Generator().manual_seed(0), neighbors=3)[0]
    assert (swapped != true[0]).all()
    assert (swapped[..., None] == near[true[0]]).any(-1).all()


def test_decode_of_continuous_latent_is_the_autoencoder_path():
    tok = trained(make())
    x = images()
    with torch.no_grad():
        out = tok.encode(x)
        direct = tok.autoencoder.decode(tok.autoencoder.encode(x))
        torch.testing.assert_close(tok.decode(out.z), direct)
        torch.testing.assert_close(tok.decode(out.z_q + out.residual), direct, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tok.reconstruct(x), direct)


def test_measure_residual_std():
    tok = trained(make())
    batches = [{"image": images(seed=s)} for s in range(3)]
    stats = tok.measure_residual_std(batches)
    zs = torch.cat([tok.encode(b["image"]).z for b in batches])
    rs = torch.cat([tok.encode(b["image"]).residual for b in batches])
    torch.testing.assert_close(tok.latent_std, zs.transpose(0, 1).reshape(4, -1).std(1, correction=0))
    torch.testing.assert_close(tok.residual_std, rs.transpose(0, 1).reshape(4, -1).std(1, correction=0))
    assert stats["residual_std"].shape == (4,) and "residual_std" in tok.state_dict()


def test_from_config():
    from hybrid.config import TokenizerConfig

    cfg = TokenizerConfig(channels=[16, 32], codebook_size=64, scales=[1, 2, 4])
    tok = HybridTokenizer.from_config(cfg, image_size=16)
    assert tok.scales == [1, 2, 4] and tok.codebook_size == 64 and tok.latent_size == 4
    assert tok.latent_channels == cfg.latent_channels


def test_default_scales():
    assert default_scales(8) == [1, 2, 3, 4, 6, 8]
    assert default_scales(4) == [1, 2, 3, 4]
    assert default_scales(16)[-1] == 16 and default_scales(1) == [1]


def _tiny_vae_folder(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=4, sample_size=16, scaling_factor=0.5,
    )
    vae.save_pretrained(path)
    return vae


def test_pretrained_autoencoder_from_a_local_folder(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from hybrid.tokenizer import HybridAttnProcessor

    vae = _tiny_vae_folder(tmp_path / "vae").eval()
    tok = HybridTokenizer(image_size=16, pretrained=str(tmp_path / "vae"), codebook_size=64)
    assert tok.latent_size == 4 and tok.scales == [1, 2, 3, 4] and tok.latent_channels == 4
    assert all(isinstance(p, HybridAttnProcessor) for p in tok.autoencoder.vae.attn_processors.values())
    x = images()
    with torch.no_grad():
        out = tok.encode(x)
        torch.testing.assert_close(out.z, vae.encode(x).latent_dist.mean * 0.5, rtol=1e-4, atol=1e-5)
        vae.set_attn_processor(AttnProcessor2_0())  # our attention processor == diffusers' SDPA one
        torch.testing.assert_close(tok.decode(out.z), vae.decode(out.z / 0.5).sample, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tok.indices_to_latent(out.indices), out.z_q, rtol=0, atol=1e-6)
    trainable = [n for n, p in tok.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("quantizer.phi") for n in trainable)
    tok.train()
    assert not tok.autoencoder.vae.training  # frozen model stays in eval mode
    losses = tok.training_losses(x)
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in tok.parameters() if p.requires_grad)


def test_a_folder_whose_weights_are_not_an_autoencoder_kl_is_refused_naming_it(tmp_path):
    """Without `accelerate` diffusers fills weights it does not find at random and only logs it: another model
    class's folder or a partial weights file built a frozen autoencoder of noise (found by a review)."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file, save_file

    UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(
        tmp_path / "unet")
    with pytest.raises(ValueError, match=rf"tokenizer.pretrained: '{re.escape(str(tmp_path / 'unet'))}' holds a "
                                         r"diffusers UNet2DModel, not an AutoencoderKL"):
        HybridTokenizer(image_size=16, pretrained=str(tmp_path / "unet"), codebook_size=64)
    _tiny_vae_folder(tmp_path / "partial")
    weights = tmp_path / "partial" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("decoder.")}, weights)
    with pytest.raises(ValueError, match=r"'.*partial': its weights do not fit its config.json \(\d+ missing keys: "
                                         r"decoder\."):
        HybridTokenizer(image_size=16, pretrained=str(tmp_path / "partial"), codebook_size=64)
    _tiny_vae_folder(tmp_path / "pipeline" / "vae")  # a whole pipeline's folder: the hint names its vae/
    with pytest.raises(ValueError, match=rf"a whole pipeline: .*pretrained={re.escape(str(tmp_path))}/pipeline/vae"):
        HybridTokenizer(image_size=16, pretrained=str(tmp_path / "pipeline"), codebook_size=64)
    vae = _tiny_vae_folder(tmp_path / "half")
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        (tmp_path / "half" / name).unlink()
    vae.save_pretrained(tmp_path / "half", variant="fp16")  # only diffusion_pytorch_model.fp16.safetensors
    tok = HybridTokenizer(image_size=16, pretrained=str(tmp_path / "half"), codebook_size=64)
    assert torch.equal(tok.autoencoder.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)


def test_pretrained_autoencoder_rebuilds_from_its_stored_config_without_the_folder(tmp_path):
    """`pretrained_config` (what a checkpoint or an export stores) rebuilds the AutoencoderKL's architecture;
    the state dict brings the weights; the folder is not read."""
    import json
    import shutil

    _tiny_vae_folder(tmp_path / "vae")
    tok = HybridTokenizer(image_size=16, pretrained=str(tmp_path / "vae"), codebook_size=64).eval()
    stored = json.loads(json.dumps(tok.pretrained_config))  # plain JSON, as in pipeline.json
    assert stored["block_out_channels"] == [8, 16, 16] and str(tmp_path) not in json.dumps(stored)
    shutil.rmtree(tmp_path / "vae")
    rebuilt = HybridTokenizer(image_size=16, pretrained=str(tmp_path / "vae"), codebook_size=64,
                              pretrained_config=stored).eval()
    rebuilt.load_state_dict(tok.state_dict())
    assert rebuilt.pretrained_config == stored and rebuilt.quantizer.phi is not None
    x = images()
    with torch.no_grad():
        out = tok.encode(x)
        assert torch.equal(rebuilt.encode(x).z, out.z)
        assert torch.equal(rebuilt.decode(out.z_q), tok.decode(out.z_q))


def test_standardize_round_trip_uses_mean_and_std():
    from hybrid.tokenizer import HybridTokenizer

    tok = HybridTokenizer(image_size=16, downsample=4, channels=[16, 32], scales=[1, 2, 4], codebook_size=16)
    tok.latent_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    tok.latent_std.copy_(torch.tensor([2.0, 0.5, 1.0, 4.0]))
    z = torch.randn(2, 4, 4, 4)
    x = tok.standardize(z)
    torch.testing.assert_close(x, (z - tok.latent_mean[None, :, None, None]) / tok.latent_std[None, :, None, None])
    torch.testing.assert_close(x[:, 3], (z[:, 3] - 2.0) / 4.0)
    torch.testing.assert_close(tok.unstandardize(x), z)


def test_lightning_fit_and_load_from_checkpoint_alone(tmp_path):
    """A toy tokenizer stage through train.py's code; its final.ckpt alone (no config file beside it)
    rebuilds the same tokenizer with `load_from_checkpoint`."""
    from pathlib import Path

    from hybrid.experiment import main
    from hybrid.lit.tokenizer import TokenizerModule

    toy = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    run = tmp_path / "run"
    assert main(["--config", str(toy), f"run_dir={run}", "stage=tokenizer", "trainer.progress_bar=false",
                 "trainer.accelerator=cpu", "tokenizer.train.max_steps=4", "tokenizer.train.batch_size=4",
                 "data.val_size=8"]) == 0
    alone = tmp_path / "alone" / "tokenizer.ckpt"
    alone.parent.mkdir()
    (run / "tokenizer" / "final.ckpt").rename(alone)
    loaded = TokenizerModule.load_from_checkpoint(alone, map_location="cpu", weights_only=True).tokenizer.eval()
    assert int(loaded.quantizer.updates) == 4  # trained weights and buffers, not a fresh model
    x = images()
    out = loaded.encode(x)
    assert torch.equal(loaded.indices_to_latent(out.indices), out.z_q)
    assert not torch.equal(loaded.residual_std, torch.ones_like(loaded.residual_std))  # measured at the end


def test_statistics_come_from_training_shards_without_validation_shards(tmp_path, capsys):
    """data.source=shards with no val-*.tar: the latent/residual statistics are measured on training batches
    (left at 0/1, the refiner and the diffusion baseline would train on unscaled targets)."""
    from pathlib import Path

    from hybrid.data.shards import write_procedural
    from hybrid.experiment import main
    from hybrid.lit.tokenizer import TokenizerModule

    write_procedural(tmp_path / "shards", count=16, image_size=16, per_shard=8, progress=False)  # train only
    toy = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="no validation data"):
        assert main(["--config", str(toy), f"run_dir={run}", "stage=tokenizer", "trainer.progress_bar=false",
                     "trainer.accelerator=cpu", "tokenizer.train.max_steps=2", "tokenizer.train.batch_size=4",
                     "data.source=shards", f"data.shards={tmp_path / 'shards' / 'train-*.tar'}",
                     "data.batches_per_epoch=2"]) == 0
    assert "no validation data: measuring the latent and residual statistics on 2 training batches" in \
        capsys.readouterr().out
    tok = TokenizerModule.load_from_checkpoint(run / "tokenizer" / "final.ckpt", map_location="cpu",
                                               weights_only=True).tokenizer
    for name in ("latent_mean", "latent_std", "residual_std"):
        default = torch.zeros(4) if name == "latent_mean" else torch.ones(4)
        assert not torch.equal(getattr(tok, name), default), name


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A toy run whose tokenizer quantizes a tiny AutoencoderKL folder (tokenizer.pretrained), with 2 AR steps
    and an export; afterwards the folder is moved away, as on another machine. Holds what the run gave while
    the folder was there."""
    from pathlib import Path
    from types import SimpleNamespace

    from hybrid.experiment import main
    from hybrid.pipeline import HybridPipeline

    base = tmp_path_factory.mktemp("pretrained")
    vae = _tiny_vae_folder(base / "vae")
    run = base / "run"
    toy = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    common = ["--config", str(toy), f"run_dir={run}", "trainer.progress_bar=false", "trainer.accelerator=cpu",
              "data.val_size=8", f"tokenizer.pretrained={base / 'vae'}"]
    assert main([*common, "stage=tokenizer", "tokenizer.train.max_steps=2", "tokenizer.train.batch_size=4"]) == 0
    assert main([*common, "stage=ar", "ar.train.max_steps=2", "ar.train.batch_size=4", "ar.token_cache=false"]) == 0
    pipe = HybridPipeline.from_run(run)
    x = images()
    with torch.no_grad():
        recon = pipe.tokenizer.decode(pipe.tokenizer.encode(x).z_q)
        generated = pipe(classes=[0, 1], mode="ar", seed=0)
    export = pipe.save_pretrained(base / "export")
    (base / "vae").rename(base / "vae-moved")
    return SimpleNamespace(base=base, run=run, export=export, folder=base / "vae", moved=base / "vae-moved",
                           vae=vae, images=x, recon=recon, generated=generated)


def _decodes(tokenizer, x):
    with torch.no_grad():
        return tokenizer.decode(tokenizer.encode(x).z_q)


def test_a_pretrained_run_loads_and_exports_without_its_autoencoder_folder(pretrained_run, tmp_path):
    """Checkpoints and exports carry the AutoencoderKL's architecture and weights: with the folder gone every
    way of loading them gives the same decodes and images as before, and sample.py runs on the export."""
    from hybrid.lit.ar import ARModule
    from hybrid.lit.base import load_tokenizer
    from hybrid.lit.tokenizer import TokenizerModule
    from hybrid.pipeline import HybridPipeline
    from hybrid.sample_cli import main as sample_main

    r = pretrained_run
    assert not r.folder.exists()
    tokenizer_ckpt = r.run / "tokenizer" / "final.ckpt"
    pipe = HybridPipeline.from_run(r.run)
    frozen = pipe.tokenizer.autoencoder.vae.state_dict()
    assert all(torch.equal(frozen[k], v) for k, v in r.vae.state_dict().items())  # the folder's weights
    assert torch.equal(_decodes(pipe.tokenizer, r.images), r.recon)
    assert torch.equal(pipe(classes=[0, 1], mode="ar", seed=0), r.generated)
    for loaded in (HybridPipeline.from_pretrained(r.export),  # exported while the folder was there
                   HybridPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "export"))):  # and without it
        assert torch.equal(_decodes(loaded.tokenizer, r.images), r.recon)
        assert torch.equal(loaded(classes=[0, 1], mode="ar", seed=0), r.generated)
    assert torch.equal(_decodes(HybridPipeline.from_checkpoints(tokenizer_ckpt).tokenizer, r.images), r.recon)
    assert torch.equal(_decodes(load_tokenizer(tokenizer_ckpt)[0], r.images), r.recon)  # what later stages read
    module = TokenizerModule.load_from_checkpoint(tokenizer_ckpt, map_location="cpu", weights_only=True)
    assert torch.equal(_decodes(module.tokenizer.eval(), r.images), r.recon)
    ar = ARModule.load_from_checkpoint(r.run / "ar" / "final.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(_decodes(ar.tokenizer, r.images), r.recon)
    assert sample_main(["--export", str(r.export), "--class", "0", "-n", "1", "--mode", "ar",
                        "--out", str(tmp_path / "samples")]) == 0


def _without_pretrained_config(config: dict, folder) -> dict:
    """A tokenizer config as stored before checkpoints carried the AutoencoderKL's architecture."""
    tokenizer = {k: v for k, v in config["tokenizer"].items() if k != "pretrained_config"}
    return {**config, "tokenizer": {**tokenizer, "pretrained": str(folder)}}


def test_an_old_pretrained_checkpoint_needs_its_folder_and_names_it_when_missing(pretrained_run, tmp_path, capsys):
    """A checkpoint or export from before the architecture was stored rebuilds the AutoencoderKL from the
    folder: it loads where the folder is, and where it is not the error is one line naming the folder and
    the file, for sample.py too (it was an uncaught FileNotFoundError)."""
    import json
    import shutil

    from hybrid.checkpoints import CheckpointError
    from hybrid.pipeline import HybridPipeline
    from hybrid.sample_cli import main as sample_main

    r = pretrained_run

    def old_run(folder):
        run = tmp_path / f"old-{folder.name}"
        for stage in ("tokenizer", "ar"):
            (run / stage).mkdir(parents=True)
            ckpt = torch.load(r.run / stage / "final.ckpt", map_location="cpu", weights_only=True)
            hparams = ckpt["hyper_parameters"]
            for key in ("config", "tokenizer_config"):
                if key in hparams:
                    hparams[key] = _without_pretrained_config(hparams[key], folder)
            torch.save(ckpt, run / stage / "final.ckpt")
        return run

    assert torch.equal(HybridPipeline.from_run(old_run(r.moved))(classes=[0, 1], mode="ar", seed=0), r.generated)
    run = old_run(r.folder)
    ckpt = run / "tokenizer" / "final.ckpt"
    with pytest.raises(CheckpointError) as info:
        HybridPipeline.from_run(run)
    message = str(info.value)
    assert str(r.folder) in message and str(ckpt) in message and "\n" not in message
    assert sample_main(["--run", str(run), "--class", "0", "-n", "1", "--out", str(tmp_path / "samples")]) == 2
    err = capsys.readouterr().err
    assert str(r.folder) in err and str(ckpt) in err and "Traceback" not in err

    export = tmp_path / "old-export"
    shutil.copytree(r.export, export)
    manifest = json.loads((export / "pipeline.json").read_text())
    tokenizer = manifest["stages"]["tokenizer"]
    tokenizer["config"] = _without_pretrained_config(tokenizer["config"], r.folder)
    (export / "pipeline.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as info:
        HybridPipeline.from_pretrained(export)
    message = str(info.value)
    assert str(r.folder) in message and str(export / "pipeline.json") in message and "\n" not in message
