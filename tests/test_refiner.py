"""Stage 3: the denoiser (dit | mlp, refiner | baseline) and the diffusers trainer x sampler wrapper.

Toy shapes: latents 4 channels x 4x4, width 32, depth 2, 1-8 steps.
"""

import pytest
import torch
from torch import nn

from hybrid.nn.embeddings import encode_text
from hybrid.refiner import Denoiser, Diffusion, build_denoiser, refiner_compose, refiner_target

C, S, B, NUM_CLASSES = 4, 4, 2, 3
PAIRS = [("ddpm", "ddim"), ("ddpm", "dpm"), ("flow", "euler"), ("flow", "dpm")]


def make(arch="dit", coarse=True, condition="class", **kw):
    torch.manual_seed(0)
    return Denoiser(latent_channels=C, latent_size=S, coarse=coarse, arch=arch, width=32, depth=2, heads=2,
                    condition=condition, num_classes=NUM_CLASSES, max_text_len=16, **kw)


def wake(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Gives the zero-initialised (adaLN-Zero, final) layers random weights, so every parameter matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(coarse=True, condition="class", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, S, S, generator=g)
    z_q = torch.randn(B, C, S, S, generator=g) if coarse else None
    cond = {"none": None, "class": torch.tensor([0, 2]), "text": encode_text(["red", "a blue circle"], 16)}[condition]
    return x, z_q, cond


@pytest.mark.parametrize("arch", ["dit", "mlp"])
@pytest.mark.parametrize("coarse", [True, False])
def test_denoiser_shapes_zero_init_and_gradients(arch, coarse):
    model = make(arch, coarse)
    x, z_q, cond = inputs(coarse)
    t = torch.tensor([0, 999])
    out = model(x, t, z_q, cond)
    assert out.shape == (B, C, S, S)
    assert torch.equal(out, torch.zeros_like(out)), "adaLN-Zero: a fresh denoiser outputs exactly zero"

    wake(model)
    out = model(x, t.float(), z_q, cond)
    assert out.abs().sum() > 0
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("class_embed"):  # only the rows of the classes in the batch
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("arch", ["dit", "mlp"])
def test_text_condition_and_null(arch):
    model = wake(make(arch, condition="text"))
    x, z_q, cond = inputs(condition="text")
    t = torch.tensor([10, 500])
    out = model(x, t, z_q, cond)
    assert out.shape == (B, C, S, S) and torch.isfinite(out).all()
    null = model.null_condition(cond)
    assert not null[1].any()
    assert not torch.allclose(model(x, t, z_q, null), out)
    dropped = model.drop_condition(cond, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(model(x, t, z_q, dropped), model(x, t, z_q, null))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.text_encoder.parameters() if p.grad is not None)


def test_denoiser_errors_name_the_problem():
    refiner, baseline = make(coarse=True), make(coarse=False)
    x, z_q, cond = inputs()
    with pytest.raises(ValueError, match="pass z_q"):
        refiner(x, torch.tensor([1, 2]), None, cond)
    with pytest.raises(ValueError, match="must be None"):
        baseline(x, torch.tensor([1, 2]), z_q, cond)
    with pytest.raises(ValueError, match="pass cond"):
        refiner(x, torch.tensor([1, 2]), z_q, None)
    with pytest.raises(ValueError, match="arch"):
        make(arch="unet")
    with pytest.raises(ValueError, match="does not sample"):
        Diffusion("flow", sampler="ddim")


@pytest.mark.parametrize("objective,sampler", PAIRS)
def test_trainer_sampler_pair_trains_and_samples(objective, sampler):
    model = make()
    diffusion = Diffusion(objective, sampler=sampler)
    x0, z_q, cond = inputs()
    loss, buckets = diffusion.loss(model, x0, z_q, cond, torch.Generator().manual_seed(0), cond_drop=0.5)
    assert torch.isfinite(loss) and buckets and all(torch.isfinite(v) for v in buckets.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    wake(model)
    for steps in (1, 4):
        out = diffusion.sample(model, x0.shape, z_q, cond, steps, torch.Generator().manual_seed(0), cfg=2.0)
        assert out.shape == x0.shape and torch.isfinite(out).all(), (objective, sampler, steps)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon", "sample"])
def test_one_step_schedule_never_starts_at_zero(prediction):
    for objective, sampler in PAIRS:
        diffusion = Diffusion(objective, prediction, sampler=sampler)
        for steps in (1, 2, 4, 8):
            first = diffusion.timesteps(steps)[0]
            assert diffusion.noise_level(first[None]).item() >= 0.99, (objective, sampler, steps, first)


class ExactModel(nn.Module):
    """The exact denoiser of the point mass x0 = `value`: returns the true target for any x_t."""

    def __init__(self, diffusion: Diffusion, value: torch.Tensor) -> None:
        super().__init__()
        self.d, self.value = diffusion, value
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, z_q=None, cond=None):
        c = self.value
        if self.d.objective == "flow":
            sigma = (t.float() / self.d.num_train_timesteps)[:, None, None, None]
            noise = (x_t - (1 - sigma) * c) / sigma
            return noise - c
        a = self.d.train_scheduler.alphas_cumprod[t.long().cpu()][:, None, None, None]
        noise = (x_t - a.sqrt() * c) / (1 - a).sqrt()
        return {"v_prediction": a.sqrt() * noise - (1 - a).sqrt() * c, "epsilon": noise,
                "sample": c.expand_as(x_t)}[self.d.prediction]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_takes_steps_of_equal_work(shift):
    """diffusers' own flow Euler spacing made the last of N steps go from sigma 0.001 to 0 (N steps = N - 1
    steps of work; 2 steps gave the 1-step result): every step now spans an equal share before the shift."""
    d = Diffusion(objective="flow", sampler="euler", flow_shift=shift)
    for steps in (1, 2, 4, 8):
        sigmas = d.ready_sampler(steps).sigmas.double()
        assert len(sigmas) == steps + 1 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
        unshifted = sigmas / (shift - (shift - 1) * sigmas)  # inverse of s -> shift s / (1 + (shift - 1) s)
        torch.testing.assert_close(unshifted, torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), atol=1e-5,
                                   rtol=0)
    model = wake(make())
    x, z_q, cond = inputs()
    one, two = (d.sample(model, tuple(x.shape), z_q, cond, n, torch.Generator().manual_seed(0)) for n in (1, 2))
    assert not torch.allclose(one, two, atol=1e-4)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon", "sample"])
