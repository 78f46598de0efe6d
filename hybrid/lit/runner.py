"""Runs one training stage: builds the Trainer from config, resumes, writes the final checkpoint.

Resume rules (`resume_path`): the newer of the stage's newest SLURM requeue checkpoint (`hpc_ckpt_*.ckpt`
in the stage's root directory) and its `checkpoints/last.ckpt` (written atomically every
`train.ckpt_every` steps), named to `fit` as `ckpt_path`; else a fresh start.
A stage whose `final.ckpt` exists is skipped unless `retrain=true`, which first moves the stage's
folder aside (`<stage>.before-retrain-<time>`) and trains from scratch; `train.py` sets every stage of
its plan aside at once, at its start, so after an interruption the same command without `retrain=true`
goes on (finished stages skipped, the interrupted one resumed). A SLURM requeue of a `retrain=true` job goes on
in the same way once the stage was set aside (`retraining`).

Resume and faults: every checkpoint goes through `AtomicCheckpointIO` (a temporary file in the
target's folder, fsync, `os.replace`), so a SIGKILL at any moment leaves the previous complete
file; re-running the same command resumes from it (global step, optimizer, LR schedule, EMA, and
the data loader's place in the epoch), loaded with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, LambdaCallback, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from hybrid.checkpoints import (
    CheckpointError,
    final_path,
    hpc_paths,
    init_weights,
    last_path,
    load_checkpoint,
    resumable_paths,
    set_aside_copy,
    stage_dir,
    train_command,
    write_text_atomic,
)
from hybrid.config import ConfigError, to_dict
from hybrid.lit.slurm import slurm_trainer_kwargs
from hybrid.precision import resolve_precision, uses_gpu


class _DropLightningTip(logging.Filter):
    """Drops Lightning's "💡 Tip" advertising a cloud logger, said each time a Trainer is built."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropLightningTip())

TRAINABLE_STAGES = ("tokenizer", "ar", "refiner", "diffusion")


def build_module(cfg, stage: str):
    """The stage's LightningModule, fresh (the tokenizer-reading stages load the tokenizer here)."""
    config = to_dict(cfg)
    if stage == "tokenizer":
        from hybrid.lit.tokenizer import TokenizerModule

        return TokenizerModule(config)
    tokenizer = tokenizer_checkpoint(cfg)
    if stage == "ar":
        from hybrid.lit.ar import ARModule

        return ARModule(config, tokenizer_path=str(tokenizer))
    if stage in ("refiner", "diffusion"):
        from hybrid.lit.refiner import DiffusionModule, RefinerModule

        cls = RefinerModule if stage == "refiner" else DiffusionModule
        return cls(config, tokenizer_path=str(tokenizer))
    raise ValueError(f"stage '{stage}' has no training module; trainable stages: {', '.join(TRAINABLE_STAGES)}")


def tokenizer_checkpoint(cfg) -> Path:
    """The tokenizer checkpoint the later stages read: `tokenizer.checkpoint` (adopted into the run, so its
    evaluation and `sample.py --run` find it), else the run's own."""
    if cfg.tokenizer.checkpoint:
        return adopt_checkpoint(cfg, "tokenizer")
    path = final_path(cfg.run_dir, "tokenizer")
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer checkpoint at '{path}': train it first ({train_command(cfg.run_dir, 'stage=tokenizer')}) "
            "or set tokenizer.checkpoint=PATH"
        )
    return path


