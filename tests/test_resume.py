"""Resume and faults: mid-epoch resumable data, atomic checkpoint writes, safe resume loading, the
non-finite stop, and kill -9 at random steps (x3) + re-run == an uninterrupted run (refiner, with EMA)."""

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from hybrid.checkpoints import CheckpointError
from hybrid.data.module import EpochIndexSampler, ResumableLoader

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING_MID_EPOCH_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class _Ids(Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return i


def _loader(num_workers=0):
    sampler = EpochIndexSampler(1000, num_samples=5 * 4, seed=3)  # 5 batches of 4 per epoch
    return ResumableLoader(_Ids(), sampler, batch_size=4, num_workers=num_workers)


def _passes(loader, n):
    return [[b.tolist() for b in loader] for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_resumes_at_any_batch_with_the_same_batches(num_workers):
    epochs = _passes(_loader(), 4)  # each pass is the next epoch
    assert epochs[0] != epochs[1]
    plain = EpochIndexSampler(1000, num_samples=20, seed=3)
    for e, batches in enumerate(epochs):  # epoch e is the sampler's epoch e: (seed, epoch, rank) as before
        plain.set_epoch(e)
        assert [i for b in batches for i in b] == list(plain)
    for epoch, done in [(0, 1), (1, 3), (2, 4), (1, 5)]:
        loader = _loader()
        _passes(loader, epoch)
        it = iter(loader)
        for _ in range(done):
            next(it)
        state = loader.state_dict()
        assert state == ({"epoch": epoch, "batches": done} if done < 5 else {"epoch": epoch + 1, "batches": 0})
        # Lightning's order on resume: load_state_dict, iter() (workers draw indices now), set_epoch, next();
        # its set_epoch can lag after resuming at an epoch end, so the loader ignores it
        resumed = _loader(num_workers)
        resumed.load_state_dict(state)
        it = iter(resumed)
        resumed.sampler.set_epoch(0)
        rest = [b.tolist() for b in it]
        if done < 5:  # the rest of the epoch
            assert rest == epochs[epoch][done:], (epoch, done)
        else:  # saved after the epoch's last batch: the whole next epoch
            assert rest == epochs[epoch + 1], (epoch, done)
        following = state["epoch"] + 1
        assert resumed.state_dict() == {"epoch": following, "batches": 0}
        assert _passes(resumed, 1)[0] == epochs[following]  # the following epoch is whole


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_loader_resumes_at_any_batch_with_the_same_batches(tmp_path, num_workers):
    """The shard training loader is stateful too: resumed at any batch (workers or not), it hands out
    exactly the batches an uninterrupted run would have, then whole following epochs."""
    from hybrid.data.module import ShardLoader
    from hybrid.data.shards import TrainShards, write_procedural

    write_procedural(tmp_path, count=40, image_size=16, per_shard=10, split="train", progress=False)

    def loader(workers=0):
        stream = TrainShards(str(tmp_path / "train-*.tar"), batch_size=3, batches_per_epoch=5, seed=2,
                             shuffle_buffer=8, with_keys=True)
        return ShardLoader(stream, batch_size=3, num_workers=workers)

    def keys(batches):
        return [list(b["key"]) for b in batches]

    reference = loader(num_workers)
    epochs = [keys(reference) for _ in range(3)]  # each pass is the next epoch
    assert epochs[0] != epochs[1] and all(len(e) == 5 for e in epochs)
    for epoch, done in [(0, 2), (1, 3), (0, 5)]:
        first = loader(num_workers)  # (the data depends on the worker count, as in webdataset)
        for _ in range(epoch):
            keys(first)
        it = iter(first)
        for _ in range(done):
            next(it)
        state = first.state_dict()
        resumed = loader(num_workers)
        resumed.load_state_dict(state)
        rest = keys(resumed)
        assert rest == (epochs[epoch][done:] if done < 5 else epochs[epoch + 1]), (epoch, done)
        assert keys(resumed) == epochs[state["epoch"] + 1]


def test_atomic_checkpoint_io_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    from hybrid.lit.runner import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((Path(a), Path(b))), real_replace(a, b)))
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    (src, dst), = replaced
    assert dst == target and src.parent == target.parent and src.name.startswith(".last.ckpt.tmp-")  # same folder
    assert not src.exists()

    (target.parent / ".last.ckpt.tmp-999999").write_bytes(b"half")  # left by a process killed while writing
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        f.truncate(10)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))  # the previous file, complete
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary files left


