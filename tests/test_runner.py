"""Runner details: resumed stages keep their earlier log rows; the newest checkpoint wins on resume; precision."""

import os
import re
import signal
import time
import types
from pathlib import Path

import pytest

from hybrid.config import ConfigError, load_config
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
    assert resume_path(cfg, "ar") == str(hpc)  # named: Lightning picks it up itself only inside a SLURM job
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
    assert isinstance(precision.has_cxx_compiler(), bool)  # the real probe answers without raising
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
    assert isinstance(precision.cpu_has_native_bf16(), bool)  # the real probe answers without raising
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision(cfg) == "32-true"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision(cfg) == "bf16-mixed"
    assert precision.resolve_precision(load_config(None, ["trainer.precision=32-true"])) == "32-true"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision(load_config(None, ["trainer.accelerator=gpu"])) == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU without bf16 (older than Ampere)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert precision.resolve_precision(load_config(None, ["trainer.accelerator=gpu"])) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.resolve_precision(load_config(None, [])) == "bf16-mixed"


def test_parts_outside_lightning_follow_trainer_accelerator(monkeypatch):
    """The oracle and the evaluation run where the stages train: trainer.accelerator=cpu keeps them off a GPU."""
    import torch

    import hybrid.precision as precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.stage_device(load_config(None, ["trainer.accelerator=cpu"])) == "cpu"
    assert precision.stage_device(load_config(None, [])) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.stage_device(load_config(None, ["trainer.accelerator=gpu"])) == "cpu"


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


def test_a_fit_says_its_batch_once_without_lightnings_noise(tmp_path, recwarn, caplog, capsys):
    """What Lightning says at every fit and is noise here (a cloud-logger tip, "no validation_step" for the stages
    that share the AR's data module, torch's LeafSpec deprecation) is not said; the global batch is said once."""
    import logging

    from hybrid.lit.runner import fit_stage

    caplog.set_level(logging.INFO)
    cfg = _toy(tmp_path)
    for stage in ("tokenizer", "refiner"):
        fit_stage(cfg, stage)
    said = capsys.readouterr().out + caplog.text + "\n".join(str(w.message) for w in recwarn)
    for noise in ("Tip:", "validation_step", "LeafSpec"):
        assert noise not in said, (noise, said)
    assert said.count("global batch") == 2, said  # once per stage


def _toy(tmp_path, *overrides):
    return load_config(TOY, [f"run_dir={tmp_path}", "trainer.progress_bar=false", "trainer.accelerator=cpu",
                             "ar.token_cache=false", "tokenizer.train.max_steps=2", "ar.train.max_steps=2",
                             "refiner.train.max_steps=2", *overrides])


