#!/usr/bin/env bash
# The scaling study as a SLURM array: task i trains configuration i of a sweep file (ditscale.study) and
# evaluates its EMA every eval_every steps (FID during training), through slurm/train_xl.sh, so each task
# survives preemption and time limits the same way (requeued, resumed from its newest checkpoint, an
# unfinished evaluation completed without re-sampling its finished chunks).
#
#   N=$(python -m ditscale.study list configs/study_imagenet256.yaml --count)
#   SWEEP=configs/study_imagenet256.yaml sbatch --array=0-$((N - 1))%4 slurm/study.sh
#   python -m ditscale.study plot configs/study_imagenet256.yaml --out runs/scaling/figures   # any time
#
# Edit the #SBATCH lines below for your cluster; each array task is one training job of --nodes nodes.
# Environment: SWEEP (required), and train_xl.sh's: DS_CONFIG, DATA, VAE, EXTRA, PYTHON, GPUS_PER_NODE,
# MAX_RETRIES; trailing arguments are more config overrides for every configuration.
#
#SBATCH --job-name=dit-study
#SBATCH --partition=gpu
##SBATCH --account=YOUR_ACCOUNT
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=12
#SBATCH --time=2-00:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -uo pipefail
SCRIPT_NAME=study
source "${DITSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" 2>/dev/null || {
  echo "study: error: slurm/common.sh not found: submit from the repository root or set DITSCALE_REPO" >&2
  exit 2
}
[[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || fail 2 "not an array task: sbatch --array=0-(N-1) slurm/study.sh"
[[ -n ${SWEEP:-} && -f ${SWEEP:-} ]] || fail 2 "set SWEEP to a sweep file (got '${SWEEP:-}')"
find_repo
find_python

# The configuration's trainer arguments: --config FILE, then its overrides (run_dir=... among them).
mapfile -t ARGS < <("$PYTHON" -m ditscale.study args "$SWEEP" --index "$SLURM_ARRAY_TASK_ID") \
  || fail 2 "cannot read configuration $SLURM_ARRAY_TASK_ID of $SWEEP"
(( ${#ARGS[@]} >= 2 )) || fail 2 "no configuration $SLURM_ARRAY_TASK_ID in $SWEEP"
CONFIG=${ARGS[1]}
RUN_DIR=
for a in "${ARGS[@]:2}"; do [[ $a == run_dir=* ]] && RUN_DIR=${a#run_dir=}; done
say "array task $SLURM_ARRAY_TASK_ID of $SWEEP: $RUN_DIR"
CONFIG=$CONFIG RUN_DIR=$RUN_DIR exec bash "$REPO/slurm/train_xl.sh" "${ARGS[@]:2}" "$@"