def test_every_step_count_lands_on_an_exact_models_target(prediction):
    """1..8 steps with the exact model reach x0: the scheduler settings (zero SNR, trailing spacing,
    DPM's final sigma) are right. DDIM with 6 or 7 steps stops at t=0 (noise std ~0.01): a diffusers quirk."""
    value = torch.full((1, C, S, S), 0.7)
    for objective, sampler in PAIRS:
        if objective == "flow" and prediction != "v_prediction":
            continue
        diffusion = Diffusion(objective, prediction, sampler=sampler)
        model = ExactModel(diffusion, value)
        for steps in range(1, 9):
            out = diffusion.sample(model, (B, C, S, S), steps=steps, generator=torch.Generator().manual_seed(steps))
            tol = 0.06 if (sampler == "ddim" and 1000 % steps) else 0.01
            err = (out - value).abs().max().item()
            assert err < tol, (objective, sampler, prediction, steps, err)


@pytest.mark.parametrize("objective,sampler", [("ddpm", "ddim"), ("flow", "dpm")])
def test_sampling_is_deterministic_per_generator(objective, sampler):
    model = wake(make())
    diffusion = Diffusion(objective, sampler=sampler)
    _, z_q, cond = inputs()
    shape = (B, C, S, S)

    def sample(seed):
        return diffusion.sample(model, shape, z_q, cond, 4, torch.Generator().manual_seed(seed), cfg=1.5)

    assert torch.equal(sample(0), sample(0))
    assert not torch.allclose(sample(0), sample(1))
    x0 = torch.randn(shape)
    l1, _ = diffusion.loss(model, x0, z_q, cond, torch.Generator().manual_seed(3), cond_drop=0.5)
    l2, _ = diffusion.loss(model, x0, z_q, cond, torch.Generator().manual_seed(3), cond_drop=0.5)
    assert torch.equal(l1, l2)


