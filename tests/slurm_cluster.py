"""A throw-away single-node SLURM cluster on localhost, for tests and for trying `slurm/` by hand.

It runs Debian's `slurm-wlm` (22.05) daemons as the current (root) user with every piece of state
under one directory: `slurm.conf`, the controller's state, slurmd's spool, pid files and logs. No
munge (`AuthType=auth/none`, `CredType=cred/none`), no cgroups (`proctrack/linuxproc`, `task/none`),
one node `localhost` with `cpus` CPUs in partition `debug`. Client commands find the cluster through
`SLURM_CONF` (see `SlurmCluster.env`).

By hand (from the repository root):

    python tests/slurm_cluster.py up /tmp/slurm-test     # prints `export SLURM_CONF=...`
    export SLURM_CONF=/tmp/slurm-test/slurm.conf
    sbatch --ntasks-per-node=2 --cpus-per-task=1 --export=ALL,CONFIG=configs/toy.yaml,STAGE=tokenizer \\
        slurm/train.sbatch run_dir=/tmp/toy
    python tests/slurm_cluster.py down /tmp/slurm-test   # stops the daemons by their pids
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REQUEUE_DELAY = 5  # seconds a requeued job waits before it may start again (AuthInfo=cred_expire)


def slurm_missing_reason() -> str | None:
    """Installs `slurm-wlm` with apt when it is missing; returns why the cluster cannot run, or None."""
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch"):
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "slurm-wlm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "slurm-wlm is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-q", "slurm-wlm"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            output = f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{output}")
    if not shutil.which("slurmctld"):
        raise RuntimeError("apt-get installed slurm-wlm, but slurmctld is still not on PATH")
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """slurmctld + slurmd on localhost, configured and logged under `root`."""

    def __init__(self, root: str | os.PathLike, cpus: int = 2) -> None:
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"

    # -- configuration -------------------------------------------------------------------------
    def write_conf(self) -> Path:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=hybridtest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            # no munge: the daemons and clients trust each other on localhost
            "AuthType=auth/none",
            "CredType=cred/none",
            # a requeued job is held for the credential lifetime (120 s by default) before it may run again
            f"AuthInfo=cred_expire={REQUEUE_DELAY}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # no cgroups in a container
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            # a job larger than the cluster is refused at submission instead of pending forever
            "EnforcePartLimits=ALL",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",  # a requeued job starts soon after its hold ends
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=3600",  # keep finished jobs visible to `scontrol show job` (there is no sacct)
            "InactiveLimit=0",
            "SlurmdTimeout=300",
            "MailProg=/bin/true",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        return self.conf

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (sbatch, squeue, scontrol, scancel) and the jobs."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- daemons -------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> None:
        self.write_conf()
        for name, args in (("slurmctld", ["slurmctld", "-D", "-i"]), ("slurmd", ["slurmd", "-D", "-N", "localhost"])):
            out = open(self.logs / f"{name}.stdout", "ab")  # noqa: SIM115 - the daemon owns it
            proc = subprocess.Popen([*args, "-f", str(self.conf)], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            (self.root / f"{name}.daemon-pid").write_text(str(proc.pid))
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            for name in ("slurmctld", "slurmd"):
                pid = self._pid(name)
                if pid is None or not _alive(pid):
                    raise RuntimeError(f"{name} exited at start; its log:\n{self.log_tail(name)}")
            proc = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = proc.stdout.strip()
            if proc.returncode == 0 and state.rstrip("*") in ("idle", "mixed", "allocated"):
                return
            time.sleep(1)
        raise RuntimeError(f"the test cluster's node is not idle after {timeout:.0f} s (state '{state}'); logs:\n"
                           f"{self.log_tail('slurmctld')}\n{self.log_tail('slurmd')}")

    def stop(self, timeout: float = 30.0) -> None:
        """Cancels every job, waits for them to end, then stops slurmd and slurmctld by their pids."""
        if self._pid("slurmctld") is not None and _alive(self._pid("slurmctld")):
            self.run(["scancel", "--full", "-u", str(os.getuid())], check=False)
            deadline = time.time() + timeout
            while time.time() < deadline:
                proc = self.run(["squeue", "-h", "-o", "%i"], check=False)
                if proc.returncode != 0 or not proc.stdout.strip():
                    break
                time.sleep(1)
        for name in ("slurmd", "slurmctld"):
            pid = self._pid(name)
            if pid is None:
                continue
            _terminate(pid, timeout)
            (self.root / f"{name}.daemon-pid").unlink(missing_ok=True)

    def _pid(self, name: str) -> int | None:
        path = self.root / f"{name}.daemon-pid"
        return int(path.read_text()) if path.is_file() else None

    def log_tail(self, name: str, chars: int = 3000) -> str:
        text = ""
        for path in (self.logs / f"{name}.log", self.logs / f"{name}.stdout"):
            if path.is_file():
                text += f"--- {path}\n" + path.read_text(errors="replace")[-chars:]
        return text

    # -- clients -------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=kwargs.pop("env", self.env), capture_output=True, text=True, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float, poll: float = 1.0) -> dict[str, str]:
        """Waits until the job's state is one of `states` (or any final state); returns the job's fields."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states or info.get("JobState") in final:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} is still {info.get('JobState')} after {timeout:.0f} s (waited for {states})")


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _terminate(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _alive(pid)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python tests/slurm_cluster.py up|down DIR", file=sys.stderr)
        return 2
    cluster = SlurmCluster(argv[1])
    if argv[0] == "up":
        reason = slurm_missing_reason()
        if reason:
            print(f"error: {reason}", file=sys.stderr)
            return 1
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
