"""Runner details: resumed stages keep their earlier log rows; the newest checkpoint wins on resume; precision."""

import os
import time
from pathlib import Path

import pytest

from hybrid.config import load_config
from hybrid.lit.runner import AppendingCSVLogger, resume_path

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"


def test_resumed_stage_appends_to_its_metrics_csv(tmp_path):
    for run in range(2):
        logger = AppendingCSVLogger(save_dir=str(tmp_path), name="ar", version="logs")
        logger.log_metrics({"loss": float(run)}, step=run)
        if run == 1:
            logger.log_metrics({"acc": 0.5}, step=2)  # a new column rewrites the header, keeps the rows
        logger.save()
    rows = (tmp_path / "ar" / "logs" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "acc,loss,step" and len(rows) == 4
    assert rows[1] == ",0.0,0" and rows[2] == ",1.0,1" and rows[3] == "0.5,,2"


def test_resume_prefers_the_newest_of_hpc_and_last(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    sdir = tmp_path / "ar"
    (sdir / "checkpoints").mkdir(parents=True)
    assert resume_path(cfg, "ar") is None  # fresh
    last = sdir / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert resume_path(cfg, "ar") == str(last)
    hpc = sdir / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    now = time.time()
    os.utime(last, (now - 10, now - 10))
    os.utime(hpc, (now, now))
    assert resume_path(cfg, "ar") is None  # Lightning picks the newer hpc checkpoint up itself
    os.utime(last, (now + 10, now + 10))
    assert resume_path(cfg, "ar") == str(last)  # a later last.ckpt beats a stale hpc checkpoint


def test_bf16_mixed_precision_trains_every_stage_with_gradient_clipping(tmp_path):
    """bf16-mixed (the GPU default, and a CPU option) with the fused AdamW and `train.grad_clip` on:
    Lightning's plugin refuses to clip for a fused optimizer, so each stage clips the true gradients itself."""
    import torch

    from hybrid.checkpoints import load_checkpoint
    from hybrid.lit.runner import fit_stage

    toy = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    steps = [f"{s}.train.max_steps=3" for s in ("tokenizer", "ar", "refiner")]
    cfg = load_config(toy, [f"run_dir={tmp_path}", "trainer.precision=bf16-mixed", "trainer.accelerator=cpu",
                            "trainer.progress_bar=false", "ar.token_cache=false", *steps])
    assert cfg.tokenizer.train.grad_clip > 0 and cfg.ar.train.grad_clip > 0 and cfg.refiner.train.grad_clip > 0
    for stage in ("tokenizer", "ar", "refiner"):
        ckpt = load_checkpoint(fit_stage(cfg, stage))
        assert ckpt["global_step"] == 3, stage
        weights = [v for v in ckpt["state_dict"].values() if torch.is_floating_point(v)]
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights), stage


def test_trainer_compile_trains_the_same_weights_as_eager(tmp_path, capsys):
    """`trainer.compile=true` runs the AR's and the refiner's training step through torch.compile: the
    weights after three steps match an eager run's, previews and validation run eager mid-training,
    and the checkpoints keep the plain module's keys."""
    import torch
    from torch._dynamo.utils import counters

    from hybrid.checkpoints import load_checkpoint
    from hybrid.lit.runner import fit_stage

    toy = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    common = ["trainer.precision=32-true", "trainer.accelerator=cpu", "trainer.progress_bar=false",
              "ar.token_cache=false", "ar.train.val_every=2", *[f"{s}.train.max_steps=3" for s in ("tokenizer", "ar",
                                                                                                  "refiner")],
              *[f"{s}.train.image_every=2" for s in ("ar", "refiner")]]
    eager_cfg = load_config(toy, [f"run_dir={tmp_path / 'eager'}", *common])
    fit_stage(eager_cfg, "tokenizer")
    tokenizer = str(tmp_path / "eager" / "tokenizer" / "final.ckpt")
    results = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        cfg = load_config(toy, [f"run_dir={tmp_path / name}", f"trainer.compile={flag}",
                                f"tokenizer.checkpoint={tokenizer}", *common])
        torch._dynamo.reset()
        counters.clear()
        results[name] = {stage: load_checkpoint(fit_stage(cfg, stage)) for stage in ("ar", "refiner")}
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (flag == "true"), (name, dict(counters["stats"]))
    out = capsys.readouterr().out
    assert "[ar] trainer.compile: compiling ARModel" in out and "[refiner] trainer.compile: compiling" in out
    for stage in ("ar", "refiner"):
        eager, compiled = results["eager"][stage], results["compiled"][stage]
        assert compiled["global_step"] == 3 and eager["state_dict"].keys() == compiled["state_dict"].keys(), stage
        assert not any("_orig_mod" in key for key in compiled["state_dict"]), stage
        for key, value in eager["state_dict"].items():
            if torch.is_floating_point(value):
                torch.testing.assert_close(compiled["state_dict"][key], value, atol=1e-4, rtol=1e-3, msg=key)
        assert (tmp_path / "compiled" / stage / "images").is_dir(), stage  # previews written mid-training


def test_auto_compile_is_on_for_cpu_runs_with_a_cxx_compiler(monkeypatch):
    import torch

    import hybrid.precision as precision
    from hybrid.config import ConfigError

    cfg = load_config(None, [])
    assert cfg.trainer.compile == "auto" and load_config(TOY, []).trainer.compile is False
    assert precision.has_cxx_compiler() in (True, False)  # the real probe answers without raising
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "has_cxx_compiler", lambda: True)
    assert precision.resolve_compile(cfg) is True
    monkeypatch.setattr(precision, "has_cxx_compiler", lambda: False)
    assert precision.resolve_compile(cfg) is False  # inductor's CPU backend cannot build without one
    monkeypatch.setattr(precision, "has_cxx_compiler", lambda: True)
    assert precision.resolve_compile(load_config(None, ["trainer.accelerator=gpu"])) is False
    assert precision.resolve_compile(load_config(None, ["trainer.accelerator=gpu", "trainer.compile=true"])) is True
    assert precision.resolve_compile(load_config(None, ["trainer.compile=false"])) is False
    with pytest.raises(ConfigError, match="trainer.compile"):
        load_config(None, ["trainer.compile=sometimes"])