def test_guidance_runs_cond_and_null_in_one_batch():
    model = wake(make(), std=0.2)
    diffusion = Diffusion("ddpm")
    _, z_q, cond = inputs()
    shape = (B, C, S, S)

    def sample(c, cfg):
        return diffusion.sample(model, shape, z_q, c, 2, torch.Generator().manual_seed(0), cfg=cfg)

    # cfg = 0 keeps only the null branch: it equals unguided sampling with the null condition.
    torch.testing.assert_close(sample(cond, 0.0), sample(model.null_condition(cond), 1.0))
    assert not torch.allclose(sample(cond, 3.0), sample(cond, 1.0))
    assert torch.equal(sample(cond, None), sample(cond, 1.0))  # None (a setting left unset) is unguided


@pytest.mark.parametrize("arch", ["dit", "mlp"])
def test_state_dict_round_trip(arch):
    model = wake(make(arch, condition="text"))
    x, z_q, cond = inputs(condition="text")
    t = torch.tensor([5, 700])
    clone = make(arch, condition="text")
    clone.load_state_dict(model.state_dict())
    assert torch.equal(model(x, t, z_q, cond), clone(x, t, z_q, cond))


@pytest.mark.parametrize("arch", ["dit", "mlp"])
def test_coarse_input_is_standardised_with_saved_statistics(arch):
    """z_q enters as (z_q - mean) / std: a refiner with statistics (m, s) given z_q equals one with the
    identity given (z_q - m) / s; the statistics travel in the state dict, and a state dict from before
    they existed loads as the identity (what such a checkpoint was trained with)."""
    model = wake(make(arch))
    x, z_q, cond = inputs()
    t = torch.tensor([5, 700])
    mean, std = torch.tensor([0.1, -0.2, 0.0, 0.3]), torch.tensor([0.05, 0.09, 1.0, 2.0])
    plain = model(x, t, (z_q - mean[None, :, None, None]) / std[None, :, None, None], cond)
    model.set_coarse_stats(mean, std)
    out = model(x, t, z_q, cond)
    torch.testing.assert_close(out, plain)
    assert not torch.allclose(out, model(x, t, z_q * 2, cond))  # the coarse input still matters
    clone = make(arch)
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone(x, t, z_q, cond), out)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("coarse_")}
    clone.load_state_dict(old)
    assert torch.equal(clone.coarse_mean, torch.zeros(C)) and torch.equal(clone.coarse_std, torch.ones(C))
    with pytest.raises(ValueError, match="std"):
        model.set_coarse_stats(mean, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="channels"):
        model.set_coarse_stats(mean[:2], std[:2])
    with pytest.raises(ValueError, match="coarse"):
        make(arch, coarse=False).set_coarse_stats(mean, std)
    assert "coarse_mean" not in make(arch, coarse=False).state_dict()


def test_build_denoiser_takes_the_tokenizer_statistics():
    from types import SimpleNamespace

    from hybrid.config import load_config
    from hybrid.models import build_denoiser as build_for_stage

    cfg = load_config(overrides=["refiner.width=32", "refiner.depth=1", "diffusion.width=32", "diffusion.depth=1"])
    tok = SimpleNamespace(latent_channels=C, latent_size=S, latent_mean=torch.tensor([0.1, 0.2, 0.3, 0.4]),
                          latent_std=torch.tensor([0.05, 0.06, 0.07, 0.0]))
    refiner = build_for_stage(cfg, "refiner", tok)
    torch.testing.assert_close(refiner.coarse_mean, tok.latent_mean)
    torch.testing.assert_close(refiner.coarse_std, torch.tensor([0.05, 0.06, 0.07, 1e-4]))  # a dead channel is floored
    assert not hasattr(build_for_stage(cfg, "diffusion", tok), "coarse_mean")


