#!/usr/bin/env bash
# Images -> VAE posterior latents -> shards, as a SLURM array job (one GPU per task), then the merge and a
# verify as one job that starts only when every array task succeeded (afterok).
#
#   INPUT=/data/imagenet/train OUT=/data/in256 VAE=/models/sd-vae-ft-ema bash slurm/prep_latents.sh
#
# Run it with bash (not sbatch) from the repository root: it submits both jobs and prints their ids.
# Edit the #SBATCH lines for your cluster; they apply to the array tasks (sbatch options given in SBATCH_ARGS
# apply to both jobs, e.g. SBATCH_ARGS="--partition=gpu --account=abc").
#   INPUT        ImageNet-layout folder or webdataset image tars            (required)
#   OUT          dataset root (local or s3:// gs:// …)                      (required)
#   VAE          local diffusers AutoencoderKL directory, or none           (required)
#   RESOLUTION   center-crop size                                            (256)
#   FORMAT       mds | wds                                                   (mds)
#   WORKERS      array tasks                                                 (8)
#   NUM_SLICES   slices in all; more than WORKERS makes a crash cost less    (8 x WORKERS)
#   EXTRA        more `data_prep encode` flags, e.g. "--batch-size 128 --staging /scratch/$USER"
#   LOG_DIR      job output files                                            (logs/prep_latents)
#   GPUS_PER_NODE  0 = encode on CPU (tests)                                  (1)
#   PYTHON, DITSCALE_REPO as in train_xl.sh
# A task that is preempted or killed is requeued and skips the slices it already finished; a rerun of the
# whole script does the same. Exit code 2 (bad input or flags) is never requeued.
#
#SBATCH --job-name=dit-prep-latents
#SBATCH --partition=gpu
##SBATCH --account=YOUR_ACCOUNT
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail
SCRIPT_NAME=prep_latents
source "${DITSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" 2>/dev/null || {
  echo "prep_latents: error: slurm/common.sh not found: run from the repository root or set DITSCALE_REPO" >&2
  exit 2
}
find_repo
find_python

WORKERS=${WORKERS:-8}
NUM_SLICES=${NUM_SLICES:-$((8 * WORKERS))}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}

encode() {  # one array task: this worker's slices
  local device=()
  [[ $GPUS_PER_NODE == 0 ]] && device=(--device cpu)
  read -r -a extra <<<"${EXTRA:-}"
  say "array task ${SLURM_ARRAY_TASK_ID} of ${SLURM_ARRAY_TASK_COUNT} on $(hostname -s)"
  "$PYTHON" -m data_prep encode --input "$INPUT" --out "$OUT" --vae "$VAE" \
    --resolution "${RESOLUTION:-256}" --format "${FORMAT:-mds}" --num-slices "$NUM_SLICES" \
    --no-progress "${device[@]}" "${extra[@]}"
}

merge() {
  say "merging $OUT"
  "$PYTHON" -m data_prep merge "$OUT" && "$PYTHON" -m data_prep verify "$OUT"
}

submit() {
  local missing=() v
  for v in INPUT OUT VAE; do [[ -n ${!v:-} ]] || missing+=("$v"); done
  (( ${#missing[@]} == 0 )) || fail 2 "set ${missing[*]} (see the header of slurm/prep_latents.sh)"
  [[ $INPUT == *://* || -e $INPUT ]] || fail 2 "INPUT '$INPUT' does not exist"
  [[ $VAE == none || -d $VAE ]] || fail 2 "VAE '$VAE' is not a directory (or 'none' for pixel mode)"
  (( WORKERS >= 1 && NUM_SLICES >= WORKERS )) || fail 2 "need WORKERS >= 1 and NUM_SLICES >= WORKERS"
  local log_dir=${LOG_DIR:-logs/prep_latents} common=() array_id merge_id
  mkdir -p "$log_dir" || fail 2 "cannot create LOG_DIR '$log_dir'"
  read -r -a common <<<"${SBATCH_ARGS:-}"
  [[ $GPUS_PER_NODE == 0 ]] && common+=(--gres=none)
  export INPUT OUT VAE WORKERS NUM_SLICES GPUS_PER_NODE PYTHON DITSCALE_REPO=$REPO
  array_id=$(sbatch --parsable --array="0-$((WORKERS - 1))" --output="$log_dir/encode-%A_%a.out" \
             "${common[@]}" "$REPO/slurm/prep_latents.sh" encode) || fail 1 "sbatch of the array failed"
  array_id=${array_id%%;*}
  merge_id=$(sbatch --parsable --dependency="afterok:$array_id" --kill-on-invalid-dep=yes --ntasks=1 \
             --gres=none --cpus-per-task=4 --time=2:00:00 --job-name=dit-prep-merge \
             --output="$log_dir/merge-%j.out" "${common[@]}" "$REPO/slurm/prep_latents.sh" merge) \
    || fail 1 "sbatch of the merge failed (the array job $array_id is queued; scancel it or merge by hand)"
  merge_id=${merge_id%%;*}
  say "encode: array job $array_id ($WORKERS tasks, $NUM_SLICES slices); merge + verify: job $merge_id"
  say "logs: $log_dir/; follow with: squeue -j $array_id,$merge_id"
  echo "$array_id $merge_id"
}

case ${1:-submit} in
  submit) [[ -z ${SLURM_JOB_ID:-} ]] || fail 2 "run 'bash slurm/prep_latents.sh' on a login node, not sbatch"
          submit ;;
  encode) encode; rc=$? ;;
  merge) merge; rc=$? ;;
  *) fail 2 "unknown mode '$1' (submit, encode, merge)" ;;
esac
if [[ ${1:-submit} != submit ]]; then
  # an interrupted encode (preemption, node failure) is worth another try; bad input (2) never is
  if [[ $rc != 0 && $rc != 2 && $1 == encode && $(job_field JobState) == RUNNING \
        && ${SLURM_RESTART_COUNT:-0} -lt ${MAX_RETRIES:-3} ]]; then
    say "encode exited with $rc: requeueing (restart ${SLURM_RESTART_COUNT:-0})"
    requeue_and_exit "$rc" "skips the slices it finished" "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  fi
  exit "$rc"
fi