def tokenizer_weights_hash(path: str | os.PathLike) -> str:
    """The weights hash a tokenizer checkpoint's later stages record, read from its state dict (the tokenizer is
    not built); memoised per file version, since each stage's checks ask for it."""
    p = Path(path).resolve()
    st = p.stat()
    return _tokenizer_weights_hash(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _tokenizer_weights_hash(path: str, _mtime_ns: int, _size: int) -> str:
    from hybrid.checkpoints import load_checkpoint, sub_state_dict, weights_hash

    return weights_hash(sub_state_dict(load_checkpoint(path, expect_stage="tokenizer")["state_dict"], "tokenizer"))


def check_skipped_stage(cfg, stage: str, final: Path) -> str:
    """Before a finished stage is skipped: refuses it when it was trained on other tokenizer weights than
    the run's tokenizer now has (retrained since), and returns its settings that differ from this
    command's (`ar.width=32, not 64`; "" when none), so a changed setting is not silently ignored."""
    from hybrid.checkpoints import check_tokenizer_match, load_checkpoint

    ckpt = load_checkpoint(final, expect_stage=stage)
    if stage != "tokenizer":
        check_tokenizer_match(ckpt, tokenizer_weights_hash(tokenizer_checkpoint(cfg)), final)

    def flat(d, prefix):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    then = dict(flat(ckpt["hyper_parameters"]["config"].get(stage) or {}, f"{stage}."))
    now = dict(flat(to_dict(cfg)[stage], f"{stage}."))
    diffs = [f"{k}={then[k]!r}, not {now[k]!r}" for k in now if k in then and then[k] != now[k]]
    return "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")


def adopt_checkpoint(cfg, stage: str) -> Path:
    """`<stage>.checkpoint=PATH`: the stage comes from that file instead of being trained. It is checked (a
    checkpoint of this stage; for the later stages, trained on this run's tokenizer) and copied into the
    run as `<stage>/final.ckpt`, which later stages, the evaluation, `sample.py --run` and exports read,
    so the run directory holds every stage it was built from. A different `final.ckpt` already there is
    an error unless `retrain=true`, which sets the stage's folder aside first (as it does with what an
    interrupted training left there). Returns the source path (every rank reads it; rank 0 writes the copy)."""
    import filecmp
    import shutil

    from hybrid.checkpoints import CheckpointError, check_tokenizer_match, is_rank_zero, load_checkpoint

    source = Path(followed(cfg[stage].checkpoint, f"{stage}.checkpoint"))
    final = final_path(cfg.run_dir, stage)
    if source.is_file() and final.is_file() and filecmp.cmp(source, final, shallow=False):
        return source  # adopted before (and checked then)
    ckpt = load_checkpoint(source, expect_stage=stage)  # names the file when it is missing or not one
    if stage != "tokenizer":
        check_tokenizer_match(ckpt, tokenizer_weights_hash(tokenizer_checkpoint(cfg)), source)
    del ckpt
    if not is_rank_zero():
        return source
    if final.is_file() and not retraining(cfg, stage):
        raise CheckpointError(
            f"{stage}.checkpoint={source}, but this run already has another {stage} checkpoint ({final}); "
            f"use another run_dir, or add stage={stage} retrain=true to set {final.parent} aside and take {source}"
        )
    set_aside_for_retrain(cfg, stage)  # also what an interrupted training of this stage left
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, final)
    print(f"[{stage}] {stage}.checkpoint: {source} copied to {final} (not trained in this run)")
    return source


def build_datamodule(cfg, stage: str, module):
    make = getattr(module, "make_datamodule", None)
    if make is not None:
        return make()
    from hybrid.data.module import HybridDataModule

    return HybridDataModule.from_config(cfg.data, batch_size=cfg[stage].train.batch_size)


class _StageTimer(Callback):
    """Records the wall time of the fit and the global batch size in the module's log."""

    def __init__(self) -> None:
        self.start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.time()
        per_device = pl_module.tcfg.batch_size
        global_batch = per_device * trainer.world_size * trainer.accumulate_grad_batches
        if trainer.global_rank == 0:
            print(f"[{pl_module.stage}] global batch size {global_batch} "
                  f"({per_device} per device x {trainer.world_size} device(s) x {trainer.accumulate_grad_batches})")

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.hparams["train_minutes"] = (time.time() - self.start) / 60