def test_auto_precision_is_bf16_on_gpus_and_on_cpus_with_native_bf16(monkeypatch):
    import torch

    import hybrid.precision as precision

    cfg = load_config(None, [])
    assert precision.cpu_has_native_bf16() in (True, False)  # the real probe answers without raising
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision(cfg) == "32-true"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision(cfg) == "bf16-mixed"
    assert precision.resolve_precision(load_config(None, ["trainer.precision=32-true"])) == "32-true"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision(load_config(None, ["trainer.accelerator=gpu"])) == "bf16-mixed"


def test_the_frozen_tokenizer_alone_in_eval_mode_raises_no_warning(tmp_path, recwarn):
    """Lightning warns when modules are in eval mode at the start of fit ("may lead to unexpected
    behavior"); the AR's frozen tokenizer is meant to be, so its fit is quiet, while any other
    submodule stuck in eval mode is still reported."""
    from torch import nn

    from hybrid.lit.runner import build_module, fit_stage, unexpected_eval_modules

    cfg = load_config(TOY, [f"run_dir={tmp_path}", "trainer.progress_bar=false", "ar.token_cache=false",
                            "tokenizer.train.max_steps=2", "ar.train.max_steps=2"])
    fit_stage(cfg, "tokenizer")
    recwarn.clear()
    fit_stage(cfg, "ar")
    assert not [w for w in recwarn if "in eval mode" in str(w.message)]

    class StuckInEval(nn.Module):
        def train(self, mode: bool = True):
            return super().train(False)

    for stage in ("refiner", "diffusion"):  # the other stages that hold the frozen tokenizer
        assert unexpected_eval_modules(build_module(cfg, stage)) == [], stage
    module = build_module(cfg, "ar")
    assert unexpected_eval_modules(module) == [] and not module.tokenizer.training
    module.extra = StuckInEval()
    assert unexpected_eval_modules(module) == ["extra"]
