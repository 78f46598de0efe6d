"""OpenMP's waiting: importing hybrid makes waiting threads spin only briefly (GOMP_SPINCOUNT=10000) unless the user
set a wait policy or a spin count; benchmarks/threads.py measures what that buys beside a second job on the same
cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


_OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _without_omp_vars() -> dict:
    return {k: v for k, v in os.environ.items() if k not in _OMP_VARS}


def _waiting(env_extra: dict) -> list[str]:
    """(OMP_WAIT_POLICY, GOMP_SPINCOUNT) after importing hybrid, 'unset' where absent."""
    code = "import os, hybrid; print(*(os.environ.get(k, 'unset') for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**_without_omp_vars(), **env_extra},
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_importing_hybrid_makes_openmp_spin_briefly_unless_the_user_chose():
    assert _waiting({}) == ["unset", "10000"]
    # a user's wait policy or spin count wins, and the other is left alone (a spin count would override PASSIVE)
    assert _waiting({"OMP_WAIT_POLICY": "PASSIVE"}) == ["PASSIVE", "unset"]
    assert _waiting({"OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "unset"]
    assert _waiting({"GOMP_SPINCOUNT": "300000"}) == ["unset", "300000"]


# Records GOMP_SPINCOUNT at the moment torch is first imported (OpenMP reads it when torch loads) while importing the
# module named by argv[1], as `python -m` or train.py would; a module that imports torch only later (train.py's
# main) reports the policy that later import will see.
_AT_TORCH_IMPORT = """
import importlib, os, sys
seen = []
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT", "unset"))
sys.meta_path.insert(0, Probe())
importlib.import_module(sys.argv[1])
print(seen[0] if seen else os.environ.get("GOMP_SPINCOUNT", "unset"))
"""


@pytest.mark.parametrize("module", ["train", "sample", *(f"benchmarks.{name}" for name in (
    "ar_efficiency", "curve", "data_throughput", "given_scales", "refiner", "repair", "showdown", "tokenizer"))])
def test_entry_points_set_the_short_spin_before_torch_loads(module):
    """The benchmarks once imported torch before hybrid, so the setting never reached their OpenMP (session 24)."""
    out = subprocess.run([sys.executable, "-c", _AT_TORCH_IMPORT, module], cwd=ROOT, env=_without_omp_vars(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "10000"


def test_threads_benchmark_times_each_setting_alone_and_beside_a_second_job(tmp_path):
    out = tmp_path / "threads.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.threads", "--steps", "1", "--settings", "one",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())["settings"]["one"]
    assert row["threads"] == 1 and row["env"] == {"OMP_NUM_THREADS": "1"}  # the worker really ran single-threaded
    assert row["step_s_alone"] > 0 and row["slowdown"] == row["step_s_contended"] / row["step_s_alone"]
    assert "one" in proc.stdout and "slowdown" in proc.stdout


def test_threads_benchmark_refuses_a_run_whose_checkpoint_is_not_one_before_timing(tmp_path, capsys):
    """--run-dir checked only that ar/final.ckpt existed: a text file there ended every generation worker in a
    CheckpointError after the training timings, and `RuntimeError: a timing worker failed` lost them all."""
    import torch

    from benchmarks.threads import main
    from hybrid.config import load_config
    from hybrid.lit.runner import build_module

    run = tmp_path / "run"
    tokenizer = build_module(load_config("configs/toy.yaml", [f"run_dir={run}"]), "tokenizer")  # untrained: enough
    (run / "tokenizer").mkdir(parents=True)
    torch.save({"state_dict": tokenizer.state_dict(), "hyper_parameters": dict(tokenizer.hparams)},
               run / "tokenizer" / "final.ckpt")
    (run / "ar").mkdir()
    (run / "ar" / "final.ckpt").write_text("step: 30\n")
    out = tmp_path / "threads.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", "1", "--settings", "one", "--run-dir", str(run), "--out", str(out)])
    captured = capsys.readouterr()
    needle = f"--run-dir {run}: '{run / 'ar' / 'final.ckpt'}' is not a checkpoint: it is text"
    assert exit_info.value.code == 2 and needle in captured.err, captured.err
    assert "slowdown" not in captured.out and not out.exists()  # nothing timed