def test_coarse_scales_beyond_the_tokenizer_name_the_key():
    from types import SimpleNamespace

    from hybrid.config import load_config
    from hybrid.models import build_denoiser as build_for_stage
    from hybrid.models import refiner_target_std

    tok = SimpleNamespace(latent_channels=C, latent_size=S, latent_mean=torch.zeros(C), latent_std=torch.ones(C),
                          residual_std=torch.full((C,), 0.5), scales=[1, 2, 4])
    small = ["refiner.width=32", "refiner.depth=1"]
    with pytest.raises(ValueError, match=r"refiner.coarse_scales=4: the tokenizer has 3 scales"):
        build_for_stage(load_config(overrides=[*small, "refiner.coarse_scales=4"]), "refiner", tok)
    full = build_for_stage(load_config(overrides=[*small, "refiner.coarse_scales=3"]), "refiner", tok)
    assert torch.equal(refiner_target_std(full, tok), tok.residual_std)  # all scales: the tokenizer's residual
    part = build_for_stage(load_config(overrides=[*small, "refiner.coarse_scales=2"]), "refiner", tok)
    with pytest.raises(ValueError, match="target_std was never measured"):
        refiner_target_std(part, tok)


def test_refiner_target_round_trip():
    g = torch.Generator().manual_seed(0)
    z_q = torch.randn(B, C, S, S, generator=g)
    std = torch.tensor([0.5, 1.0, 2.0, 0.1])
    z = z_q + torch.randn(B, C, S, S, generator=g) * std[None, :, None, None]
    x0 = refiner_target(z, z_q, std)
    torch.testing.assert_close(x0, (z - z_q) / std[None, :, None, None])  # the residual in units of its std
    torch.testing.assert_close(x0.std(dim=(0, 2, 3)), torch.ones(C), atol=0.5, rtol=0)  # so about unit variance
    torch.testing.assert_close(refiner_compose(x0, z_q, std), z)
    torch.testing.assert_close(refiner_compose(refiner_target(z, z_q, std, "latent"), z_q, std, "latent"), z)
    with pytest.raises(ValueError, match="target"):
        refiner_target(z, z_q, std, "image")


def test_builds_from_config_defaults():
    from hybrid.config import load_config

    cfg = load_config(overrides=["refiner.width=32", "refiner.depth=1", "diffusion.width=32", "diffusion.depth=1"])
    refiner = build_denoiser(cfg.refiner, C, S, coarse=True, num_classes=NUM_CLASSES)
    baseline = build_denoiser(cfg.diffusion, C, S, coarse=False, num_classes=NUM_CLASSES)
    assert refiner.coarse and not baseline.coarse
    d = Diffusion.from_config(cfg.refiner)
    assert (d.objective, d.prediction, d.sampler, d.zero_snr) == ("ddpm", "v_prediction", "ddim", True)
    assert Diffusion.from_config(cfg.diffusion).sampler == "ddim"


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_tiny_fit_reduces_loss_and_samples_approach_target(objective):
    """x0 = 0.5 z_q + a class constant: a few dozen steps learn it; 4-step samples land near it."""
    torch.manual_seed(0)
    model = make(arch="dit")
    diffusion = Diffusion(objective)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    offsets = torch.tensor([-1.0, 0.0, 1.0])

    def batch(g, n=32):
        z_q = torch.randn(n, C, S, S, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        return 0.5 * z_q + offsets[labels][:, None, None, None], z_q, labels

    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x0, z_q, labels = batch(g)
        loss, _ = diffusion.loss(model, x0, z_q, labels, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10, losses

    model.eval()
    x0, z_q, labels = batch(torch.Generator().manual_seed(123), n=16)
    out = diffusion.sample(model, x0.shape, z_q, labels, 4, torch.Generator().manual_seed(7))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    err, noise_err = (out - x0).square().mean().item(), (noise - x0).square().mean().item()
    assert err < 0.5 * noise_err, (err, noise_err)


@pytest.mark.gpu
def test_sampling_on_cuda_with_a_cpu_generator():
    model = wake(make()).cuda()
    diffusion = Diffusion("ddpm", sampler="dpm")
    x0, z_q, cond = inputs()
    z_q, cond, x0 = z_q.cuda(), cond.cuda(), x0.cuda()
    loss, _ = diffusion.loss(model, x0, z_q, cond, torch.Generator().manual_seed(0), cond_drop=0.5)
    loss.backward()
    out = diffusion.sample(model, x0.shape, z_q, cond, 4, torch.Generator().manual_seed(0), cfg=2.0)
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    ref = diffusion.sample(model.cpu(), x0.shape, z_q.cpu(), cond.cpu(), 4, torch.Generator().manual_seed(0), cfg=2.0)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-3, rtol=1e-3)


def test_captions_are_a_text_condition():
    model = wake(make(condition="text"))
    x, z_q, cond = inputs(condition="text")
    t = torch.tensor([10, 500])
    captions = ["red", "a blue circle"]
    torch.testing.assert_close(model(x, t, z_q, captions), model(x, t, z_q, cond))
    diffusion = Diffusion("ddpm")
    a = diffusion.sample(model, x.shape, z_q, captions, 2, torch.Generator().manual_seed(0), cfg=2.0)
    b = diffusion.sample(model, x.shape, z_q, cond, 2, torch.Generator().manual_seed(0), cfg=2.0)
    torch.testing.assert_close(a, b)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.classes = torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "class_id": int(self.classes[i]), "caption": f"shape number {i}"}


