"""DDP on 2 CPU processes (gloo) through the runner's Trainer and a real StageModule.

One SGD step on 2 processes with batch B each must equal one step on 1 process with batch 2B (and a
step computed by hand): DDP averages the ranks' gradients, so the global batch is 2B. The runner
states the global batch size. A NaN loss on one rank stops both ranks with the one-line error
instead of leaving the other rank waiting in an all-reduce.

The runs are subprocesses of this file (`python tests/test_ddp.py OUT DEVICES BATCH [NAN_RANK]`):
Lightning's DDP launcher starts rank 1 by re-running the script.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
B = 4  # per-process batch
LR = 0.5


def _data(n: int = 2 * B):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)  # x (N, 6), y (N, 3)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _run(out: Path, devices: int, batch: int, nan_rank: int = -1, compile_: bool = False, timed: bool = False) -> int:
    """One training step of a probe StageModule (MSE on fixed data, SGD) with the runner's Trainer; `timed`: instead,
    steps for 3 seconds (max_steps -1) with the stages' own AdamW and schedule, each rank writing its learning rates."""
    from torch.utils.data import DataLoader, Dataset

    from hybrid.config import load_config, to_dict
    from hybrid.lit.base import NonFiniteLossError, StageModule
    from hybrid.lit.runner import build_trainer

    cfg = load_config(str(ROOT / "configs/toy.yaml"), [
        f"run_dir={out}", "stage=ar", "trainer.accelerator=cpu", f"trainer.devices={devices}",
        f"trainer.strategy={'ddp' if devices > 1 else 'auto'}", "trainer.progress_bar=false",
        "ar.train.max_steps=1", f"ar.train.batch_size={batch}", "ar.train.grad_clip=0", "ar.train.ckpt_every=1",
        f"ar.train.lr={LR}", "trainer.precision=32-true",  # fp32: compared with an fp32 step by hand
        f"trainer.compile={str(compile_).lower()}",
        *(["ar.train.max_steps=-1", "ar.train.max_minutes=0.05", "ar.train.warmup_steps=1"] if timed else [])])

    class Probe(StageModule):
        stage = "ar"

        def __init__(self, config):
            super().__init__(config)
            self.model = _model()

        def compute_loss(self, batch):
            loss = F.mse_loss(self.model(batch["x"]), batch["y"])
            return (loss * float("nan") if self.global_rank == nan_rank else loss), {}

        def configure_optimizers(self):  # SGD: its step is proportional to the gradient (Adam's is not)
            if timed:  # the stages' own optimizer and schedule
                return super().configure_optimizers()
            return torch.optim.SGD(self.trainable_parameters(), lr=self.tcfg.lr)

        def on_train_batch_end(self, *args):
            super().on_train_batch_end(*args)
            if timed:
                lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    class Pairs(Dataset):
        def __init__(self):
            self.x, self.y = _data()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "y": self.y[i]}

    class Data(pl.LightningDataModule):
        source = "shards"  # as if read from shards, each rank's skipped-data counters differ: rank r skipped r + 1

        def train_dataloader(self):
            return DataLoader(Pairs(), batch_size=batch, shuffle=False)

        def skip_counts(self):
            r = self.trainer.global_rank
            return {"train_bad_samples": r + 1, "train_bad_shards": 10 * (r + 1), "val_bad_samples": 0,
                    "val_bad_shards": 0}

    lrs: list[float] = []
    module = Probe(to_dict(cfg))
    trainer = build_trainer(cfg, "ar")
    try:  # Lightning gives each rank a DistributedSampler (no shuffle): rank r gets samples r, r + 2, ...
        trainer.fit(module, datamodule=Data())
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    if trainer.global_rank == 0:
        torch.save(module.model.state_dict(), out / "weights.pt")
    if timed:
        (out / f"lrs-{trainer.global_rank}.json").write_text(json.dumps(lrs))
    return 0


def _train(tmp_path: Path, name: str, devices: int, batch: int, nan_rank: int = -1, compile_: bool = False,
           timed: bool = False):
    out = tmp_path / name
    out.mkdir()
    return out, subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out), str(devices), str(batch),
                                str(nan_rank), str(int(compile_)), str(int(timed))], cwd=ROOT, capture_output=True,
                               text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])  # trainer.compile under DDP too
def test_two_processes_with_batch_b_step_like_one_with_batch_2b(tmp_path, compile_):
    one, single = _train(tmp_path, "one", devices=1, batch=2 * B, compile_=compile_)
    two, ddp = _train(tmp_path, "two", devices=2, batch=B, compile_=compile_)
    for proc in (single, ddp):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"[ar] global batch size {2 * B} ({2 * B} per device x 1 device(s) x 1)" in single.stdout
    assert f"[ar] global batch size {2 * B} ({B} per device x 2 device(s) x 1)" in ddp.stdout
    assert ("[ar] trainer.compile: compiling" in ddp.stdout) == compile_
    # the skipped-data report sums every rank's counters
    assert "[ar] data: skipped 1 corrupt sample(s) and 10 unreadable shard(s) in training," in single.stdout
    assert "[ar] data: skipped 3 corrupt sample(s) and 30 unreadable shard(s) in training," in ddp.stdout
    w1 = torch.load(one / "weights.pt", weights_only=True)
    w2 = torch.load(two / "weights.pt", weights_only=True)

    model = _model()  # the step by hand: the gradient of the mean loss over all 2B samples
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    F.mse_loss(model(x), y).backward()
    by_hand = {k: start[k] - LR * p.grad for k, p in model.named_parameters()}
    for k in by_hand:
        assert not torch.allclose(w1[k], start[k]), k  # the step moved the weights
        torch.testing.assert_close(w1[k], by_hand[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w2[k], by_hand[k], rtol=1e-5, atol=1e-6)
    # the DDP run wrote its checkpoint through the runner's atomic writer (no temporary files left)
    assert sorted(p.name for p in (two / "ar" / "checkpoints").iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_nan_on_one_rank_stops_both_ranks(tmp_path):
    _, proc = _train(tmp_path, "nan", devices=2, batch=B, nan_rank=1)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert any("stage ar: non-finite loss at step 0 (rank 1: nan)" in line for line in errors), proc.stderr[-4000:]
    assert any("stage ar: non-finite loss at step 0 (on another rank" in line for line in errors), proc.stderr[-4000:]
    assert all("last good checkpoint: none" in line for line in errors), errors


@pytest.mark.slow
def test_on_a_time_limit_every_rank_follows_rank_0_s_clock(tmp_path):
    """max_steps -1: the decay runs over max_minutes by the clock; each rank's own clock would give the replicas
    slightly different learning rates, so rank 0's is broadcast."""
    out, proc = _train(tmp_path, "timed", devices=2, batch=B, timed=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    first, second = (json.loads((out / f"lrs-{r}.json").read_text()) for r in (0, 1))
    assert len(first) > 3 and first == second  # the same learning rate at every step, bit for bit
    assert LR > first[0] > first[-1] >= LR * 0.1  # down from the peak, by the clock, towards lr x lr_final


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    out_dir, n_devices, batch_size, nan_at, compiled, timed_ = sys.argv[1:7]
    code = _run(Path(out_dir), int(n_devices), int(batch_size), int(nan_at), bool(int(compiled)), bool(int(timed_)))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
