#!/bin/bash
# Submit a whole hybrid experiment to SLURM as dependent jobs of slurm/train.sbatch:
#
#   tokenizer ──┬──► ar ──────┐
#               ├──► refiner ─┼──► eval
#               └──► diffusion┘ (WITH_DIFFUSION=1, or with_diffusion=true in the config or overrides)
#   oracle ───────────────────┘   (needs no tokenizer: runs beside it; procedural data only, as in train.py)
#
# usage: slurm/submit_pipeline.sh [--config FILE] [--run-dir DIR] [--dry-run] [key=value ...]
#   A relative --config is looked up in the current directory, then in the repository (configs/long.yaml works
#   from anywhere); a relative --run-dir is taken from the current directory (default: <repo>/runs/<config>-<time>).
#   key=value overrides go to every stage (e.g. tokenizer.train.max_steps=500 cache_dir=/scratch/cache),
#   except that the oracle job runs with retrain=false: as with `train.py stage=all retrain=true`, the oracle
#   (shared between runs, in cache_dir) is not retrained; `train.py stage=oracle retrain=true` retrains it.
#   --dry-run prints the sbatch commands instead of submitting them.
#   The config and overrides are resolved first (with $PYTHON, else the active venv's or .venv's python),
#   so a bad key fails here, before any job is submitted.
# Prints one "<stage> <job id>" line per job, then how to watch them.
#
# Resources (environment variables):
#   NODES          nodes per training job (default 1)
#   GPUS_PER_NODE  GPUs per node; training jobs run one task per GPU (default 4; 0 = CPU-only cluster)
#   TASKS_PER_NODE tasks per node when GPUS_PER_NODE=0 (default 1; DDP over gloo when > 1)
#   CPUS_PER_TASK  CPU cores per task (default 8)
#   TIME           time limit per training job (default 04:00:00; a job that hits it is requeued and resumes)
#   EVAL_TIME      time limit of the oracle and eval jobs (default 02:00:00)
#   GPU_GRES       1 = ask for GPUs as a generic resource (--gres=gpu:N) instead of --gpus-per-node=N
#   SBATCH_ARGS    extra sbatch options for every job, space separated (e.g. "--partition=gpu --account=proj")
#   WITH_DIFFUSION 1 = also train the pure-diffusion baseline (and pass with_diffusion=true)
# The oracle and eval jobs use one task (and one GPU when GPUS_PER_NODE > 0).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="${CONFIG:-configs/default.yaml}"
run_dir="${RUN_DIR:-}"
dry_run=0
overrides=()
# train.sbatch applies OVERRIDES from its environment, and sbatch --export=ALL passes this shell's: one left over
# from a single-stage submission would reach every job unchecked
if [ -n "${OVERRIDES:-}" ]; then
    echo "warning: OVERRIDES='$OVERRIDES' in your environment is not used: pass overrides as key=value arguments" >&2
fi
unset OVERRIDES
needs_value() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then echo "error: $1 needs a value" >&2; exit 2; fi
}
while [ $# -gt 0 ]; do
    case "$1" in
        --config) needs_value "$@"; config="$2"; shift 2 ;;
        --config=*) config="${1#*=}"; shift ;;
        --run-dir) needs_value "$@"; run_dir="$2"; shift 2 ;;
        --run-dir=*) run_dir="${1#*=}"; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; exit 0 ;;
        run_dir=*) run_dir="${1#run_dir=}"; shift ;;
        stage=*) echo "error: submit_pipeline.sh submits every stage; drop '$1' (use slurm/train.sbatch for one stage)" >&2; exit 2 ;;
        *=*) overrides+=("$1"); shift ;;
        *) echo "error: unknown argument '$1' (expected --config FILE, --run-dir DIR, --dry-run or key=value)" >&2; exit 2 ;;
    esac
done