def _toy_cfg(tmp_path, *overrides):
    from hybrid.config import load_config

    return load_config(str(ROOT / "configs/toy.yaml"), [
        f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "trainer.progress_bar=false",
        "trainer.accelerator=cpu", "data.val_size=8", "tokenizer.train.batch_size=4", *overrides])


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_resume_never_runs_code_from_the_checkpoint(tmp_path):
    """The runner resumes from last.ckpt with weights_only=True: a crafted pickle is refused unrun."""
    from hybrid.checkpoints import last_path
    from hybrid.lit.runner import fit_stage

    marker = tmp_path / "code-ran"
    cfg = _toy_cfg(tmp_path, "stage=tokenizer", "tokenizer.train.max_steps=2")
    last = last_path(cfg.run_dir, "tokenizer")
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 1, "payload": _RunsCode(marker)}, last)
    with pytest.raises(CheckpointError, match=re.escape(f"stage tokenizer: cannot resume: '{last}' is not a safe "
                                                        f"checkpoint: it needs code to unpickle and was refused")):
        fit_stage(cfg, "tokenizer")  # was pickle.UnpicklingError from inside Lightning's load; now checked first
    assert not marker.exists() and last.is_file()


def _finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point())


def test_non_finite_loss_stops_naming_stage_step_and_last_checkpoint(tmp_path, monkeypatch, capsys):
    from hybrid.experiment import main
    from hybrid.lit.tokenizer import TokenizerModule

    real = TokenizerModule.compute_loss

    def nan_at_step_3(self, batch):
        loss, logs = real(self, batch)
        return (loss * float("nan") if self.global_step >= 3 else loss), logs

    monkeypatch.setattr(TokenizerModule, "compute_loss", nan_at_step_3)
    run = tmp_path / "run"
    rc = main(["--config", str(ROOT / "configs/toy.yaml"), f"run_dir={run}", "stage=tokenizer",
               "trainer.progress_bar=false", "trainer.accelerator=cpu", "tokenizer.train.batch_size=4",
               "tokenizer.train.max_steps=20", "tokenizer.train.ckpt_every=2", "data.val_size=8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    last = run / "tokenizer" / "checkpoints" / "last.ckpt"
    line = err[-1]
    assert line.startswith("error: stage tokenizer: non-finite loss at step 3"), line
    assert f"last good checkpoint: {last} (step 2)" in line, line
    assert not (run / "tokenizer" / "final.ckpt").exists()
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2 and _finite(ckpt["state_dict"])


# ------------------------------------------------------------------------------------------------
# subprocess runs of train.py (slow)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("tok")
    out = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/toy.yaml", f"run_dir={base}", "stage=tokenizer",
         "tokenizer.train.max_steps=1", "tokenizer.train.batch_size=4", "data.val_size=8",
         "trainer.progress_bar=false", "trainer.accelerator=cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return base / "tokenizer" / "final.ckpt"


MAX_STEPS = 40  # kill targets lie in the first half: a watcher that sees checkpoints late still kills mid-run
KILLS = 3


def _refiner_cmd(run_dir, tokenizer, *extra):
    return [sys.executable, "train.py", "--config", "configs/toy.yaml", f"run_dir={run_dir}", "stage=refiner",
            f"tokenizer.checkpoint={tokenizer}", f"refiner.train.max_steps={MAX_STEPS}", "refiner.train.batch_size=32",
            "refiner.train.ckpt_every=1", "refiner.train.log_every=1", "refiner.train.warmup_steps=3",
            "data.batches_per_epoch=4", "trainer.deterministic=true", "trainer.progress_bar=false",
            "trainer.accelerator=cpu", *extra]


def _stamp(path: Path):
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None


def _step_of(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except FileNotFoundError:
        return None


def _losses(run_dir) -> dict[int, float]:
    with open(Path(run_dir) / "refiner" / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow
def test_kill_at_random_steps_and_rerun_matches_an_uninterrupted_run(tokenizer_ckpt, tmp_path):
    seed = int(os.environ.get("HYBRID_RESUME_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    why = f"(HYBRID_RESUME_SEED={seed} draws the same kill targets and delays)"
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    with open(tmp_path / "ref.txt", "w") as ref_log:  # alongside the killed runs (it is deterministic too)
        ref = subprocess.Popen(_refiner_cmd(ref_dir, tokenizer_ckpt), cwd=ROOT, stdout=ref_log,
                               stderr=subprocess.STDOUT)

    last = run_dir / "refiner" / "checkpoints" / "last.ckpt"
    cmd = _refiner_cmd(run_dir, tokenizer_ckpt)
    resumed_from = []
    # seconds per step, measured from the checkpoints each run writes and carried to the next; a run that shows
    # one checkpoint before its target keeps the last estimate (a fixed 0.2 s guess outlasted the 3+ steps a
    # target leaves when steps took ~30 ms: the run finished before its kill)
    step_time = 0.01
    for n in range(KILLS):
        start = (resumed_from or [0])[-1]  # each kill leaves room for the next ones (a kill can overshoot a step)
        target = rng.randint(start + 1, start + max(1, (MAX_STEPS // 2 - start) // (KILLS - n)))
        with open(tmp_path / f"out{n}.txt", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            seen, deadline = None, time.time() + 300
            written, stamp = {}, None  # step -> when this run's checkpoint of it was first seen: the step time
            try:
                while time.time() < deadline and proc.poll() is None:
                    new = _stamp(last)
                    step, stamp = (_step_of(last) if new != stamp else None), new
                    if step is not None and step > start:
                        written.setdefault(step, time.time())
                        if step >= target:
                            seen = step
                            break
                    time.sleep(0.02)
                steps = sorted(written)
                if len(steps) > 1:
                    step_time = min(1.0, (written[steps[-1]] - written[steps[0]]) / (steps[-1] - steps[0]))
                time.sleep(rng.uniform(0.0, 0.9) * step_time)  # land anywhere in the next step or checkpoint write
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        output = (tmp_path / f"out{n}.txt").read_text()
        assert proc.returncode == -signal.SIGKILL and seen is not None, f"{why} target {target}\n{output[-3000:]}"
        if resumed_from:
            assert f"fit starts at step {resumed_from[-1]}" in output, why
            assert LIGHTNING_MID_EPOCH_WARNING not in output, why
        step = _step_of(last)  # the checkpoint on disk is complete (loads) and not older than what we saw
        assert step is not None and step >= seen, why
        resumed_from.append(step)
    final = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = final.stdout + final.stderr
    assert final.returncode == 0, output[-3000:]
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.txt").read_text()[-3000:]
    assert f"resuming from {last}" in output and f"fit starts at step {resumed_from[-1]}" in output, why
    assert LIGHTNING_MID_EPOCH_WARNING not in output, why

    # the same losses (the final one included), raw weights, EMA weights and optimizer state
    ref_losses, losses = _losses(ref_dir), _losses(run_dir)
    assert max(losses) == MAX_STEPS - 1 and set(losses) <= set(ref_losses)
    for step, loss in losses.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), f"{why} step {step}"
    a = torch.load(ref_dir / "refiner" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    for key in ("state_dict", "current_model_state", "averaging_state"):  # EMA, raw weights, EMA count
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{why} {k}: {m}")
    torch.testing.assert_close(b["optimizer_states"], a["optimizer_states"], rtol=1e-5, atol=1e-6)
    assert b["lr_schedulers"] == a["lr_schedulers"]
    fa = torch.load(ref_dir / "refiner" / "final.ckpt", weights_only=True)
    fb = torch.load(run_dir / "refiner" / "final.ckpt", weights_only=True)
    torch.testing.assert_close(fb["state_dict"], fa["state_dict"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_infinite_learning_rate_never_writes_non_finite_weights(tokenizer_ckpt, tmp_path):
    """lr=1e39 (the config refuses inf itself; this is finite as a double, beyond float32): step 0's loss is finite
    but its update makes every weight non-finite; the checkpoint after it is refused."""
    run_dir = tmp_path / "run"
    out = subprocess.run(_refiner_cmd(run_dir, tokenizer_ckpt, "refiner.train.lr=1e39", "refiner.train.grad_clip=0"),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert lines[-1].startswith("error: stage refiner: non-finite weights at step 1 (state_dict: "), lines[-1]
    assert lines[-1].endswith("last good checkpoint: none (no checkpoint written yet)"), lines[-1]
    sdir = run_dir / "refiner"
    assert not (sdir / "final.ckpt").exists()
    assert not (sdir / "checkpoints").exists() or not any((sdir / "checkpoints").iterdir())