@pytest.mark.parametrize("stage,condition,extra", [("refiner", "class", []), ("diffusion", "text", []),
                                                   ("refiner", "class", ["refiner.coarse_scales=2"])])
def test_lightning_smoke_run_and_checkpoint_round_trip(tmp_path, stage, condition, extra):
    from pathlib import Path

    import pytorch_lightning as pl

    from hybrid.config import load_config, to_dict
    from hybrid.lit.refiner import DiffusionModule, RefinerModule

    toy = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    cfg = load_config(toy, [f"run_dir={tmp_path}", f"data.num_classes={NUM_CLASSES}", f"{stage}.condition={condition}",
                            f"{stage}.train.max_steps=2", f"{stage}.train.warmup_steps=1", f"{stage}.steps=2",
                            *extra])
    config = to_dict(cfg)
    cls = RefinerModule if stage == "refiner" else DiffusionModule
    module = cls(config, tokenizer_config=config)  # a random tokenizer stands in for a trained one
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=4)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=module.extra_callbacks(),
                         default_root_dir=str(tmp_path))
    trainer.fit(module, loader)
    assert list((tmp_path / stage / "images").glob("*.png")), "previews are written at the end"
    path = tmp_path / "stage.ckpt"
    trainer.save_checkpoint(path)
    loaded = cls.load_from_checkpoint(path, map_location="cpu")
    x, z_q, _ = inputs(coarse=stage == "refiner")
    cond = torch.tensor([0, 2]) if condition == "class" else ["a", "b"]
    t = torch.tensor([10, 900])
    module.eval()
    assert torch.equal(loaded.model(x, t, z_q, cond), module.model(x, t, z_q, cond))
    if extra:  # coarse_scales=2 of the toy's 3 scales: the target's std is measured on the first batch and saved
        with torch.no_grad():
            enc = module.tokenizer.encode(_Batches().images[:4])
            r = enc.z - module.tokenizer.latent_from_scales(enc.indices, 2)
        torch.testing.assert_close(module.model.target_std, r.var(dim=(0, 2, 3)).sqrt())
        assert torch.equal(loaded.model.target_std, module.model.target_std)
        assert not torch.allclose(module.model.target_std, module.tokenizer.residual_std)


