"""The SLURM requeue callback (hybrid/lit/slurm.py) in one process, without a cluster (fast).

The real thing, with srun, 2 DDP ranks, `scancel --signal=USR1` and a requeued job, is in
tests/test_slurm.py (slow).
"""

from __future__ import annotations

import os
import signal

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hybrid.lit.slurm import SlurmRequeue, SlurmRequeued, drop_older_hpc_checkpoints, hpc_checkpoint_path


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, 4), (B, 1)
        return (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen)),
                          batch_size=4)


class _SignalAt(pl.Callback):
    """Sends SIGUSR1 to this process in the middle of the fit, as SLURM would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def _fit(tmp_path, max_steps: int = 6):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=[_SignalAt(2), SlurmRequeue()],
        default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Tiny())
    return trainer


@pytest.fixture
def no_slurm_job(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)


def test_hpc_checkpoint_path_counts_up(tmp_path):
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_1.ckpt").touch()
    (tmp_path / "hpc_ckpt_7.ckpt").touch()
    (tmp_path / "hpc_ckpt_x.ckpt").touch()
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_8.ckpt"


def test_signal_saves_at_the_step_boundary_and_training_goes_on_without_a_job(tmp_path, no_slurm_job):
    before = signal.getsignal(signal.SIGUSR1)
    trainer = _fit(tmp_path)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    assert hpc.is_file()
    assert torch.load(hpc, weights_only=True)["global_step"] == 3  # saved after the signalled step's update
    assert trainer.global_step == 6  # no job to requeue: it trains on
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is removed after the fit


def test_requeued_job_exits_without_finishing(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    scontrol = bin_dir / "scontrol"  # records the call and succeeds, like `scontrol requeue <id>`
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(SlurmRequeued):
            _fit(tmp_path / "run")
    finally:
        signal.signal(signal.SIGUSR1, before)  # a fit that raised leaves the flag-only handler installed
    assert calls.read_text().split() == ["requeue", "4242"]
    assert torch.load(tmp_path / "run" / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 3


def test_a_new_hpc_checkpoint_replaces_the_older_ones(tmp_path, no_slurm_job):
    """Each requeue saves a full training state: once the new one is written, the older ones are deleted, so a job
    requeued many times keeps one file, not one per requeue. Files that are not hpc checkpoints stay."""
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "hpc_ckpt_x.ckpt", "last.ckpt"):
        (tmp_path / name).write_bytes(b"stale")
    _fit(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["hpc_ckpt_3.ckpt", "hpc_ckpt_x.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "hpc_ckpt_3.ckpt", weights_only=True)["global_step"] == 3
    assert (tmp_path / "last.ckpt").read_bytes() == b"stale"


def test_older_hpc_checkpoints_stay_until_the_new_one_exists(tmp_path):
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"older")
    assert drop_older_hpc_checkpoints(tmp_path / "hpc_ckpt_2.ckpt") == []  # not written (e.g. the save failed)
    assert (tmp_path / "hpc_ckpt_1.ckpt").is_file()
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(b"newer")
    assert drop_older_hpc_checkpoints(tmp_path / "hpc_ckpt_2.ckpt") == [tmp_path / "hpc_ckpt_1.ckpt"]
    assert [p.name for p in tmp_path.iterdir()] == ["hpc_ckpt_2.ckpt"]
