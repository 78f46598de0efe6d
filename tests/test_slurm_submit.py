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


def _submit(cwd, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "slurm" / "submit_pipeline.sh"), *args],
                          env={**os.environ, "PYTHON": sys.executable, **env}, cwd=cwd, capture_output=True, text=True)


def test_relative_paths_are_the_users_and_a_missing_value_is_named(tmp_path):
    """A relative --config or --run-dir was resolved against the repository, not the directory the user typed it
    in ("config file '<repo>/mine.yaml' does not exist"); `--config` without a value ended with "$2: unbound
    variable" (found by a review)."""
    (tmp_path / "mine.yaml").write_text((REPO / "configs" / "toy.yaml").read_text())
    proc = _submit(tmp_path, "--config", "mine.yaml", "--run-dir", "myrun", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"CONFIG={tmp_path / 'mine.yaml'}" in proc.stderr and f"RUN_DIR={tmp_path / 'myrun'}" in proc.stderr
    proc = _submit(tmp_path, "--config", "configs/toy.yaml", "--dry-run")  # not here: the repository's
    assert proc.returncode == 0 and f"CONFIG={REPO / 'configs' / 'toy.yaml'}" in proc.stderr, proc.stderr
    assert f"RUN_DIR={REPO / 'runs'}/toy-" in proc.stderr  # the default run dir stays in the repository
    for flag in ("--config", "--run-dir"):
        proc = _submit(tmp_path, flag)
        assert proc.returncode == 2 and proc.stderr.strip() == f"error: {flag} needs a value", proc.stderr


def test_overrides_left_in_the_environment_do_not_reach_the_jobs(tmp_path):
    """train.sbatch applies $OVERRIDES, and sbatch --export=ALL passed the submitting shell's to every job: one
    left over from a single-stage submission reached them all, unchecked (found by a review)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "seen.txt"
    sbatch = bin_dir / "sbatch"  # records the OVERRIDES each job would inherit, answers with a job id
    sbatch.write_text(f'#!/bin/sh\necho "${{OVERRIDES-unset}}" >> {seen}\necho 42\n')
    sbatch.chmod(0o755)
    proc = _submit(REPO, "--config", "configs/toy.yaml", "--run-dir", str(tmp_path / "run"),
                   PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OVERRIDES="data.sorce=typo")
    assert proc.returncode == 0, proc.stderr
    assert "warning: OVERRIDES='data.sorce=typo' in your environment is not used" in proc.stderr
    assert seen.read_text().split() == ["unset"] * 5  # tokenizer, oracle, ar, refiner, eval


def test_gpus_as_a_generic_resource(tmp_path):
    _, commands = dry_run(tmp_path, GPU_GRES="1", GPUS_PER_NODE="8")
    assert "--gres=gpu:8" in commands["ar"] and "--gres=gpu:1" in commands["eval"]
    assert all("--gpus-per-node" not in line for line in commands.values())
    _, commands = dry_run(tmp_path, GPU_GRES="1", GPUS_PER_NODE="0")  # a CPU cluster: no GPU request at all
    assert all("--gres" not in line and "--gpus-per-node" not in line for line in commands.values())
    _, commands = dry_run(tmp_path, GPUS_PER_NODE="8")
    assert "--gpus-per-node=8" in commands["ar"] and "--gres" not in commands["ar"]
