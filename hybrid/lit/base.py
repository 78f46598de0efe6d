"""What every stage's LightningModule shares.

- `StageModule`: saves the resolved config (plain dict) and the stage name as hyper-parameters, so
  `load_from_checkpoint(path)` needs nothing beside the file; AdamW with warm-up + cosine decay; the
  non-finite stop (a NaN/inf loss on any rank stops every rank before the step reaches the weights,
  and a checkpoint with non-finite weights is refused before it is written; the error names the
  stage, the step and the last good checkpoint on disk); per-step random generators derived from
  (seed, global step, rank), so noise does not depend on how often a run was interrupted; PNG grids
  in `<stage dir>/images/` (drawn eager); `trainer.compile` (the stage's `model` compiled for training).
- `TokenizerConsumer`: a stage that reads the frozen tokenizer (AR, refiner, diffusion). It keeps the
  tokenizer as a frozen submodule (so its checkpoint is self-contained) and records the tokenizer
  checkpoint's path and weight hash.
- `WarmupEMA`: Lightning's EMA weight averaging with a decay that warms up:
  decay_n = min(decay, (1 + n) / (warmup + n)); the first update is a plain copy.

Subclasses implement `compute_loss(batch) -> (loss, logs)` and optionally `preview_images()`.
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.callbacks.weight_averaging import WeightAveraging
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.utilities.enums import GradClipAlgorithmType

from hybrid.checkpoints import load_checkpoint, resumable_paths, sub_state_dict, weights_hash
from hybrid.config import from_dict
from hybrid.images import save_grid
from hybrid.models import build_tokenizer, with_pretrained_config
from hybrid.precision import resolve_compile


def eager():
    """A context that runs compiled modules eagerly (torch.compiler.set_stance, torch >= 2.6; elsewhere a
    no-op, and compiled modules may recompile for new shapes)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss (raised before the bad step touches the weights) or non-finite
    weights (raised before they are written to a checkpoint)."""


class StageModule(pl.LightningModule):
    stage: str = "?"

    def __init__(self, config: dict, **extra_hparams: Any) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config, "stage": self.stage, **extra_hparams})
        self.cfg = from_dict(config)
        self.tcfg = self.cfg[self.stage].train

    # -- to implement ---------------------------------------------------------------------------
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def preview_images(self) -> dict[str, torch.Tensor] | None:
        """Images in [-1, 1] to save as one PNG grid per key (rank 0, every `train.image_every` steps)."""
        return None

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    # -- shared ---------------------------------------------------------------------------------
    @property
    def stage_dir(self) -> Path:
        return Path(self.cfg.run_dir) / self.stage

    def step_generator(self, device: torch.device | str | None = None, salt: int = 0) -> torch.Generator:
        """A generator seeded from (seed, global step, rank, salt, micro-batch): resumable, different per rank
        and per micro-batch of an accumulated step (the global step advances once per optimizer step)."""
        device = torch.device(device or self.device)
        key = f"{self.cfg.seed}:{self.global_step}:{self.global_rank}:{salt}"
        if self._micro_batch:  # the first micro-batch keeps the key of a run without accumulation
            key += f":{self._micro_batch}"
        gen = torch.Generator(device=device)
        gen.manual_seed(zlib.crc32(key.encode()))
        return gen

    _micro_batch = 0  # which micro-batch of the current optimizer step (trainer.accumulate > 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._micro_batch = batch_idx % max(1, self.tcfg.accumulate)
        loss, logs = self.compute_loss(batch)
        self._stop_if_non_finite(loss)
        batch_size = _batch_size(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        for key, value in logs.items():
            self.log(f"train/{key}", value, batch_size=batch_size)
        return loss

    # -- non-finite stop ---------------------------------------------------------------------------
    def _stop_if_non_finite(self, loss: torch.Tensor) -> None:
        here = bool(torch.isfinite(loss.detach()).all())
        finite = here
        if self._trainer is not None:  # all ranks agree (one tiny all-reduce under DDP): every rank stops
            finite = self.trainer.strategy.reduce_boolean_decision(here, all=True)
        if not finite:
            value = loss.detach().float().mean().item()
            where = f"rank {self.global_rank}: {value}" if not here else f"on another rank than {self.global_rank}"
            raise NonFiniteLossError(
                f"stage {self.stage}: non-finite loss at step {self.global_step} ({where}); stopped before it "
                f"reached the weights; last good checkpoint: {self.last_good_checkpoint()}"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # runs after the callbacks' hooks: with EMA, state_dict holds the EMA and current_model_state the raw weights
        for key in ("state_dict", "current_model_state"):
            bad = [name for name, t in (checkpoint.get(key) or {}).items()
                   if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise NonFiniteLossError(
                    f"stage {self.stage}: non-finite weights at step {self.global_step} ({key}: {bad[0]}"
                    f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; learning rate too high?); not saved; "
                    f"last good checkpoint: {self.last_good_checkpoint()}"
                )

    def last_good_checkpoint(self) -> str:
        """The newest checkpoint of this stage on disk (last.ckpt or a SLURM hpc checkpoint) and its step."""
        existing = resumable_paths(self.cfg.run_dir, self.stage)
        if not existing:
            return "none (no checkpoint written yet)"
        path = max(existing, key=os.path.getmtime)
        try:
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", "?")
        except Exception:  # noqa: BLE001 - only for the message
            step = "?"
        return f"{path} (step {step})"

    # -- trainer.compile ---------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if resolve_compile(self.cfg):
            self.compile_for_training(fallback=self.cfg.trainer.compile == "auto")

    def compile_for_training(self, fallback: bool = False) -> bool:
        """`trainer.compile` (`auto`: see hybrid.precision): compiles the stage's network (`self.model`) in place
        with torch.compile, so the training forward and backward run compiled while the weights, the state dict
        and the checkpoints stay those of the plain module. Previews and validation run eager (`eager()`), so
        sampling shapes never trigger recompilation. Stages without a `model` (the tokenizer) train eager. With
        `fallback` (what `auto` asks for) a graph that fails to compile runs eager with a warning instead of
        stopping the run. Returns whether it compiled.
        """
        model = getattr(self, "model", None)
        if not isinstance(model, torch.nn.Module):
            print(f"[{self.stage}] trainer.compile: this stage has no network to compile; training eager")
            return False
        print(f"[{self.stage}] trainer.compile: compiling {type(model).__name__} (torch.compile); the first steps "
              "are slow while it compiles")
        if fallback:
            torch._dynamo.config.suppress_errors = True
        model.compile()
        return True

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.tcfg.image_every
        step = self.global_step
        if every > 0 and step % every == 0 and step > 0:
            self.write_previews()

    def on_train_end(self) -> None:
        self.write_previews()

    @torch.no_grad()
    def write_previews(self) -> None:
        if self.global_rank != 0:
            return
        was_training = self.training
        self.eval()
        try:
            with eager():
                images = self.preview_images()
        finally:
            self.train(was_training)
        for name, grid in (images or {}).items():
            save_grid(grid, self.stage_dir / "images" / f"{name}-{self.global_step:06d}.png")

    def configure_optimizers(self):
        # fused: one kernel for all parameters (the default per-parameter loop was ~20x slower on the CPU); not
        # under fp16's gradient scaler, which must unscale the gradients before they are clipped
        opt = torch.optim.AdamW(
            self.trainable_parameters(), lr=self.tcfg.lr, weight_decay=self.tcfg.weight_decay, betas=(0.9, 0.95),
            fused=not _scales_gradients(self._trainer),
        )
        warmup, total = max(1, self.tcfg.warmup_steps), max(1, self.tcfg.max_steps)
        final = self.tcfg.lr_final  # a checkpoint from before the key gets the schema default, 0.1, as before
        by_time = self.tcfg.max_steps == -1  # no step limit: the decay runs over max_minutes instead

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if by_time:
                progress = self._time_progress()
            else:
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return final + (1.0 - final) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _time_progress(self) -> float:
        """With `max_steps` -1: the fraction of `max_minutes` spent training, from the Trainer's Timer (which
        Lightning adds for `max_time` and restores at a resume), so the decay reaches lr x lr_final as time runs
        out (the clock starts with the fit, so the warm-up's seconds count too). Rank 0's clock decides on every rank:
        each rank's own would give the replicas slightly different learning rates. 0 outside a fit."""
        from pytorch_lightning.callbacks import Timer

        trainer = self._trainer
        timers = [c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, Timer)]
        if not timers:
            return 0.0
        progress = min(1.0, timers[0].time_elapsed("train") / (60.0 * self.tcfg.max_minutes))
        if getattr(trainer, "world_size", 1) > 1:  # the scheduler steps on every rank together
            progress = float(trainer.strategy.broadcast(progress, src=0))
        return progress

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning does, except under a mixed precision without a gradient scaler (bf16-mixed).

        Lightning's mixed-precision plugin refuses to clip for any fused optimizer, because under fp16's
        scaler the gradients would still be scaled at that point. bf16 has no scaler, so its gradients are
        the true ones and are clipped here directly; before this, every bf16-mixed run (the GPU default)
        stopped at its first step. Under FSDP the wrapped root module clips (never run here: FSDP needs GPUs).
        """
        mixed = isinstance(self.trainer.precision_plugin, MixedPrecision)
        by_norm = gradient_clip_algorithm in (None, GradClipAlgorithmType.NORM, "norm")
        if gradient_clip_val and by_norm and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's FSDP plugin refuses to clip by norm (it has no handle on the root module), and torch's
            # clip_grad_norm_ would see one shard's gradients: the wrapped root clips over all shards
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        if gradient_clip_val and by_norm and mixed and not _scales_gradients(self.trainer):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def _scales_gradients(trainer: pl.Trainer | None) -> bool:
    """Whether the trainer's precision scales the loss (fp16 mixed precision's GradScaler)."""
    plugin = getattr(trainer, "precision_plugin", None)
    return getattr(plugin, "scaler", None) is not None


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return value.shape[0]
    return None


def load_tokenizer(path: str | Path):
    """(tokenizer with trained weights, its config dict, its weight hash) from a tokenizer checkpoint. The config
    records a pretrained AutoencoderKL's architecture even when the checkpoint predates that (`tokenizer_config`
    of the stages that read it)."""
    ckpt = load_checkpoint(path, expect_stage="tokenizer")
    config = ckpt["hyper_parameters"]["config"]
    tokenizer = build_tokenizer(config, source=path)
    state = sub_state_dict(ckpt["state_dict"], "tokenizer")
    tokenizer.load_state_dict(state)
    tokenizer.requires_grad_(False).eval()
    return tokenizer, with_pretrained_config(config, tokenizer), weights_hash(state)


class TokenizerConsumer(StageModule):
    """Base of the stages that read the frozen tokenizer."""

    frozen_submodules = ("tokenizer",)  # kept in eval mode by train(); see runner.unexpected_eval_modules
    not_warm_started = ("tokenizer.",)  # init_from keeps this run's tokenizer (checkpoints.init_weights)

    def __init__(
        self,
        config: dict,
        tokenizer_path: str = "",
        tokenizer_hash: str | None = None,
        tokenizer_config: dict | None = None,
        **extra_hparams: Any,
    ) -> None:
        if tokenizer_config is None:  # a fresh run: read the tokenizer checkpoint
            tokenizer, tokenizer_config, tokenizer_hash = load_tokenizer(tokenizer_path)
        else:  # rebuilt from a checkpoint of this stage: the weights come with its state_dict
            tokenizer = build_tokenizer(tokenizer_config)
        super().__init__(
            config,
            tokenizer_path=str(tokenizer_path),
            tokenizer_hash=tokenizer_hash,
            tokenizer_config=tokenizer_config,
            **extra_hparams,
        )
        self.tokenizer = tokenizer.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()  # frozen: never update codebook statistics
        return self

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses to resume from a checkpoint of this stage trained on other tokenizer weights (the
        tokenizer was retrained since, or `tokenizer.checkpoint` changed): resuming would put the old
        tokenizer back while the stage records the new one. Runs before the weights are loaded."""
        super().on_load_checkpoint(checkpoint)
        recorded = (checkpoint.get("hyper_parameters") or {}).get("tokenizer_hash")
        current = self.hparams.get("tokenizer_hash")
        if recorded and current and recorded != current:
            from hybrid.checkpoints import CheckpointError

            raise CheckpointError(
                f"stage {self.stage}: the checkpoint to resume from was trained on tokenizer weights {recorded}, "
                f"but this run's tokenizer ({self.hparams.get('tokenizer_path', '?')}) has weights {current}; "
                f"retrain the stage on it (stage={self.stage} retrain=true), or move {self.stage_dir} aside"
            )

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("tokenizer.")]


