"""A stand-in for `train.py` with the real config, `main()` and stage runner, but a toy model and data.

`python tests/slurm_standin.py [--config FILE] [key=value ...]` behaves like `train.py` for a
trainable stage (Trainer from config, SLURM auto-requeue, `hpc_ckpt_*.ckpt` / `last.ckpt` resume,
`final.ckpt`), while the model is one linear layer on random vectors; the oracle and eval stages only
write `<run_dir>/<stage>/done.txt`. Each training step sleeps
`STANDIN_STEP_SECONDS` (default 0) so a test can signal a job in the middle of its fit.
It exists so the SLURM machinery can be tested independently of the stages' models.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hybrid.experiment as experiment  # noqa: E402
import hybrid.lit.runner as runner  # noqa: E402
from hybrid.config import to_dict  # noqa: E402
from hybrid.lit.base import StageModule  # noqa: E402


class _Vectors(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        gen = torch.Generator().manual_seed(i)
        return {"image": torch.randn(8, generator=gen)}  # (8,)


class _ToyData(pl.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Vectors(), batch_size=self.batch_size, shuffle=True, drop_last=True)


def _toy_module(stage_name: str):
    class ToyModule(StageModule):
        stage = stage_name

        def __init__(self, config: dict) -> None:
            super().__init__(config)
            self.net = nn.Linear(8, 8)
            self.step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0"))

        def compute_loss(self, batch: dict):
            if self.step_seconds:
                time.sleep(self.step_seconds)
            x = batch["image"]  # (B, 8)
            loss = (self.net(x) - x).pow(2).mean()
            return loss, {"rank": float(self.global_rank)}

    return ToyModule


def _build_module(cfg, stage: str):
    return _toy_module(stage)(to_dict(cfg))


def _build_datamodule(cfg, stage: str, module):
    return _ToyData(batch_size=min(cfg[stage].train.batch_size, 16))


def _run_stage(cfg, stage: str) -> None:
    if stage in ("oracle", "eval"):
        if int(os.environ.get("SLURM_PROCID", "0")) == 0:
            out = Path(cfg.run_dir) / stage / "done.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(f"{stage} done by job {os.environ.get('SLURM_JOB_ID')}\n")
        return
    runner.fit_stage(cfg, stage)


if __name__ == "__main__":
    runner.build_module = _build_module
    runner.build_datamodule = _build_datamodule
    experiment.run_stage = _run_stage
    sys.exit(experiment.main())
