"""slurm/train.sbatch and slurm/submit_pipeline.sh on a real single-node SLURM cluster (no mocks).

A module fixture installs Debian's `slurm-wlm` when it is missing (root + apt-get; skipped only
where that is impossible), starts slurmctld + slurmd on localhost with 2 CPUs under a temp dir
(tests/slurm_cluster.py), and stops both daemons by their pids at the end. The jobs run the toy
config on CPU: 2 tasks per node doing DDP over gloo.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, slurm_missing_reason

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOY = "configs/toy.yaml"
# train.py by default; HYBRID_SLURM_ENTRYPOINT=tests/slurm_standin.py tests the SLURM machinery with a toy model
ENTRYPOINT = os.environ.get("HYBRID_SLURM_ENTRYPOINT", "train.py")
QUIET = ["trainer.progress_bar=false"]
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the header asks for GPUs; the test cluster has none


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    env = cluster.env
    env.update(PYTHON=sys.executable, HYBRID_DIR=str(REPO), ENTRYPOINT=ENTRYPOINT, **extra)
    env.pop("SLURM_JOB_ID", None)  # in case pytest itself runs inside a SLURM job
    return env


def submit_stage(cluster, stage: str, run_dir: Path, overrides=(), sbatch_args=(), **env) -> tuple[str, Path]:
    """Submits slurm/train.sbatch for one toy stage with 2 tasks; returns (job id, its log file)."""
    log_dir = run_dir / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        "sbatch", "--parsable", "--ntasks-per-node=2", *CPU_JOB, f"--output={log_dir}/%x-%j.out",
        f"--export=ALL,CONFIG={TOY},STAGE={stage},RUN_DIR={run_dir}", *sbatch_args,
        str(REPO / "slurm" / "train.sbatch"), *QUIET, f"cache_dir={run_dir / 'cache'}", *overrides,
    ]
    job_id = cluster.run(cmd, env=_job_env(cluster, **env), cwd=REPO).stdout.strip().split(";")[0]
    return job_id, log_dir / f"hybrid-{job_id}.out"


def _diagnose(cluster: SlurmCluster, *logs: Path) -> str:
    parts = [f"--- {log}\n{log.read_text(errors='replace')[-6000:]}" for log in logs if log.is_file()]
    return "\n".join(parts + [cluster.log_tail("slurmctld", 2000), cluster.log_tail("slurmd", 2000)])


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_train_sbatch_runs_ddp_on_two_ranks(cluster, tmp_path):
    run_dir = tmp_path / "run"
    job, log = submit_stage(cluster, "tokenizer", run_dir)
    info = cluster.wait(job, ("COMPLETED",), timeout=420)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _diagnose(cluster, log)
    text = _read(log)
    # one line per rank from Lightning's DDP start, and the runner's global batch over 2 devices
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text, text[-4000:]
    assert "x 2 device(s)" in text and "distributed_backend=gloo" in text, text[-4000:]
    assert "trainer.devices=2 trainer.num_nodes=1" in text  # taken from SLURM's allocation
    final = run_dir / "tokenizer" / "final.ckpt"
    assert final.is_file(), _diagnose(cluster, log)
    assert _step(final) == 30  # configs/toy.yaml: tokenizer.train.max_steps


def test_oversized_job_is_refused_not_left_pending(cluster, tmp_path):
    proc = cluster.run(
        ["sbatch", "--parsable", "--ntasks-per-node=4", *CPU_JOB, f"--output={tmp_path}/%j.out",
         str(REPO / "slurm" / "train.sbatch")],
        check=False, env=_job_env(cluster), cwd=tmp_path,
    )
    assert proc.returncode != 0 and "processors" in proc.stderr.lower(), proc.stdout + proc.stderr


def test_sigusr1_saves_requeues_and_resumes(cluster, tmp_path):
    """The signal SLURM sends 90 s before the time limit (here sent by hand with scancel)."""
    run_dir = tmp_path / "run"
    max_steps = 60
    job, log = submit_stage(cluster, "tokenizer", run_dir, overrides=[f"tokenizer.train.max_steps={max_steps}"],
                            STANDIN_STEP_SECONDS="0.3")
    stage_dir = run_dir / "tokenizer"
    # signal once the fit is under way: the first periodic checkpoint (toy ckpt_every=10) exists
    _wait_for(lambda: (stage_dir / "checkpoints" / "last.ckpt").is_file() or cluster.job(job)["JobState"] not in
              ("PENDING", "RUNNING"), timeout=300, what="the first checkpoint")
    assert cluster.job(job)["JobState"] == "RUNNING", _diagnose(cluster, log)
    cluster.run(["scancel", "--signal=USR1", job])  # to every task of the job's steps, like --signal=USR1@90

    _wait_for(lambda: cluster.job(job).get("Restarts") == "1", timeout=120, what="the job to be requeued")
    info = cluster.wait(job, ("COMPLETED",), timeout=420)
    text = _read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _diagnose(cluster, log)
    hpc = stage_dir / "hpc_ckpt_1.ckpt"
    assert hpc.is_file(), _diagnose(cluster, log)
    saved = _step(hpc)
    assert 0 < saved < max_steps
    # the first start saved and requeued itself; the second (same job id, appended log) resumed from it
    assert f"[slurm] requeue signal: saving {hpc} at step {saved}" in text, text[-6000:]
    assert f"[slurm] requeued job {job}" in text, text[-6000:]
    assert f"job {job} start 2 " in text, text[-6000:]
    second = text[text.index(f"job {job} start 2 "):]
    assert f"Restored all states from the checkpoint at {hpc}" in second, second[-4000:]
    assert _step(stage_dir / "final.ckpt") == max_steps
    # steps logged after the restart continue from the saved step (never again from step 0)
    steps = [int(row["step"]) for row in csv.DictReader(open(stage_dir / "logs" / "metrics.csv")) if row.get("step")]
    assert re.search(r"fit starts at step 0\b", text[: text.index(f"job {job} start 2 ")]), text[-6000:]
    assert f"fit starts at step {saved}\n" in second, second[-4000:]
    assert steps and len(steps) == len(set(steps)) and max(steps) < max_steps, f"a step was trained twice: {steps}"


def test_submit_pipeline_runs_every_stage_in_dependency_order(cluster, tmp_path):
    run_dir = tmp_path / "run"
    env = _job_env(cluster, GPUS_PER_NODE="0", TASKS_PER_NODE="1", CPUS_PER_TASK="1", TIME="00:20:00",
                   EVAL_TIME="00:20:00")
    proc = subprocess.run(
        [str(REPO / "slurm" / "submit_pipeline.sh"), "--config", TOY, "--run-dir", str(run_dir), *QUIET,
         f"cache_dir={run_dir / 'cache'}"],
        env=env, cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    assert list(jobs) == ["tokenizer", "oracle", "ar", "refiner", "eval"], proc.stdout
    assert f"afterok:{jobs['tokenizer']}" in cluster.job(jobs["ar"])["Dependency"]
    logs = {stage: run_dir / "slurm" / f"hybrid-{stage}-{job}.out" for stage, job in jobs.items()}
    info = cluster.wait(jobs["eval"], ("COMPLETED",), timeout=900)
    done = {stage: cluster.job(job) for stage, job in jobs.items()}
    for stage, fields in done.items():
        assert fields["JobState"] == "COMPLETED", f"{stage}: {fields['JobState']}\n{_diagnose(cluster, *logs.values())}"
    assert info["ExitCode"] == "0:0"

    def start(stage):
        return done[stage]["StartTime"]

    def end(stage):
        return done[stage]["EndTime"]

    # ISO timestamps compare as strings
    assert start("ar") >= end("tokenizer") and start("refiner") >= end("tokenizer")
    assert start("eval") >= max(end("ar"), end("refiner"), end("oracle"))
    for stage in ("tokenizer", "ar", "refiner"):
        assert (run_dir / stage / "final.ckpt").is_file(), _diagnose(cluster, logs[stage])
    if ENTRYPOINT == "train.py":
        assert (run_dir / "metrics.json").is_file(), _diagnose(cluster, logs["eval"])


def test_daemons_have_pids(cluster):
    for name in ("slurmctld", "slurmd"):
        pid = int((cluster.root / f"{name}.daemon-pid").read_text())
        os.kill(pid, 0)  # alive; the fixture stops it by this pid
        assert Path(f"/proc/{pid}/comm").read_text().strip() == name  # and it is the daemon, not a reused pid