case "$config" in
    /*) ;;
    *) if [ -f "$config" ]; then config="$PWD/$config"; else config="$repo/$config"; fi ;;
esac
if [ ! -f "$config" ]; then echo "error: config file '$config' does not exist" >&2; exit 2; fi
if [ -z "$run_dir" ]; then
    run_dir="$repo/runs/$(basename "$config" .yaml)-$(date +%Y%m%d-%H%M%S)"
fi
case "$run_dir" in /*) ;; *) run_dir="$PWD/$run_dir" ;; esac
if [[ "$config$run_dir$repo" == *,* ]]; then
    echo "error: the repository, config and run dir paths must not contain commas (sbatch --export splits on them)" >&2
    exit 2
fi

if [ "${WITH_DIFFUSION:-0}" = 1 ]; then overrides+=("with_diffusion=true"); fi
# The stages that `train.py stage=all` runs for this config: the oracle judges the procedural data only,
# so on other data (data.source=shards) it is neither trained nor waited for; the diffusion baseline when
# WITH_DIFFUSION=1, with_diffusion=true or diffusion.checkpoint (config or override). Same python as train.sbatch.
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then python="$VIRTUAL_ENV/bin/python"
    elif [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"
    else python=python; fi
fi
plan="$(cd "$repo" && "$python" -c 'import sys
from hybrid.config import load_cli_config
from hybrid.experiment import stage_plan
cfg = load_cli_config(sys.argv[1], sys.argv[2:] + ["stage=all"])
if cfg is None:
    sys.exit(2)
print(" ".join(stage_plan(cfg)))' "$config" "${overrides[@]}")" || exit 2
with_oracle=0
case " $plan " in *" oracle "*) with_oracle=1 ;; esac
with_diffusion=0
case " $plan " in *" diffusion "*) with_diffusion=1 ;; esac

nodes="${NODES:-1}"
gpus="${GPUS_PER_NODE:-4}"
cpus="${CPUS_PER_TASK:-8}"
if [ "$gpus" -gt 0 ]; then tasks="$gpus"; else tasks="${TASKS_PER_NODE:-1}"; fi
read -r -a site <<< "${SBATCH_ARGS:-}"

# gpu_request N: the sbatch option asking for N GPUs per node (GPU_GRES=1: as a generic resource; none for 0)
gpu_request() {
    if [ "${GPU_GRES:-0}" != 1 ]; then echo "--gpus-per-node=$1"; elif [ "$1" -gt 0 ]; then echo "--gres=gpu:$1"; fi
}
train_res=(--nodes="$nodes" --ntasks-per-node="$tasks" $(gpu_request "$gpus") --cpus-per-task="$cpus"
           --time="${TIME:-04:00:00}")
single_res=(--nodes=1 --ntasks-per-node=1 $(gpu_request "$(( gpus > 0 ? 1 : 0 ))") --cpus-per-task="$cpus"
            --time="${EVAL_TIME:-02:00:00}")

if [ "$dry_run" = 0 ]; then mkdir -p "$run_dir/slurm"; fi

# The oracle job: the same overrides without retrain=... (ensure_oracle retrains the shared oracle for
# stage=oracle retrain=true, which train.py stage=all never asks for), and retrain=false after them for a
# config file that says retrain: true.
oracle_overrides=()
for override in "${overrides[@]}"; do
    case "$override" in retrain=*) ;; *) oracle_overrides+=("$override") ;; esac
done
oracle_overrides+=("retrain=false")

# submit STAGE DEPENDENCY RESOURCES...: prints the job id
submit() {
    local stage="$1" dependency="$2"; shift 2
    local cmd=(sbatch --parsable --job-name="hybrid-$stage" --chdir="$repo" --output="$run_dir/slurm/%x-%j.out"
               --export="ALL,HYBRID_DIR=$repo,CONFIG=$config,STAGE=$stage,RUN_DIR=$run_dir"
               "$@" "${site[@]}")
    if [ -n "$dependency" ]; then cmd+=(--dependency="afterok:$dependency" --kill-on-invalid-dep=yes); fi
    if [ "$stage" = oracle ]; then
        cmd+=("$repo/slurm/train.sbatch" "${oracle_overrides[@]}")
    else
        cmd+=("$repo/slurm/train.sbatch" "${overrides[@]}")
    fi
    if [ "$dry_run" = 1 ]; then
        printf '%q ' "${cmd[@]}" >&2; echo >&2
        echo "<$stage>"
    else
        local out
        out="$("${cmd[@]}")"
        echo "${out%%;*}"  # --parsable prints "id" or "id;cluster"
    fi
}

tokenizer=$(submit tokenizer "" "${train_res[@]}")
if [ "$with_oracle" = 1 ]; then oracle=$(submit oracle "" "${single_res[@]}"); fi
ar=$(submit ar "$tokenizer" "${train_res[@]}")
refiner=$(submit refiner "$tokenizer" "${train_res[@]}")
eval_deps="$ar:$refiner"
if [ "$with_oracle" = 1 ]; then eval_deps="$eval_deps:$oracle"; fi
if [ "$with_diffusion" = 1 ]; then
    diffusion=$(submit diffusion "$tokenizer" "${train_res[@]}")
    eval_deps="$eval_deps:$diffusion"
fi
evaluation=$(submit eval "$eval_deps" "${single_res[@]}")

echo "tokenizer $tokenizer"
if [ "$with_oracle" = 1 ]; then echo "oracle $oracle"; fi
echo "ar $ar"
echo "refiner $refiner"
if [ "$with_diffusion" = 1 ]; then echo "diffusion $diffusion"; fi
echo "eval $evaluation"
echo "# run dir: $run_dir   logs: $run_dir/slurm/   watch: squeue -u ${USER:-$(id -un)}" >&2
