"""slurm/submit_pipeline.sh --dry-run without a cluster (fast): which jobs it submits and what each waits for.

The jobs themselves, run on a real single-node cluster, are in tests/test_slurm.py (slow).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def dry_run(tmp_path, *overrides: str, **env: str) -> tuple[dict[str, str], dict[str, str]]:
    """({stage: job placeholder} as printed, {stage: its sbatch command line})."""
    proc = subprocess.run(
        [str(REPO / "slurm" / "submit_pipeline.sh"), "--config", "configs/toy.yaml", "--run-dir", str(tmp_path / "run"),
         "--dry-run", *overrides],
        env={**os.environ, "PYTHON": sys.executable, **env}, cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    commands = {line.split("--job-name=hybrid-", 1)[1].split()[0]: line
                for line in proc.stderr.splitlines() if line.startswith("sbatch ")}
    return jobs, commands


def test_procedural_data_submits_the_oracle_and_eval_waits_for_it(tmp_path):
    jobs, commands = dry_run(tmp_path)
    assert list(jobs) == ["tokenizer", "oracle", "ar", "refiner", "eval"]
    assert list(commands) == ["tokenizer", "oracle", "ar", "refiner", "eval"]
    assert "oracle" in commands["eval"].split("--dependency=", 1)[1].split()[0]


def test_shards_submit_no_oracle_as_train_py_trains_none(tmp_path):
    """train.py stage=all leaves the oracle out on data.source=shards; so does the pipeline (an oracle job
    would train the procedural judge for nothing, and eval would wait for it)."""
    shards = ["data.source=shards", f"data.shards={tmp_path / 'train-*.tar'}", "data.num_classes=2"]
    jobs, commands = dry_run(tmp_path, *shards, WITH_DIFFUSION="1")
    assert list(jobs) == ["tokenizer", "ar", "refiner", "diffusion", "eval"]
    assert list(commands) == ["tokenizer", "ar", "refiner", "diffusion", "eval"]
    dependency = commands["eval"].split("--dependency=", 1)[1].split()[0]
    assert "oracle" not in dependency and all(stage in dependency for stage in ("ar", "refiner", "diffusion"))
    # the source may also come from the config file alone
    toy = yaml.safe_load((REPO / "configs" / "toy.yaml").read_text())
    toy["data"].update(source="shards", shards=str(tmp_path / "train-*.tar"), num_classes=2)
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(toy))
    assert "oracle" not in dry_run(tmp_path, "--config", str(config))[0]


def test_a_bad_override_fails_before_anything_is_submitted(tmp_path):
    proc = subprocess.run(
        [str(REPO / "slurm" / "submit_pipeline.sh"), "--config", "configs/toy.yaml", "--dry-run", "data.sorce=shards"],
        env={**os.environ, "PYTHON": sys.executable}, cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "data.sorce" in proc.stderr and "sbatch" not in proc.stderr


def test_the_diffusion_job_follows_train_pys_plan(tmp_path):
    """with_diffusion=true as an override (or in the config) puts the baseline in train.py's plan: the pipeline
    submits its job too (it used to look at WITH_DIFFUSION=1 only), and eval waits for it."""
    jobs, commands = dry_run(tmp_path, "with_diffusion=true")
    assert list(jobs) == ["tokenizer", "oracle", "ar", "refiner", "diffusion", "eval"]
    assert "diffusion" in commands["eval"].split("--dependency=", 1)[1].split()[0]
    assert "diffusion" not in dry_run(tmp_path)[0]


def test_retrain_true_does_not_reach_the_shared_oracle(tmp_path):
    """`train.py stage=all retrain=true` leaves the oracle alone (it is shared between runs, in cache_dir; only
    `stage=oracle retrain=true` retrains it). The pipeline's oracle job runs `stage=oracle`, so it gets the
    overrides without retrain=true, and retrain=false after them (the config file could say retrain: true); every
    other job keeps retrain=true."""
    _, commands = dry_run(tmp_path, "retrain=true", "tokenizer.train.max_steps=5")
    args = {stage: line.split("slurm/train.sbatch", 1)[1].split() for stage, line in commands.items()}
    assert args["oracle"] == ["tokenizer.train.max_steps=5", "retrain=false"]
    for stage in ("tokenizer", "ar", "refiner", "eval"):
        assert args[stage] == ["retrain=true", "tokenizer.train.max_steps=5"], stage