def check_trainer_devices(cfg) -> None:
    """On the CPU, `trainer.devices` is a process count (>= 1, or auto): device ids and -1 are for GPUs (and MPS,
    TPU). Lightning said so only as a TypeError naming no key when the stage's Trainer was built; `train.py` checks
    it before its first stage when one will train (the oracle trains outside Lightning), `build_trainer` again for
    any caller. Checked here, on the machine that trains, not with the config: a login node without a GPU may
    submit a GPU job, and a finished GPU run's config may be evaluated on a CPU."""
    devices = cfg.trainer.devices
    acc = cfg.trainer.accelerator
    mps = getattr(torch.backends, "mps", None)
    on_cpu = acc == "cpu" or (acc == "auto" and not torch.cuda.is_available() and not (mps and mps.is_available()))
    if not on_cpu or devices == "auto" or (isinstance(devices, int) and devices >= 1):
        return
    if isinstance(devices, str) and devices.strip().isdigit() and int(devices) >= 1:
        return
    shown = devices if isinstance(devices, (int, str)) else list(devices)
    why = ", and this machine has no GPU" if acc == "auto" else ""
    raise ConfigError(f"config key 'trainer.devices' is {shown!r}, but the stages train on the CPU "
                      f"(trainer.accelerator={cfg.trainer.accelerator}{why}): there it is a process count >= 1 or "
                      f"auto; device ids and -1 are for GPUs")


def will_train(cfg, stage: str) -> bool:
    """Whether `fit_stage` would build a Trainer for `stage`: not when it adopts `<stage>.checkpoint`, nor when
    its final checkpoint exists and it is not being retrained."""
    if stage not in TRAINABLE_STAGES or cfg[stage].checkpoint:
        return False
    return retraining(cfg, stage) or not final_path(cfg.run_dir, stage).is_file()