def test_retrain_sets_the_old_stage_aside_and_a_slurm_requeue_resumes(tmp_path, monkeypatch, capsys):
    import torch

    from hybrid.checkpoints import final_path, last_path
    from hybrid.lit.runner import fit_stage

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first = _toy(tmp_path, "tokenizer.train.ckpt_every=1")
    fit_stage(first, "tokenizer")
    old = torch.load(final_path(tmp_path, "tokenizer"), weights_only=True)["state_dict"]
    again = _toy(tmp_path, "retrain=true", "seed=1", "tokenizer.train.ckpt_every=1")
    fit_stage(again, "tokenizer")
    aside = sorted(tmp_path.glob("tokenizer.before-retrain-*"))
    assert len(aside) == 1 and "moved to" in capsys.readouterr().out
    kept = torch.load(aside[0] / "final.ckpt", weights_only=True)["state_dict"]
    new = torch.load(final_path(tmp_path, "tokenizer"), weights_only=True)
    assert all(torch.equal(old[k], kept[k]) for k in old)  # the old stage, whole, under its new name
    assert new["global_step"] == 2 and any(not torch.equal(old[k], new["state_dict"][k]) for k in old)
    assert torch.load(aside[0] / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2

    # a SLURM requeue of the same retrain=true job (stage interrupted: no final.ckpt) resumes instead
    final_path(tmp_path, "tokenizer").unlink()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    fit_stage(_toy(tmp_path, "retrain=true", "seed=1", "tokenizer.train.max_steps=3"), "tokenizer")
    assert f"resuming from {last_path(tmp_path, 'tokenizer')}" in capsys.readouterr().out
    assert len(list(tmp_path.glob("tokenizer.before-retrain-*"))) == 1
    assert torch.load(final_path(tmp_path, "tokenizer"), weights_only=True)["global_step"] == 3


def _interrupted_ar(tmp_path, monkeypatch):
    """A toy run whose AR stage was interrupted after its last checkpoint (outside SLURM): (its config, the
    train.py arguments that resume it)."""
    from hybrid.checkpoints import final_path
    from hybrid.lit.runner import fit_stage

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = _toy(tmp_path, "ar.train.ckpt_every=1")
    fit_stage(cfg, "tokenizer")
    fit_stage(cfg, "ar")
    final_path(tmp_path, "ar").unlink()
    return cfg, ["--config", str(TOY), f"run_dir={tmp_path}", "trainer.progress_bar=false", "trainer.accelerator=cpu",
                 "ar.token_cache=false", "tokenizer.train.max_steps=2", "ar.train.max_steps=3", "stage=ar"]


def test_resume_refuses_a_changed_model_or_tokenizer_with_one_line(tmp_path, monkeypatch, capsys):
    """An interrupted stage resumed after its model settings changed, or after its tokenizer was retrained,
    is a one-line error naming the checkpoint and the way out (not torch's key listing; never the old
    tokenizer's weights put back under the new one's hash)."""
    from hybrid.checkpoints import last_path
    from hybrid.experiment import main

    cfg, base = _interrupted_ar(tmp_path, monkeypatch)
    assert main([*base, f"ar.width={cfg.ar.width * 2}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: stage ar: cannot resume from")
    assert str(last_path(tmp_path, "ar")) in err[0] and "retrain=true" in err[0]

    assert main(["--config", str(TOY), f"run_dir={tmp_path}", "trainer.progress_bar=false", "stage=tokenizer",
                 "trainer.accelerator=cpu", "tokenizer.train.max_steps=2", "retrain=true", "seed=1"]) == 0
    capsys.readouterr()
    assert main(base) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on tokenizer weights" in err[0] and "retrain=true" in err[0], err


@pytest.mark.parametrize("damage", ["text", "truncated", "empty"])
def test_resume_from_a_damaged_checkpoint_is_one_line_naming_it_and_the_file_is_kept(tmp_path, monkeypatch, capsys,
                                                                                      damage):
    """Was a KeyError, an OSError or an EOFError from inside Lightning's fit, naming no file."""
    from hybrid.checkpoints import final_path, last_path
    from hybrid.experiment import main

    _, base = _interrupted_ar(tmp_path, monkeypatch)
    last = last_path(tmp_path, "ar")
    data = last.read_bytes()
    last.write_bytes({"text": b"not a checkpoint\n", "truncated": data[:len(data) // 2], "empty": b""}[damage])
    kept = last.read_bytes()
    capsys.readouterr()
    assert main(base) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: stage ar: cannot resume: '{last}' is not a checkpoint"), err
    assert "retrain=true" in err[0] and last.read_bytes() == kept and not final_path(tmp_path, "ar").exists()


def test_init_from_keeps_this_runs_tokenizer(tmp_path, capsys):
    """Warm-starting from a run with another tokenizer takes its AR weights, not its tokenizer. A finished stage is
    skipped, and the log says that its init_from was not used."""
    import torch

    from hybrid.checkpoints import final_path, init_weights, load_checkpoint, sub_state_dict, weights_hash
    from hybrid.lit.runner import build_module, fit_stage

    other = _toy(tmp_path / "other", "seed=1")
    fit_stage(other, "tokenizer")
    source = load_checkpoint(fit_stage(other, "ar"))["state_dict"]
    mine = _toy(tmp_path / "mine")
    own_hash = weights_hash(sub_state_dict(load_checkpoint(fit_stage(mine, "tokenizer"))["state_dict"], "tokenizer"))
    assert own_hash != weights_hash(sub_state_dict(source, "tokenizer"))
    module = build_module(mine, "ar")
    assert init_weights(module, final_path(other.run_dir, "ar"), "ar") == []  # nothing else differs
    state = module.state_dict()
    assert weights_hash(sub_state_dict(state, "tokenizer")) == own_hash == module.hparams["tokenizer_hash"]
    assert all(torch.equal(state[k], v) for k, v in source.items() if k.startswith("model."))
    fit_stage(mine, "ar")
    capsys.readouterr()
    fit_stage(_toy(tmp_path / "mine", "stage=ar", f"init_from={final_path(other.run_dir, 'ar')}"), "ar")
    assert (f"[ar] note: init_from={final_path(other.run_dir, 'ar')} was not used, since the stage is finished"
            in capsys.readouterr().out)


def test_micro_batches_of_an_accumulated_step_draw_different_noise():
    """`trainer.accumulate` > 1: the global step advances once per optimizer step, so each micro-batch's
    generator must differ (and the first keeps the key of a run without accumulation)."""
    import zlib

    import torch

    from hybrid.config import to_dict
    from hybrid.lit.tokenizer import TokenizerModule

    module = TokenizerModule(to_dict(load_config(TOY, ["tokenizer.train.accumulate=2"])))
    draws = []
    module.compute_loss = lambda batch: (torch.rand(4, generator=module.step_generator()).sum(), {})
    for batch_idx in range(4):  # no trainer: the global step stays 0
        module.training_step({"image": torch.zeros(1)}, batch_idx)
        draws.append(torch.rand(4, generator=module.step_generator()))
    assert torch.equal(draws[0], draws[2]) and torch.equal(draws[1], draws[3])
    assert not torch.equal(draws[0], draws[1])
    plain = torch.Generator().manual_seed(zlib.crc32(f"{module.cfg.seed}:0:0:0".encode()))
    assert torch.equal(draws[0], torch.rand(4, generator=plain))


@pytest.mark.parametrize("env, zero", [
    ({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "1", "LOCAL_RANK": "1"}, False),
    ({"SLURM_PROCID": "2"}, False), ({"SLURM_PROCID": "0"}, True),
    # Lightning's own launcher inside an sbatch script: children inherit SLURM_PROCID=0
    ({"SLURM_PROCID": "0", "LOCAL_RANK": "1", "NODE_RANK": "0"}, False),
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
])
def test_rank_zero_under_every_launcher(monkeypatch, env, zero):
    from hybrid.checkpoints import is_rank_zero

    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_rank_zero() is zero


def test_stage_checkpoint_keys_take_the_stage_from_a_file_into_the_run(tmp_path, monkeypatch, capsys):
    """`tokenizer.checkpoint` / `ar.checkpoint`: those stages are not trained but copied into the run, so the
    later stages, the evaluation and `sample.py --run` use them; a different stage already in the run, or a
    stage trained on another tokenizer, is a one-line error naming the files."""
    import filecmp

    from hybrid.checkpoints import CheckpointError, final_path
    from hybrid.experiment import main
    from hybrid.lit.runner import fit_stage
    from hybrid.pipeline import HybridPipeline

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    source = _toy(tmp_path / "source")
    tok, ar = fit_stage(source, "tokenizer"), fit_stage(source, "ar")
    borrow = [f"tokenizer.checkpoint={tok}", f"ar.checkpoint={ar}"]
    cfg = _toy(tmp_path / "borrow", *borrow)
    for stage in ("tokenizer", "ar", "refiner"):
        fit_stage(cfg, stage)
    out = capsys.readouterr().out
    assert "tokenizer.checkpoint" in out and "ar.checkpoint" in out and "not trained in this run" in out
    for stage, path in (("tokenizer", tok), ("ar", ar)):
        assert filecmp.cmp(path, final_path(cfg.run_dir, stage), shallow=False), stage
    assert not (tmp_path / "borrow" / "tokenizer" / "logs").exists()  # not trained here
    assert set(HybridPipeline.from_run(cfg.run_dir).modes) >= {"ar", "hybrid"}

    own = _toy(tmp_path / "own", "seed=1")
    fit_stage(own, "tokenizer")
    base = ["--config", str(TOY), f"run_dir={own.run_dir}", "trainer.progress_bar=false", "trainer.accelerator=cpu",
            "stage=tokenizer"]
    assert main([*base, f"tokenizer.checkpoint={tok}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already has another tokenizer checkpoint" in err[0] and str(tok) in err[0], err
    with pytest.raises(CheckpointError, match="was trained with tokenizer"):  # source's AR on own's tokenizer
        fit_stage(_toy(tmp_path / "own", f"ar.checkpoint={ar}"), "ar")
    assert main([*base, f"tokenizer.checkpoint={tok}", "retrain=true"]) == 0
    assert filecmp.cmp(tok, final_path(own.run_dir, "tokenizer"), shallow=False)
    assert len(list((tmp_path / "own").glob("tokenizer.before-retrain-*"))) == 1


def test_ctrl_c_during_a_fit_says_where_to_resume_from(tmp_path, monkeypatch, capsys):
    """Lightning answers Ctrl-C with sys.exit(1); the stage first says its last checkpoint and how to resume."""
    from hybrid.lit.runner import fit_stage
    from hybrid.lit.tokenizer import TokenizerModule

    real = TokenizerModule.compute_loss

    def ctrl_c_at_step_3(self, batch):
        if self.global_step >= 3:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(TokenizerModule, "compute_loss", ctrl_c_at_step_3)
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C while it shuts down
    try:
        with pytest.raises(SystemExit):
            fit_stage(_toy(tmp_path, "tokenizer.train.max_steps=10", "tokenizer.train.ckpt_every=2"), "tokenizer")
    finally:
        signal.signal(signal.SIGINT, handler)
    out = capsys.readouterr().out
    last = tmp_path / "tokenizer" / "checkpoints" / "last.ckpt"
    assert (f"[tokenizer] interrupted at step 3; last checkpoint: {last} (step 2); re-running the same command "
            "resumes from it") in out, out


def test_a_slurm_checkpoint_is_resumed_from_outside_a_slurm_job(tmp_path, monkeypatch, capsys):
    """A requeue checkpoint (hpc_ckpt_<n>.ckpt: SIGUSR1 where `scontrol` is missing, or a Ctrl-C's save) was left
    to Lightning, which picks it up only inside a SLURM batch job: re-run on a workstation, a login node or in an
    interactive allocation, the stage started again from step 0 (found by a review)."""
    from hybrid.checkpoints import load_checkpoint
    from hybrid.lit.runner import fit_stage

    for key in ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NTASKS", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    fit_stage(_toy(tmp_path, "tokenizer.train.max_steps=4", "tokenizer.train.ckpt_every=2"), "tokenizer")
    sdir = tmp_path / "tokenizer"
    (sdir / "final.ckpt").unlink()
    (sdir / "checkpoints" / "last.ckpt").rename(sdir / "hpc_ckpt_1.ckpt")
    step = load_checkpoint(sdir / "hpc_ckpt_1.ckpt")["global_step"]
    assert step == 4
    capsys.readouterr()
    fit_stage(_toy(tmp_path, "tokenizer.train.max_steps=6", "tokenizer.train.ckpt_every=2"), "tokenizer")
    assert "[tokenizer] fit starts at step 4" in capsys.readouterr().out
    assert load_checkpoint(sdir / "final.ckpt")["global_step"] == 6


def test_a_resumed_stage_logs_each_step_once(tmp_path, monkeypatch):
    """Rows logged after the last checkpoint belong to steps the resumed fit trains again: metrics.csv keeps
    one row per step (the resumed one), not the interrupted attempt's rows beside it."""
    import csv

    from hybrid.lit.runner import fit_stage
    from hybrid.lit.tokenizer import TokenizerModule

    real = TokenizerModule.compute_loss

    def ctrl_c_at_step_5(self, batch):
        if self.global_step >= 5:
            raise KeyboardInterrupt
        return real(self, batch)

    steps = ["tokenizer.train.max_steps=8", "tokenizer.train.ckpt_every=2", "tokenizer.train.log_every=1"]
    monkeypatch.setattr(TokenizerModule, "compute_loss", ctrl_c_at_step_5)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            fit_stage(_toy(tmp_path, *steps), "tokenizer")
    finally:
        signal.signal(signal.SIGINT, handler)
    log = tmp_path / "tokenizer" / "logs" / "metrics.csv"

    def logged():
        with open(log, newline="") as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]

    assert logged() == [0, 1, 2, 3, 4]  # step 4 ran after the last checkpoint (step 4 = after 4 steps) was due
    monkeypatch.setattr(TokenizerModule, "compute_loss", real)
    fit_stage(_toy(tmp_path, *steps[:2], "tokenizer.train.log_every=3"), "tokenizer")  # logs steps 5 and 8 only
    assert logged() == [0, 1, 2, 3, 5]  # not the interrupted fit's step 4: the resumed fit trained it again


def test_a_missing_stage_hint_keeps_the_commands_config(tmp_path, capsys):
    """"Train it first" names the run's config.yaml: the bare `python train.py stage=tokenizer run_dir=...` it
    used to print trained the default config's tokenizer into a run of another config."""
    from hybrid.experiment import main

    assert main(["--config", str(TOY), f"run_dir={tmp_path}", "stage=ar", "seed=7"]) == 1
    err = capsys.readouterr().err
    assert f"python train.py --config {tmp_path / 'config.yaml'} stage=tokenizer)" in err, err
    assert "seed: 7" in (tmp_path / "config.yaml").read_text()  # the hint brings this command's overrides along
    # the last command's one-off keys are undone: its hint then loads (init_from with stage=tokenizer would not)
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"")
    assert main(["--config", str(TOY), f"run_dir={tmp_path}", "stage=ar", f"init_from={other}", "retrain=true"]) == 1
    err = capsys.readouterr().err
    hint = err.split("train it first (python train.py ", 1)[1].split(")", 1)[0].split()
    assert hint == ["--config", str(tmp_path / "config.yaml"), "init_from=", "retrain=false", "stage=tokenizer"], err
    cfg = load_config(hint[1], hint[2:])
    assert cfg.init_from == "" and cfg.retrain is False and cfg.stage == "tokenizer" and cfg.seed == 0


def test_a_skipped_stage_names_changed_settings_and_refuses_a_retrained_tokenizer(tmp_path, monkeypatch, capsys):
    from hybrid.checkpoints import CheckpointError
    from hybrid.lit.runner import fit_stage

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = _toy(tmp_path)
    fit_stage(cfg, "tokenizer")
    fit_stage(cfg, "ar")
    capsys.readouterr()
    fit_stage(_toy(tmp_path, "ar.train.lr=0.5"), "ar")
    out = capsys.readouterr().out
    assert "skipped" in out and f"ar.train.lr={cfg.ar.train.lr!r}, not 0.5" in out, out
    fit_stage(cfg, "ar")
    assert "note:" not in capsys.readouterr().out  # the same settings: nothing to say
    fit_stage(_toy(tmp_path, "retrain=true", "seed=1"), "tokenizer")
    with pytest.raises(CheckpointError, match="was trained with tokenizer"):
        fit_stage(cfg, "ar")


def test_gradient_clipping_under_fsdp_goes_through_the_wrapped_root():
    """Lightning's FSDP precision plugin raises on clip-by-norm (every FSDP step with train.grad_clip > 0 stopped);
    the stage clips through FSDP's root module instead. FSDP itself needs GPUs: the dispatch is checked here."""
    from types import SimpleNamespace

    from pytorch_lightning.strategies import FSDPStrategy

    from hybrid.config import to_dict
    from hybrid.lit.tokenizer import TokenizerModule

    calls = []
    root = SimpleNamespace(clip_grad_norm_=calls.append)
    module = TokenizerModule(to_dict(load_config(TOY, [])))
    module._trainer = SimpleNamespace(precision_plugin=None, strategy=FSDPStrategy(), model=root)
    module.configure_gradient_clipping(optimizer=None, gradient_clip_val=0.5)
    assert calls == [0.5]


def test_deterministic_runs_warn_on_gpus_for_ops_cuda_cannot_make_deterministic(monkeypatch):
    import hybrid.lit.runner as runner

    assert runner.deterministic_mode(load_config(None, ["trainer.deterministic=true"])) is True
    assert runner.deterministic_mode(load_config(None, [])) is False
    monkeypatch.setattr(runner, "uses_gpu", lambda cfg: True)
    assert runner.deterministic_mode(load_config(None, ["trainer.deterministic=true"])) == "warn"
    assert runner.deterministic_mode(load_config(None, [])) is False


def test_an_error_in_a_dataloader_worker_is_reported_in_one_line(tmp_path, monkeypatch, capsys):
    """PyTorch re-raises a worker's error with the worker's traceback in its message (data.num_workers > 0):
    train.py still prints one line, the worker's own message."""
    import warnings

    import webdataset as wds

    from hybrid.data.shards import ShardWarning
    from hybrid.experiment import main

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with wds.TarWriter(str(tmp_path / "train-000000.tar")):  # an empty shard: no readable sample
        pass
    pattern = str(tmp_path / "train-*.tar")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardWarning)
        assert main(["--config", str(TOY), f"run_dir={tmp_path / 'run'}", "trainer.progress_bar=false",
                     "trainer.accelerator=cpu", "stage=tokenizer", "data.source=shards", f"data.shards={pattern}",
                     "data.num_classes=2", "data.num_workers=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: no readable sample in 13 consecutive shards drawn from "
                                               f"'{pattern}'"), err


def _main_toy(tmp_path, *overrides):
    from hybrid.experiment import main

    return main(["--config", str(TOY), f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                 "trainer.progress_bar=false", "trainer.accelerator=cpu", "ar.token_cache=false",
                 "tokenizer.train.max_steps=2", "ar.train.max_steps=4", "ar.train.ckpt_every=1",
                 "refiner.train.max_steps=2", "oracle.train.max_steps=2", "eval.num_samples=16", *overrides])


def test_an_interrupted_retrain_of_every_stage_goes_on_without_retrain_or_under_a_requeue(tmp_path, monkeypatch,
                                                                                          capsys):
    """train.py stage=all retrain=true sets the whole plan aside at its start: after a Ctrl-C in the AR stage,
    the same command without retrain=true (or SLURM's requeue of it, which keeps retrain=true) skips the new
    tokenizer, resumes the AR and trains the refiner, and never reads a stage of the run being replaced."""
    import torch

    from hybrid.lit.ar import ARModule

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert _main_toy(tmp_path) == 0
    run = tmp_path / "run"
    real = ARModule.compute_loss

    def ctrl_c_at_step_2(self, batch):
        if self.global_step >= 2:
            raise KeyboardInterrupt
        return real(self, batch)

    for resume in (["seed=1"], ["seed=1", "retrain=true"]):
        monkeypatch.setattr(ARModule, "compute_loss", ctrl_c_at_step_2)
        handler = signal.getsignal(signal.SIGINT)
        try:
            with pytest.raises(SystemExit):
                _main_toy(tmp_path, "seed=1", "retrain=true")
        finally:
            signal.signal(signal.SIGINT, handler)
        assert "re-running the same command without retrain=true resumes" in capsys.readouterr().out
        for stage in ("tokenizer", "ar", "refiner"):  # all set aside at the start, the refiner before its turn
            assert list(tmp_path.glob(f"run/{stage}.before-retrain-*")), stage
        assert not (run / "refiner").exists() and not (run / "ar" / "final.ckpt").exists()
        monkeypatch.setattr(ARModule, "compute_loss", real)
        if "retrain=true" in resume:
            monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        assert _main_toy(tmp_path, *resume) == 0
        out = capsys.readouterr().out
        assert "[tokenizer]" in out and "exists: skipped" in out and "[ar] resuming from" in out, out
        ckpts = {s: torch.load(run / s / "final.ckpt", weights_only=True) for s in ("tokenizer", "ar", "refiner")}
        assert ckpts["ar"]["global_step"] == 4
        assert all(c["hyper_parameters"]["config"]["seed"] == 1 for c in ckpts.values())
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)


def test_retrain_warm_starting_from_the_stage_being_replaced_reads_it_where_it_was_set_aside(tmp_path, monkeypatch,
                                                                                             capsys):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    from hybrid.lit.runner import fit_stage

    cfg = _toy(tmp_path)
    fit_stage(cfg, "tokenizer")
    fit_stage(cfg, "ar")
    own = str(tmp_path / "ar" / "final.ckpt")
    fit_stage(_toy(tmp_path, "retrain=true", "stage=ar", f"init_from={own}"), "ar")
    out = capsys.readouterr().out
    aside = sorted(tmp_path.glob("ar.before-retrain-*"))
    assert len(aside) == 1
    assert f"init_from={own} was set aside by retrain=true: reading {aside[0] / 'final.ckpt'}" in out
    assert (tmp_path / "ar" / "final.ckpt").is_file()
    # its requeue (or the same command without retrain) before the new stage finished: the config still loads,
    # and the runner reads init_from where it was set aside (it failed at load: "'init_from': ... does not exist")
    (tmp_path / "ar" / "final.ckpt").unlink()
    for again in ("retrain=true", "retrain=false"):
        assert _toy(tmp_path, again, "stage=ar", f"init_from={own}").init_from == own
    with pytest.raises(ConfigError, match="'init_from': .* does not exist"):
        _toy(tmp_path, "stage=ar", f"init_from={tmp_path / 'refiner' / 'final.ckpt'}")
    # an init_from that does not fit, found after the set-aside: the error says where the previous stage went
    from hybrid.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match=r"'tokenizer' checkpoint.*previous ar stage is in .*ar\.before-retrain"):
        wrong = tmp_path / "tokenizer" / "final.ckpt"
        fit_stage(_toy(tmp_path, "retrain=true", "stage=ar", f"init_from={wrong}"), "ar")


def test_adopting_a_stage_sets_an_interrupted_trainings_leftovers_aside(tmp_path, monkeypatch):
    from hybrid.lit.runner import fit_stage

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    source = _toy(tmp_path / "source")
    tok, ar = fit_stage(source, "tokenizer"), fit_stage(source, "ar")
    leftover = tmp_path / "run" / "ar" / "checkpoints" / "last.ckpt"  # an AR training interrupted here
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"another training's state")
    fit_stage(_toy(tmp_path / "run", f"tokenizer.checkpoint={tok}", f"ar.checkpoint={ar}"), "ar")
    assert sorted(p.name for p in (tmp_path / "run" / "ar").iterdir()) == ["final.ckpt"]
    (aside,) = (tmp_path / "run").glob("ar.before-retrain-*")
    assert (aside / "checkpoints" / "last.ckpt").read_bytes() == b"another training's state"


def test_stage_eval_judges_stages_given_by_checkpoint_keys(tmp_path, monkeypatch):
    """`stage=eval` with tokenizer/ar/refiner.checkpoint adopts them into the run and judges them (it failed with
    'has no trained tokenizer', or judged the run's own stages without a word)."""
    import json

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert _main_toy(tmp_path / "a") == 0
    src = tmp_path / "a" / "run"
    keys = [f"{s}.checkpoint={src / s / 'final.ckpt'}" for s in ("tokenizer", "ar", "refiner")]
    assert _main_toy(tmp_path / "b", "stage=eval", *keys) == 0
    metrics = json.loads((tmp_path / "b" / "run" / "metrics.json").read_text())
    assert {"tokenizer", "ar", "hybrid"} <= set(metrics)


def test_lightnings_own_refusals_are_one_line(tmp_path, capsys):
    """An accelerator this machine lacks: Lightning raises MisconfigurationException when the Trainer is built."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    from hybrid.experiment import main

    assert main(["--config", str(TOY), f"run_dir={tmp_path}", "stage=tokenizer", "trainer.accelerator=gpu",
                 "trainer.progress_bar=false"]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "trainer.*" in err[0], err


def test_a_stage_on_damaged_shards_reports_what_its_data_skipped(tmp_path, monkeypatch, capsys):
    """The README says a corrupt sample or an unreadable shard is skipped with a warning *and counted*: the count,
    summed over the workers, ends the stage's log and is kept in its checkpoint (`data_skipped`)."""
    import tarfile
    import warnings

    import webdataset as wds

    from hybrid.checkpoints import load_checkpoint
    from hybrid.data.shards import ShardWarning, write_procedural
    from hybrid.experiment import main

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    write_procedural(tmp_path / "data", count=24, image_size=16, per_shard=12, split="train", progress=False)
    samples = list(wds.WebDataset(str(tmp_path / "data" / "train-000000.tar"), shardshuffle=False,
                                  nodesplitter=None, workersplitter=None))
    with wds.TarWriter(str(tmp_path / "data" / "train-000002.tar")) as sink:  # every PNG of this shard is corrupt
        for s in samples:
            sink.write({"__key__": s["__key__"] + "bad", "png": s["png"][:40] + b"garbage", "json": s["json"]})
    whole = tmp_path / "data" / "train-000001.tar"
    with tarfile.open(whole) as tf:
        member = tf.getmembers()[5]
    (tmp_path / "data" / "train-000003.tar").write_bytes(whole.read_bytes()[: member.offset_data + member.size // 2])

    def train(run, workers):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ShardWarning)
            assert main(["--config", str(TOY), f"run_dir={run}", "trainer.progress_bar=false",
                         "trainer.accelerator=cpu", "stage=tokenizer", "tokenizer.train.max_steps=4",
                         "data.source=shards", f"data.shards={tmp_path / 'data' / 'train-*.tar'}", "data.num_classes=0",
                         f"data.num_workers={workers}"]) == 0
        return load_checkpoint(run / "tokenizer" / "final.ckpt")["hyper_parameters"]["data_skipped"]

    for workers in (1, 0):  # 1: counted in the worker process, seen by the main one
        skipped = train(tmp_path / f"run{workers}", workers)
        assert skipped["train_bad_samples"] > 0 and skipped["train_bad_shards"] > 0, skipped
        assert skipped["val_bad_samples"] == skipped["val_bad_shards"] == 0  # no validation data
        assert (f"[tokenizer] data: skipped {skipped['train_bad_samples']} corrupt sample(s) and "
                f"{skipped['train_bad_shards']} unreadable shard(s) in training, counted at each read since this fit "
                f"started") in capsys.readouterr().out
    # the AR stage reads its training images through its token pool (ar.token_cache, on by default): its data
    # module reported nothing, and its checkpoint had no data_skipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardWarning)
        assert main(["--config", str(TOY), f"run_dir={tmp_path / 'run0'}", "trainer.progress_bar=false",
                     "trainer.accelerator=cpu", "stage=ar", "ar.train.max_steps=2", "ar.token_cache=true",
                     "ar.token_cache_size=40", "data.source=shards", f"data.shards={tmp_path / 'data' / 'train-*.tar'}",
                     "data.num_classes=0", "data.num_workers=0"]) == 0
    skipped = load_checkpoint(tmp_path / "run0" / "ar" / "final.ckpt")["hyper_parameters"]["data_skipped"]
    assert skipped["train_bad_samples"] > 0 and skipped["train_bad_shards"] > 0, skipped
    assert f"[ar] data: skipped {skipped['train_bad_samples']} corrupt sample(s)" in capsys.readouterr().out


@pytest.mark.parametrize("in_a_job", [False, True], ids=["workstation", "job-without-srun"])
def test_lightnings_srun_hint_only_inside_a_slurm_job(tmp_path, monkeypatch, in_a_job):
    """Lightning says "prepend your python command with `srun`" whenever srun is installed: outside a SLURM job (a
    workstation, a login node) that is noise at every run and is silenced; inside a job that forgot srun it stays."""
    import warnings

    import lightning_fabric.plugins.environments.slurm as fabric_slurm
    import pytorch_lightning as pl
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from hybrid.lit.runner import _quiet_fit, build_trainer

    monkeypatch.setattr(fabric_slurm.shutil, "which", lambda name: f"/usr/bin/{name}")  # srun installed
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    if in_a_job:
        monkeypatch.setenv("SLURM_JOB_ID", "42")
    cfg = load_config(str(TOY), [f"run_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.progress_bar=false"])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        build_trainer(cfg, "tokenizer")
        with _quiet_fit(pl.LightningModule()):
            SLURMEnvironment.detect()  # what Trainer.fit calls when it looks for an hpc checkpoint
    hints = [w for w in said if "The `srun` command is available on your system but is not used" in str(w.message)]
    assert bool(hints) == in_a_job, [str(w.message) for w in said]


def _schedule_probe(config):
    """An AR-stage StageModule with one parameter: what its configure_optimizers schedules."""
    import torch

    from hybrid.lit.base import StageModule

    class Probe(StageModule):
        stage = "ar"

        def __init__(self, config):
            super().__init__(config)
            self.w = torch.nn.Parameter(torch.zeros(3))

    return Probe(config)


@pytest.mark.parametrize("final", [None, 1.0, 0.0])
def test_the_learning_rate_warms_up_then_decays_to_lr_final(final):
    """AdamW's schedule: linear warm-up to train.lr, then a cosine decay to lr * train.lr_final at max_steps (0.1 by
    default, 1 = constant); an lr_final outside [0, 1] is a config error naming the key."""
    import math

    from hybrid.config import to_dict

    extra = [] if final is None else [f"ar.train.lr_final={final}"]
    cfg = load_config(str(TOY), ["ar.train.lr=0.01", "ar.train.warmup_steps=4", "ar.train.max_steps=20", *extra])

    optim = _schedule_probe(to_dict(cfg)).configure_optimizers()
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])  # after max_steps updates
    end = 0.1 if final is None else final
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert lrs[-1] == pytest.approx(0.01 * end) and lrs[12] == pytest.approx(0.01 * (end + (1 - end) / 2))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # never rises after the warm-up
    assert math.isclose(min(lrs[3:]), 0.01 * end)
    with pytest.raises(ConfigError, match="ar.train.lr_final"):
        load_config(str(TOY), ["ar.train.lr_final=1.5"])


def test_with_no_step_limit_the_learning_rate_decays_over_max_minutes(monkeypatch):
    """max_steps -1 with max_minutes: the cosine runs over the time limit, read from Lightning's Timer (restored at
    a resume). It used to take max(1, -1) = 1 step as the horizon, so every step after the warm-up ran at
    lr x lr_final."""
    from pytorch_lightning.callbacks import Timer

    from hybrid.config import to_dict

    cfg = load_config(str(TOY), ["ar.train.lr=0.01", "ar.train.warmup_steps=2", "ar.train.max_steps=-1",
                                 "ar.train.max_minutes=10"])

    elapsed = {"s": 0.0}
    timer = Timer(duration={"minutes": 10})
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": elapsed["s"])
    probe = _schedule_probe(to_dict(cfg))
    probe._trainer = types.SimpleNamespace(callbacks=[timer])
    optim = probe.configure_optimizers()
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    lrs = {}
    for step, seconds in enumerate([0, 0, 300, 600, 900]):  # the warm-up's end, then none, half, all and past
        elapsed["s"] = seconds
        opt.step()
        sched.step()
        lrs[step + 1] = opt.param_groups[0]["lr"]
    assert lrs[1] == pytest.approx(0.01)  # the warm-up's end, by steps as before
    assert lrs[2] == pytest.approx(0.01)  # no time spent: the peak (was 0.001 here)
    assert lrs[3] == pytest.approx(0.01 * (0.1 + 0.9 / 2))  # half of max_minutes: half way down the cosine
    assert lrs[4] == pytest.approx(0.001) and lrs[5] == pytest.approx(0.001)  # lr x lr_final at the limit, and after


def test_a_slurm_job_requeued_before_it_set_its_plan_aside_still_retrains(tmp_path, monkeypatch, capsys):
    """A retrain=true job that SLURM requeues before its first start got as far as setting the plan aside (a node
    lost at launch) used to take SLURM_RESTART_COUNT > 0 for "set aside already" and silently skip the finished
    stages it was asked to replace. The start that sets a stage aside now records it in the run dir (per job and
    stage); the job's later starts go on from there, and every rank of that start (reading the record before or
    after rank 0 writes it) retrains."""
    from hybrid.checkpoints import CheckpointError, final_path
    from hybrid.experiment import main
    from hybrid.lit.runner import retraining, set_aside_for_retrain

    for key in ("SLURM_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NAME", "RANK",
                "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    run = tmp_path / "run"
    base = ["--config", str(TOY), f"run_dir={run}", "trainer.progress_bar=false", "trainer.accelerator=cpu",
            "stage=tokenizer", "tokenizer.train.max_steps=2"]
    assert main(base) == 0  # the stage the job will be asked to replace
    first = final_path(run, "tokenizer").read_bytes()
    record = run / ".retrain-set-aside-slurm-4242-tokenizer"

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # its first start never ran far enough
    cfg = load_config(str(TOY), [f"run_dir={run}", "retrain=true"])
    assert retraining(cfg, "tokenizer")
    monkeypatch.setenv("SLURM_PROCID", "1")  # another rank neither sets aside nor records (it waits for rank 0)
    set_aside_for_retrain(cfg, "ar")
    assert not list(run.glob(".retrain-set-aside-*"))
    monkeypatch.delenv("SLURM_PROCID")
    assert main([*base, "retrain=true", "seed=1"]) == 0
    assert "retrain=true: the previous" in capsys.readouterr().out
    assert len(list(run.glob("tokenizer.before-retrain-*"))) == 1 and final_path(run, "tokenizer").read_bytes() != first
    assert record.read_text() == "1\n"
    assert retraining(cfg, "tokenizer")  # the other ranks of this start, reading the record after rank 0 wrote it

    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # requeued again: goes on
    assert not retraining(cfg, "tokenizer")
    assert retraining(cfg, "ar")  # a stage this job has not set aside yet (a later command of its script)
    assert main([*base, "retrain=true", "seed=1"]) == 0
    assert "exists: skipped" in capsys.readouterr().out
    assert len(list(run.glob("tokenizer.before-retrain-*"))) == 1

    record.write_text("garbage")  # never guessed (ranks guessing differently would train different stages)
    with pytest.raises(CheckpointError, match=f"cannot read the retrain record {record}"):
        retraining(cfg, "tokenizer")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # a new submission with retrain=true retrains
    assert retraining(cfg, "tokenizer")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert not retraining(cfg, "tokenizer")  # outside a job: only the first start (restart count unset or 0)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert retraining(cfg, "tokenizer")


def test_a_mistyped_oracle_path_fails_before_the_tokenizer_trains(tmp_path, monkeypatch, capsys):
    from hybrid.experiment import main

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    typo = tmp_path / "orcale.safetensors"
    assert main(["--config", str(TOY), f"run_dir={tmp_path / 'run'}", "trainer.progress_bar=false",
                 "trainer.accelerator=cpu", f"oracle.path={typo}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"oracle.path '{typo}' does not exist" in err[0], err
    assert not (tmp_path / "run" / "tokenizer").exists() and not typo.exists()


def test_a_cache_dir_that_cannot_hold_the_oracle_fails_before_anything_trains(tmp_path, monkeypatch, capsys):
    """Was the whole oracle trained, then FileExistsError (a file) or OSError (read-only) at its save: lost."""
    from hybrid.config import ConfigError, load_config
    from hybrid.eval.oracle import check_given_oracle_path, ensure_oracle, oracle_path
    from hybrid.experiment import main

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert main(["--config", str(TOY), f"run_dir={tmp_path / 'run'}", "trainer.progress_bar=false",
                 "trainer.accelerator=cpu", f"cache_dir={a_file}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: config key 'cache_dir' '{a_file}': the oracle cannot be "
                                               f"written to '{a_file}/oracle-") and f"'{a_file}' is a file" in err[0]
    assert not (tmp_path / "run" / "tokenizer").exists() and a_file.read_text() == "x"
    # a folder this process cannot write (root may write anywhere but on a read-only file system: simulated)
    cfg = load_config(TOY, [f"cache_dir={tmp_path / 'ro' / 'cache'}"])
    (tmp_path / "ro").mkdir()
    real_access = os.access
    read_only = (tmp_path / "ro", tmp_path / "ro" / "cache")
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) not in read_only and real_access(p, mode))
    ro = tmp_path / "ro" / "cache"
    with pytest.raises(ConfigError, match=re.escape(f"config key 'cache_dir' '{ro}': the oracle would be trained and "
                                                    f"then written to '{ro}/oracle-")):
        ensure_oracle(cfg, device="cpu")
    # the cached oracle there, retrained (stage=oracle retrain=true): its file exists, but it would be written again
    cached = oracle_path(cfg)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    check_given_oracle_path(cfg)  # only read: fine
    with pytest.raises(ConfigError, match=re.escape(f"config key 'cache_dir' '{ro}': the oracle would be trained")):
        check_given_oracle_path(cfg, training=True)
    monkeypatch.setattr(os, "access", real_access)
    check_given_oracle_path(cfg, training=True)  # writable again: fine


@pytest.mark.parametrize("devices", ["[0]", "-1", "'0,1'"])
def test_gpu_device_ids_on_the_cpu_fail_before_the_oracle_trains(tmp_path, monkeypatch, capsys, devices):
    """A Lightning TypeError naming no key, raised when the tokenizer's Trainer was built: after the oracle (which
    trains outside Lightning) had trained."""
    from hybrid.experiment import main

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["--config", str(TOY), f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                 "trainer.accelerator=cpu", f"trainer.devices={devices}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config key 'trainer.devices' is ") and "the CPU" in err[0], err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "tokenizer").exists()
    from hybrid.config import load_config
    from hybrid.lit.runner import check_trainer_devices

    for fine in ("auto", "2", "'3'"):  # process counts
        check_trainer_devices(load_config(TOY, ["trainer.accelerator=cpu", f"trainer.devices={fine}"]))
    for other in ("mps", "tpu", "gpu"):  # Lightning reads ids there: not this check's business (review finding)
        check_trainer_devices(load_config(TOY, [f"trainer.accelerator={other}", "trainer.devices=[0]"]))


def test_gpu_device_ids_do_not_stop_a_finished_run_from_being_evaluated_on_the_cpu(tmp_path):
    """A finished GPU run's config (devices=[0,1]) re-run for its evaluation on a CPU machine builds no Trainer."""
    from hybrid.config import load_config
    from hybrid.lit.runner import will_train

    cfg = load_config(TOY, [f"run_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=[0,1]"])
    assert [s for s in ("tokenizer", "ar", "refiner") if will_train(cfg, s)] == ["tokenizer", "ar", "refiner"]
    for stage in ("tokenizer", "ar", "refiner"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "final.ckpt").write_text("x")
    assert not any(will_train(cfg, s) for s in ("tokenizer", "ar", "refiner", "oracle", "eval"))
    cfg.retrain = True
    assert will_train(cfg, "ar")


def test_an_unwritable_run_dir_is_one_line(tmp_path, capsys):
    from hybrid.experiment import main

    (tmp_path / "file").write_text("not a folder")
    assert main(["--config", str(TOY), f"run_dir={tmp_path / 'file'}", "stage=tokenizer"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write the run's config to {tmp_path / 'file'}"), err
    assert not list(tmp_path.glob(".*.tmp-*")) and (tmp_path / "file").read_text() == "not a folder"
