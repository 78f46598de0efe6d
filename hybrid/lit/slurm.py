"""SLURM time-limit handling: save and requeue at a step boundary, not inside a signal handler.

`slurm/train.sbatch` asks SLURM for `--signal=SIGUSR1@90 --requeue`. Lightning's own auto-requeue
(`SLURMEnvironment(auto_requeue=True)`) saves the hpc checkpoint *inside* the SIGUSR1 handler, i.e.
after whatever bytecode each rank happened to be running. Under DDP one rank can then enter the
checkpoint's barrier while another is still blocked in a gradient all-reduce, and the job hangs
until SLURM kills it, with no checkpoint and no requeue (measured on the toy tokenizer; see
Lightning-AI/pytorch-lightning#21406). Here the handler only sets a flag; at the end of the next
optimizer step all ranks agree on it (one tiny all-reduce per step), save
`<default_root_dir>/hpc_ckpt_<n>.ckpt` together, rank 0 deletes the older ones (one full training state per
requeue would pile up otherwise) and runs `scontrol requeue $SLURM_JOB_ID`, and
every rank leaves with `SlurmRequeued` so the stage does not write a final checkpoint it has not
earned. The requeued job (same job id, same run dir) resumes from the newest hpc checkpoint, which the
runner names as `ckpt_path` (`runner.resume_path`: it is newer than last.ckpt).

Use `slurm_trainer_kwargs()` in the Trainer: under `srun` it gives Lightning's SLURM environment
with its in-handler requeue switched off, plus this callback; elsewhere nothing.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1


class SlurmRequeued(SystemExit):
    """Raised on every rank after the hpc checkpoint is saved and the job is requeued."""


def slurm_trainer_kwargs() -> dict:
    """`plugins`/`callbacks` for a Trainer under `srun` (empty when not running as a SLURM task)."""
    if not SLURMEnvironment.detect():
        return {"plugins": [], "callbacks": []}
    return {"plugins": [SLURMEnvironment(auto_requeue=False)], "callbacks": [SlurmRequeue()]}


def _hpc_number(path: Path) -> int | None:
    m = re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", path.name)
    return int(m.group(1)) if m else None


def hpc_checkpoint_path(root: str | os.PathLike) -> Path:
    """The next `hpc_ckpt_<n>.ckpt` in `root` (Lightning resumes from the highest n)."""
    numbers = [n for p in Path(root).glob("hpc_ckpt_*.ckpt") if (n := _hpc_number(p)) is not None]
    return Path(root) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def drop_older_hpc_checkpoints(newest: str | os.PathLike) -> list[Path]:
    """Deletes the hpc checkpoints beside `newest` with a lower number, once `newest` is written: each is a full
    training state, and a job requeued many times would otherwise keep one per requeue. Returns what it deleted."""
    newest = Path(newest)
    number = _hpc_number(newest)
    if number is None or not newest.is_file():
        return []
    dropped = []
    for p in newest.parent.glob("hpc_ckpt_*.ckpt"):
        if (n := _hpc_number(p)) is not None and n < number:
            try:
                p.unlink()
                dropped.append(p)
            except OSError as err:  # e.g. removed by hand meanwhile: never stop training over a stale file
                print(f"[slurm] could not delete the older hpc checkpoint {p}: {err}", flush=True)
    return sorted(dropped)


def _job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class SlurmRequeue(Callback):
    """On `REQUEUE_SIGNAL`: save an hpc checkpoint at the next optimizer step on all ranks, then requeue."""

    def __init__(self, sig: signal.Signals = REQUEUE_SIGNAL) -> None:
        self.sig = sig
        self.requested = False
        self._previous = None
        self._installed = False

    # -- the handler only records the request ---------------------------------------------------
    def _handle(self, signum, frame) -> None:
        self.requested = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before the data loaders start: forked workers inherit this harmless handler instead of dying
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.sig, self._handle)
            self._installed = True

    def _restore(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(self.sig, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # Not reached when the fit raises: Lightning's signal teardown then restores the handlers it
        # found after on_fit_start, i.e. this flag-only one, which stays (harmless) for the process.
        self._restore()

    # -- the work happens at a point every rank reaches in step --------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return  # mid-accumulation: wait for the optimizer step
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        path = trainer.strategy.broadcast(str(hpc_checkpoint_path(trainer.default_root_dir)), src=0)
        if trainer.is_global_zero:
            print(f"[slurm] requeue signal: saving {path} at step {trainer.global_step}", flush=True)
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(path)  # returns on every rank once the file is written (a barrier)
        if trainer.is_global_zero:
            drop_older_hpc_checkpoints(path)
        requeued = self._requeue() if trainer.is_global_zero else False
        requeued = trainer.strategy.broadcast(requeued, src=0)
        self.requested = False
        if requeued:
            raise SlurmRequeued(0)
        # not requeued (no scontrol, or --no-requeue): keep training; a new job with the same run dir resumes

    @staticmethod
    def _requeue() -> bool:
        job = _job_id()
        if not job:
            log.warning("requeue signal outside a SLURM job: saved the hpc checkpoint, not requeued")
            return False
        try:
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            print(f"[slurm] could not requeue job {job}: {err}", flush=True)
            return False
        if proc.returncode != 0:
            print(f"[slurm] `scontrol requeue {job}` failed ({proc.returncode}): {proc.stderr.strip()}", flush=True)
            return False
        print(f"[slurm] requeued job {job}; it resumes from the hpc checkpoint", flush=True)
        return True