def _warmup_ema(decay: float, warmup: float):
    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (warmup + n))
        return averaged + (current - averaged) * (1.0 - d)

    return avg_fn


class WarmupEMA(EMAWeightAveraging):
    """EMA weights (Lightning's weight averaging) with a warm-up of the decay; see the module docstring.

    Checkpoints hold the EMA weights in `state_dict` (the raw weights in `current_model_state`), so
    `load_from_checkpoint` and sampling use EMA weights. Not supported under FSDP (Lightning's weight
    averaging needs the full parameters on every rank): there the runner trains without EMA and says so.

    When training ends Lightning copies the average into the model, after which a checkpoint's
    `current_model_state` would be the average again and the raw weights of the final step would be
    lost (last.ckpt is from the last multiple of `ckpt_every`). They are kept aside at that moment
    and written as `current_model_state` by every later save, final.ckpt included, so EMA can be
    compared with the raw weights of the same step (benchmarks/refiner.py) and a run resumed from
    final.ckpt goes on from its raw weights, as from any other checkpoint.
    """

    def __init__(self, decay: float = 0.999, warmup: float = 10.0) -> None:
        WeightAveraging.__init__(self, use_buffers=True, avg_fn=_warmup_ema(decay, warmup))
        self.update_every_n_steps = 1
        self.update_starting_at_step = None
        self.update_starting_at_epoch = None
        self._final_raw: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._final_raw = None
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._final_raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)  # the average becomes the model's weights

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._final_raw is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._final_raw