class _SkipReport(Callback):
    """At the end of the fit, on your own shards: how much the stage's data skipped (corrupt samples, unreadable
    shards; counted at each read, since this fit started: a resumed stage counts from its resume), summed over the
    ranks, in the log and in the checkpoint's `data_skipped`. Each skip is also a
    ShardWarning naming the sample or shard when it happens; this is the total, which those lines (one per worker
    process, among the progress bar's) do not give."""

    def on_train_end(self, trainer, pl_module) -> None:
        data = trainer.datamodule
        if getattr(data, "source", None) != "shards" or not hasattr(data, "skip_counts"):
            return
        counts = data.skip_counts()
        keys = sorted(counts)
        total = torch.tensor([counts[k] for k in keys], dtype=torch.long, device=pl_module.device)
        if trainer.world_size > 1:  # every rank reaches on_train_end: each has its own counters
            total = trainer.strategy.reduce(total, reduce_op="sum")
        counts = dict(zip(keys, (int(v) for v in total.tolist())))
        pl_module.hparams["data_skipped"] = counts
        if trainer.global_rank == 0 and any(counts.values()):
            said = [f"{counts[f'{split}_bad_samples']} corrupt sample(s) and {counts[f'{split}_bad_shards']} "
                    f"unreadable shard(s) in {name}" for split, name in (("train", "training"), ("val", "validation"))
                    if counts[f"{split}_bad_samples"] or counts[f"{split}_bad_shards"]]
            print(f"[{pl_module.stage}] data: skipped {'; '.join(said)}, counted at each read since this fit "
                  f"started (training draws its shards again and again, and each validation reads them again, so one "
                  f"bad shard or sample can count many times; the ShardWarning lines name them)", flush=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file next to it, fsyncs it and renames it over the target.

    Lightning's own save goes through an fsspec transaction, which for local paths writes the
    temporary file into the system temp dir and `shutil.move`s it: on a node whose /tmp is another
    file system than the run dir (usual on clusters) that is a copy into the target, and a kill
    during the copy leaves a half-written checkpoint. `os.replace` within one folder is atomic.
    Remote (fsspec URL) paths keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


@contextlib.contextmanager
def _no_srun_hint_outside_a_job():
    """Lightning warns "The `srun` command is available on your system but is not used" whenever `srun` is on the
    PATH and the process is not an srun task: on a login node or a workstation with SLURM installed, every run. The
    hint is meant for a job script that forgot `srun`, so it stays inside a SLURM job (SLURM_JOB_ID set) and is
    silenced outside one."""
    with warnings.catch_warnings():
        if not os.environ.get("SLURM_JOB_ID"):
            warnings.filterwarnings("ignore", r"The `srun` command is available on your system but is not used",
                                    PossibleUserWarning)
        yield


def build_trainer(cfg, stage: str, extra_callbacks=()) -> pl.Trainer:
    with _no_srun_hint_outside_a_job():  # Lightning looks for srun when the Trainer is built (and at fit: _quiet_fit)
        return _build_trainer(cfg, stage, extra_callbacks)


def _build_trainer(cfg, stage: str, extra_callbacks=()) -> pl.Trainer:
    tcfg = cfg[stage].train
    sdir = stage_dir(cfg.run_dir, stage)
    callbacks = [
        ModelCheckpoint(
            dirpath=sdir / "checkpoints",
            filename="step{step:06d}",
            save_top_k=0,
            save_last=True,
            every_n_train_steps=max(1, tcfg.ckpt_every),
            save_on_train_epoch_end=False,
        ),
        _StageTimer(),
        _SkipReport(),
        *extra_callbacks,
    ]
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 50))

    # --- SLURM (slurm/train.sbatch, hybrid/lit/slurm.py) ---------------------------------------
    # Under srun: save the hpc checkpoint and requeue at a step boundary on SIGUSR1 (Lightning's own
    # in-handler save can deadlock DDP); rank 0 says where each (re)started fit begins, so a job's log
    # shows that a requeued job resumed from its hpc checkpoint instead of starting over.
    slurm = slurm_trainer_kwargs()
    callbacks.extend(slurm["callbacks"])

    def _say_start(trainer, _module) -> None:
        if trainer.global_rank == 0:
            print(f"[{stage}] fit starts at step {trainer.global_step}", flush=True)
            for logger in trainer.loggers:
                if isinstance(logger, AppendingCSVLogger):
                    logger.experiment.first_step = trainer.global_step  # rows from here on are trained again

    def _say_how_to_resume(trainer, module, exception) -> None:
        # Lightning answers Ctrl-C by exiting (sys.exit(1)) right after this hook, so the way back is said here
        if isinstance(exception, KeyboardInterrupt) and trainer.global_rank == 0:
            again = "the same command without retrain=true" if cfg.retrain else "the same command"
            last = module.last_good_checkpoint()
            how = "starts the stage over" if last.startswith("none") else "resumes from it"
            print(f"[{stage}] interrupted at step {trainer.global_step}; last checkpoint: {last}; re-running {again} "
                  f"{how}", flush=True)

    callbacks.append(LambdaCallback(on_train_start=_say_start, on_exception=_say_how_to_resume))
    # -------------------------------------------------------------------------------------------
    loggers = [AppendingCSVLogger(save_dir=str(cfg.run_dir), name=stage, version="logs")]
    try:
        import tensorboard  # noqa: F401
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(cfg.run_dir), name=stage, version="tb"))
    except ImportError:
        pass
    check_trainer_devices(cfg)
    strategy = cfg.trainer.strategy
    if strategy == "ddp" and not uses_gpu(cfg):
        from pytorch_lightning.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    return pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=strategy,
        precision=resolve_precision(cfg),
        max_steps=tcfg.max_steps,
        max_epochs=-1,
        max_time={"minutes": tcfg.max_minutes} if tcfg.max_minutes > 0 else None,
        gradient_clip_val=tcfg.grad_clip or None,
        accumulate_grad_batches=tcfg.accumulate,
        log_every_n_steps=max(1, tcfg.log_every),
        limit_val_batches=1.0 if tcfg.val_every > 0 else 0,
        val_check_interval=tcfg.val_every if tcfg.val_every > 0 else None,
        check_val_every_n_epoch=None if tcfg.val_every > 0 else 1,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        plugins=[*slurm["plugins"], AtomicCheckpointIO()],
        logger=loggers,
        default_root_dir=str(sdir),
        deterministic=deterministic_mode(cfg),
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
    )


