"""OpenMP's wait policy: importing hybrid makes waiting threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the user
set a policy; benchmarks/threads.py measures what that buys beside a second job on the same cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _policy(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", "import os, hybrid; print(os.environ['OMP_WAIT_POLICY'])"],
                         cwd=ROOT, env={**env, **env_extra}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_hybrid_makes_openmp_wait_passively_unless_the_user_chose():
    assert _policy({}) == "PASSIVE"
    assert _policy({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


# Records OMP_WAIT_POLICY at the moment torch is first imported (OpenMP reads it when torch loads) while importing the
# module named by argv[1], as `python -m` or train.py would; a module that imports torch only later (train.py's
# main) reports the policy that later import will see.
_AT_TORCH_IMPORT = """
import importlib, os, sys
seen = []
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY", "unset"))
sys.meta_path.insert(0, Probe())
importlib.import_module(sys.argv[1])
print(seen[0] if seen else os.environ.get("OMP_WAIT_POLICY", "unset"))
"""


@pytest.mark.parametrize("module", ["train", "sample", *(f"benchmarks.{name}" for name in (
    "ar_efficiency", "curve", "data_throughput", "given_scales", "refiner", "repair", "showdown", "tokenizer"))])
def test_entry_points_set_the_passive_policy_before_torch_loads(module):
    """The benchmarks imported torch before hybrid, so the policy never reached their OpenMP (session 24's note)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", _AT_TORCH_IMPORT, module], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE"


def test_threads_benchmark_times_each_setting_alone_and_beside_a_second_job(tmp_path):
    out = tmp_path / "threads.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.threads", "--steps", "1", "--settings", "one",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())["settings"]["one"]
    assert row["threads"] == 1 and row["env"] == {"OMP_NUM_THREADS": "1"}  # the worker really ran single-threaded
    assert row["step_s_alone"] > 0 and row["slowdown"] == row["step_s_contended"] / row["step_s_alone"]
    assert "one" in proc.stdout and "slowdown" in proc.stdout