def test_final_checkpoint_keeps_the_raw_weights_of_the_final_step(tmp_path):
    """EMA replaces the model's weights when training ends; final.ckpt still holds that step's raw weights.

    Run A writes last.ckpt at step 2 of 3, so its raw step-3 weights can only come from the copy kept at
    the end; run B writes last.ckpt at step 3 itself, before the end. Both train the same way.
    """
    from pathlib import Path

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from benchmarks.refiner import load_stage
    from hybrid.config import load_config, to_dict
    from hybrid.lit.base import WarmupEMA
    from hybrid.lit.refiner import RefinerModule

    toy = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"

    def fit(name: str, every: int) -> Path:
        run = tmp_path / name
        cfg = load_config(toy, [f"run_dir={run}", f"data.num_classes={NUM_CLASSES}", "refiner.train.max_steps=3",
                                "refiner.train.warmup_steps=1"])
        config = to_dict(cfg)
        pl.seed_everything(0, verbose=False)
        module = RefinerModule(config, tokenizer_config=config)
        extra = list(module.extra_callbacks())
        assert any(isinstance(c, WarmupEMA) for c in extra), "the toy refiner trains with EMA"
        ckpt = ModelCheckpoint(dirpath=run / "refiner" / "checkpoints", save_top_k=0, save_last=True,
                               every_n_train_steps=every)
        trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[ckpt, *extra], default_root_dir=str(run))
        trainer.fit(module, torch.utils.data.DataLoader(_Batches(), batch_size=4))
        final = run / "refiner" / "final.ckpt"
        trainer.save_checkpoint(final)
        return final

    final_a, final_b = fit("a", every=2), fit("b", every=3)
    a = torch.load(final_a, weights_only=True)
    last_a = torch.load(final_a.parent / "checkpoints" / "last.ckpt", weights_only=True)
    last_b = torch.load(final_b.parent / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == last_b["global_step"] == 3 and last_a["global_step"] == 2
    raw_a = {k: v for k, v in a["current_model_state"].items() if k.startswith("model.")}
    raw_b = {k: v for k, v in last_b["current_model_state"].items() if k.startswith("model.")}
    ema_a = {k: v for k, v in a["state_dict"].items() if k.startswith("model.")}
    torch.testing.assert_close(raw_a, raw_b)  # the raw weights of step 3, as written before the end
    torch.testing.assert_close(ema_a, {k: v for k, v in last_b["state_dict"].items() if k.startswith("model.")})
    assert any(not torch.equal(raw_a[k], ema_a[k]) for k in ema_a), "raw and EMA weights differ after 3 steps"
    module = load_stage(final_a, "refiner", raw=True)  # what the refiner benchmark compares EMA against
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, raw_a[f"model.{k}"]), k


def test_the_unsharp_mask_of_the_judge_check_adds_high_frequencies_and_keeps_flat_images():
    """benchmarks.refiner's `z_q_sharpened` row: a fixed filter, x + a * (x - blur(x)), clamped to [-1, 1]."""
    from benchmarks.refiner import unsharp

    flat = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(unsharp(flat), flat)  # the blur kernel sums to 1: nothing to sharpen
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(4, 3, 16, 16, generator=gen) - 0.5) * 0.5  # inside [-1, 1] with room to move
    assert torch.equal(unsharp(images, amount=0.0), images)

    def top_band_power(x: torch.Tensor) -> float:  # mean power at spatial frequencies above 0.3 cycles/pixel
        f = torch.fft.fftfreq(x.shape[-1]).abs()
        band = torch.sqrt(f[:, None] ** 2 + f[None] ** 2) > 0.3
        return float(torch.fft.fft2(x).abs().pow(2).mean((0, 1))[band].mean())

    sharpened = unsharp(images, amount=0.5)
    assert top_band_power(sharpened) > 1.5 * top_band_power(images)
    # the channels are filtered alike and apart: one channel's change does not leak into another's
    moved = images.clone()
    moved[:, 0] += 0.1
    assert torch.equal(unsharp(moved)[:, 1:], unsharp(images)[:, 1:])
    assert float(unsharp(images * 4).abs().max()) <= 1.0  # clamped to the image range