def deterministic_mode(cfg) -> bool | str:
    """`trainer.deterministic` for the Trainer. On a GPU, "warn": CUDA has no deterministic backward for some
    ops the stages use (the tokenizer's bicubic upsampling), which would stop the run at its first step; they
    warn instead and everything else runs deterministically."""
    if cfg.trainer.deterministic and uses_gpu(cfg):
        return "warn"
    return bool(cfg.trainer.deterministic)


class _AppendingWriter(ExperimentWriter):
    """Keeps the rows a stage logged before an interruption: a resumed stage appends to metrics.csv
    (Lightning's writer deletes it when the log folder exists). The rows an interrupted fit logged from the
    step it resumes at (`first_step`, set when the fit starts: the checkpoint's step, 0 when it starts over)
    describe steps the resumed fit trains again; they are dropped when the resumed fit first writes, so the log
    holds one row per step, from the trajectory the final weights came from."""

    first_step: int | None = None

    def _check_log_dir_exists(self) -> None:
        self._resumed = self._fs.isfile(self.metrics_file_path)
        if self._resumed:
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def save(self) -> None:
        if self._resumed and self.metrics:
            self._resumed = False
            first = min(int(m["step"]) for m in self.metrics)
            if self.first_step is not None:
                first = min(first, self.first_step)
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                rows = list(csv.DictReader(f))
            kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < first]
            if len(kept) < len(rows):
                out = io.StringIO()
                writer = csv.DictWriter(out, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
                write_text_atomic(self.metrics_file_path, out.getvalue())
        super().save()


class AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def resume_path(cfg, stage: str) -> str | None:
    """The checkpoint a re-run resumes from (None = fresh): the newer of last.ckpt and the newest SLURM requeue
    checkpoint. The hpc checkpoint is named explicitly: Lightning picks it up by itself only inside a SLURM batch
    job, so a re-run on a workstation, a login node or in an interactive allocation (`scontrol` missing, or a
    Ctrl-C's save) started the stage again from step 0 (found by a review)."""
    last = last_path(cfg.run_dir, stage)
    hpc = hpc_paths(cfg.run_dir, stage)
    if hpc and not (last.is_file() and last.stat().st_mtime > hpc[-1].stat().st_mtime):
        return str(hpc[-1])
    return str(last) if last.is_file() else None  # a newer last.ckpt wins over a stale hpc checkpoint


def _set_aside_record(cfg, stage: str) -> Path | None:
    job = os.environ.get("SLURM_JOB_ID")
    return Path(cfg.run_dir) / f".retrain-set-aside-slurm-{job}-{stage}" if job else None


def retraining(cfg, stage: str) -> bool:
    """Whether `stage` starts fresh: `retrain=true`, until this command has set the stage aside. A SLURM requeue
    goes on after that instead: a finished stage is skipped and an interrupted one resumes, as in any requeued job.

    Inside a SLURM job, `set_aside_for_retrain` records the start (`SLURM_RESTART_COUNT`) that set the stage aside
    in a file in the run dir named by the job and the stage. Every rank of that start retrains, whether it reads the
    file before or after rank 0 writes it; a later start of the job goes on; and a job requeued before its first
    start got as far as the set-aside (a node lost at launch) still retrains instead of silently reusing the stage
    it was asked to replace. Outside a job: the first start (`SLURM_RESTART_COUNT` unset or 0) retrains."""
    from hybrid.checkpoints import CheckpointError

    if not cfg.retrain:
        return False
    start = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    record = _set_aside_record(cfg, stage)
    if record is None:
        return start == 0
    try:
        return int(record.read_text().strip()) == start
    except FileNotFoundError:  # this job has not set the stage aside yet
        return True
    except (OSError, ValueError) as err:  # never guessed: ranks guessing differently would train different stages
        raise CheckpointError(f"stage {stage}: cannot read the retrain record {record} ({err}); it should hold "
                              f"the SLURM restart count that set the stage aside (delete it to retrain the stage)"
                              ) from None


def followed(path: str, key: str) -> str:
    """`path`; when it no longer exists because it lay in a stage folder `retrain=true` set aside (e.g.
    `stage=ar retrain=true init_from=RUN/ar/final.ckpt`, warm-starting from the result being replaced), the
    same file in the newest `<folder>.before-retrain-*`. Works on every rank (no record is shared)."""
    if not path or Path(path).exists():
        return path
    moved = set_aside_copy(path)
    if moved is None:
        return path
    print(f"{key}={path} was set aside by retrain=true: reading {moved}")
    return str(moved)


def _stale_checkpoints(cfg, stage: str) -> list[Path]:
    final = final_path(cfg.run_dir, stage)
    return ([final] if final.is_file() else []) + resumable_paths(cfg.run_dir, stage)


def set_aside_for_retrain(cfg, stage: str, wait_minutes: float = 10.0) -> Path | None:
    """`retrain=true`: renames the stage's folder (checkpoints, logs, images) to
    `<stage>.before-retrain-<time>` so the stage starts fresh and nothing it wrote before is lost (or
    appended to); returns the new name, None when there was nothing to set aside. Rank 0 renames; the
    other ranks wait until its checkpoints are gone from the stage folder, so that none of them resumes
    from one (Lightning looks for a SLURM checkpoint before the ranks meet)."""
    from hybrid.checkpoints import CheckpointError, is_rank_zero, write_text_atomic

    sdir = stage_dir(cfg.run_dir, stage)
    if not is_rank_zero():
        deadline = time.time() + wait_minutes * 60
        while _stale_checkpoints(cfg, stage):
            if time.time() > deadline:
                raise CheckpointError(f"stage {stage}: rank 0 did not set {sdir} aside within {wait_minutes} min")
            time.sleep(0.5)
        return None
    aside = None
    if sdir.is_dir() and any(sdir.iterdir()):
        aside = sdir.with_name(f"{sdir.name}.before-retrain-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside = sdir.with_name(f"{sdir.name}.before-retrain-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            n += 1
        sdir.rename(aside)
        print(f"[{stage}] retrain=true: the previous {sdir} was moved to {aside}")
    record = _set_aside_record(cfg, stage)
    if record is not None and cfg.retrain:  # for `retraining`: this start of the job has set the stage aside
        write_text_atomic(record, f"{int(os.environ.get('SLURM_RESTART_COUNT') or 0)}\n")
    return aside


def unexpected_eval_modules(module: pl.LightningModule) -> list[str]:
    """Submodules left in eval mode by `module.train()` other than its declared frozen ones
    (`frozen_submodules`, e.g. the AR's and refiner's tokenizer)."""
    was_training = module.training
    module.train()
    frozen = tuple(getattr(module, "frozen_submodules", ()))
    names = [name for name, sub in module.named_modules() if not sub.training
             and not any(name == f or name.startswith(f + ".") for f in frozen)]
    module.train(was_training)
    return names


@contextlib.contextmanager
def _quiet_fit(module: pl.LightningModule):
    """Silences what Lightning says at every fit that is noise here, and nothing else:
    - "Found N module(s) in eval mode": the frozen tokenizer is so on purpose, so the warning is silenced when
      it is the only one; any other submodule in eval mode keeps it;
    - "You passed in a `val_dataloader` but have no `validation_step`": the stages without a validation step
      share the data module that gives the AR its validation batches;
    - torch's deprecation of `LeafSpec`, which Lightning's own pytree code trips;
    - Lightning's srun hint outside a SLURM job (`_no_srun_hint_outside_a_job`).
    (Lightning's "💡 Tip" for a cloud logger, said when a Trainer is built, is dropped by `_DropLightningTip`.)"""
    from pytorch_lightning.utilities.model_helpers import is_overridden

    with warnings.catch_warnings(), _no_srun_hint_outside_a_job():
        if not unexpected_eval_modules(module):
            warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode", PossibleUserWarning)
        if not is_overridden("validation_step", module):
            warnings.filterwarnings("ignore", r"You passed in a `val_dataloader` but have no `validation_step`")
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        yield


@contextlib.contextmanager
def _named_resume_mismatch(stage: str, ckpt_path: str | None, sdir: Path):
    """A resumed checkpoint whose weights do not fit the model (the config changed its shape since) is a
    CheckpointError naming the file and the way out, not torch's page of missing/unexpected keys."""
    from hybrid.checkpoints import CheckpointError

    try:
        yield
    except RuntimeError as err:
        if "Error(s) in loading state_dict" not in str(err):
            raise
        lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
        where = ckpt_path or f"the SLURM checkpoint in {sdir}"
        raise CheckpointError(
            f"stage {stage}: cannot resume from {where}: its weights do not fit the model this config builds "
            f"({'; '.join(lines)[:300]}); was a model setting changed since? Undo the change to resume, or "
            f"add stage={stage} retrain=true to train the stage again (the old folder is kept aside)"
        ) from None


def fit_stage(cfg, stage: str, callbacks=()) -> Path:
    """Trains `stage` (or skips it when its final checkpoint exists); returns the final checkpoint.

    `callbacks`: extra Lightning callbacks (benchmarks use them to measure during training).
    """
    final = final_path(cfg.run_dir, stage)
    if cfg[stage].checkpoint:
        adopt_checkpoint(cfg, stage)
        return final
    fresh = retraining(cfg, stage)
    if final.is_file() and not fresh:
        changed = check_skipped_stage(cfg, stage, final)
        print(f"[{stage}] {final} exists: skipped (stage={stage} retrain=true trains it again)")
        if cfg.init_from:
            print(f"[{stage}] note: init_from={cfg.init_from} was not used, since the stage is finished; add "
                  f"retrain=true to train it again from there, or give another name=/run_dir=")
        if changed:
            print(f"[{stage}] note: it was trained with other settings than this command's: {changed}; "
                  f"stage={stage} retrain=true trains it with this command's")
        return final
    if fresh:
        set_aside_for_retrain(cfg, stage)  # a no-op when train.py set the whole plan aside at its start
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, stage)
    ckpt_path = None if fresh else resume_path(cfg, stage)
    if ckpt_path:  # a damaged file is named here, not by a KeyError or an EOFError from inside Lightning's fit
        try:
            load_checkpoint(ckpt_path, expect_stage=stage)
        except CheckpointError as err:
            raise CheckpointError(f"stage {stage}: cannot resume: {err}; move that file out of "
                                  f"{stage_dir(cfg.run_dir, stage)} to resume from an older one (or from step 0 when "
                                  f"none is left), or add stage={stage} retrain=true to train the stage again (the "
                                  f"old folder is kept aside)") from None
    if cfg.init_from and ckpt_path is None:
        source = followed(cfg.init_from, "init_from")
        try:
            skipped = init_weights(module, source, stage, strict=cfg.init_strict)
        except CheckpointError as err:
            aside = sorted(stage_dir(cfg.run_dir, stage).parent.glob(f"{stage}.before-retrain-*"))
            if fresh and aside:  # the run's previous stage is not lost: say where it is
                raise CheckpointError(f"{err} (the run's previous {stage} stage is in {aside[-1]})") from None
            raise
        print(f"[{stage}] initialised from {source}" + (f" (skipped {len(skipped)} keys)" if skipped else ""))
    extra = list(module.extra_callbacks()) if hasattr(module, "extra_callbacks") else []
    extra.extend(callbacks)
    trainer = build_trainer(cfg, stage, extra)
    datamodule = build_datamodule(cfg, stage, module)
    if ckpt_path:
        print(f"[{stage}] resuming from {ckpt_path}")
    # weights_only: a resumed checkpoint runs no code (torch's default too; said here so it stays so)
    resumable = _named_resume_mismatch(stage, ckpt_path, stage_dir(cfg.run_dir, stage))
    with _quiet_fit(module), resumable:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.interrupted:
        again = "the same command without retrain=true" if cfg.retrain else "the same command"
        raise KeyboardInterrupt(f"stage {stage} was interrupted; re-run {again} to resume")
    trainer.save_checkpoint(final, weights_only=False)  # weights_only=False: full state; atomic (AtomicCheckpointIO)
    if trainer.global_rank == 0:
        print(f"[{stage}] done: {final}")
    return final
