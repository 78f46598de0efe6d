#!/usr/bin/env bash
# CI: make sure Debian's slurm-wlm is installed, so tests/test_slurm.py can start its own single-node
# cluster (the test's fixture would install it too; doing it here keeps apt's minutes out of pytest).
# Starts no daemons: the test starts slurmctld/slurmd under a temp dir and stops them by pid.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
    echo "slurm-setup: $(slurmctld -V) already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "slurm-setup: slurm-wlm is missing and cannot be installed here (needs root and apt-get);" \
         "tests/test_slurm.py will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -q slurm-wlm >/dev/null
echo "slurm-setup: installed $(slurmctld -V)"
