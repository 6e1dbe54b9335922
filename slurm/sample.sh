#!/usr/bin/env bash
# Samples for FID over every GPU of an allocation: one srun task per GPU writes its chunks of the ADM .npz
# (`python -m ditscale.sample --npz-out`), rank 0 assembles it and, with EVAL_REF, runs the evaluator.
#
#   CKPT=runs/dit_xl_2_256/export/ema.safetensors DATASET=/data/in256 \
#   EVAL_REF=VIRTUAL_imagenet256_labeled.npz INCEPTION=pt_inception-2015-12-05-6726825d.pth \
#     sbatch --nodes=2 slurm/sample.sh
#
# Edit the #SBATCH lines for your cluster. Environment (exported by sbatch); arguments are more
# `ditscale.sample` flags (e.g. --sampler ddim --steps 50):
#   CKPT         weights file or trainer export directory                         (required)
#   OUT          directory of chunks and the final .npz              (<CKPT dir>/samples-cfg<CFG_SCALE>)
#   NUM_SAMPLES  images                                                            (50000)
#   CFG_SCALE    classifier-free guidance scale (1.5: the paper's FID setting)     (1.5)
#   DATASET      dataset root (class names, scale factor, VAE path)                 ("")
#   VAE          local AutoencoderKL directory or none                              (from DATASET)
#   BATCH_SIZE   images per GPU per model call                                     (64)
#   EVAL_REF, INCEPTION  reference batch and Inception weights: FID/sFID/IS/precision/recall at the end, as
#                ADM's evaluator computes them (IS over chunks of 5,000, fp16 precision/recall distances)
#   RESIZE       the evaluation's resize: tf1 (ADM's, as published numbers) or torch (pytorch-fid)  (tf1)
#   LABELS       balanced (N / classes per class) or random (the DiT paper's)                      (balanced)
#   GPUS_PER_NODE (0 = CPU), PYTHON, DITSCALE_REPO as in train_xl.sh
# Preemption or the time limit (USR1 120 s before it) requeues the job; finished chunks are kept, so the
# next allocation (any node count) does only what is missing. Exit code 2 (bad input) is never requeued.
#
#SBATCH --job-name=dit-sample
#SBATCH --partition=gpu
##SBATCH --account=YOUR_ACCOUNT
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --time=6:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
SCRIPT_NAME=sample
source "${DITSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" 2>/dev/null || {
  echo "sample: error: slurm/common.sh not found: submit from the repository root or set DITSCALE_REPO" >&2
  exit 2
}
[[ -n ${SLURM_JOB_ID:-} ]] || fail 2 "not inside a SLURM job: submit with sbatch slurm/sample.sh"
find_repo
find_python
accelerator_env

[[ -n ${CKPT:-} ]] || fail 2 "set CKPT to a weights file or an export directory"
[[ -e $CKPT ]] || fail 2 "checkpoint '$CKPT' does not exist (CKPT=...)"
CFG_SCALE=${CFG_SCALE:-1.5}
OUT=${OUT:-$(dirname "$CKPT")/samples-cfg$CFG_SCALE}
[[ -z ${DATASET:-} || -e $DATASET ]] || fail 2 "dataset '$DATASET' does not exist (DATASET=...)"
[[ -z ${EVAL_REF:-} || -e $EVAL_REF ]] || fail 2 "reference '$EVAL_REF' does not exist (EVAL_REF=...)"
mkdir -p "$OUT" 2>/dev/null && [[ -w $OUT ]] || fail 2 "output directory '$OUT' is not writable (OUT=...)"

ARGS=(--ckpt "$CKPT" --npz-out "$OUT" --num-samples "${NUM_SAMPLES:-50000}" --cfg-scale "$CFG_SCALE"
      --batch-size "${BATCH_SIZE:-64}" --labels "${LABELS:-balanced}" --no-progress)
[[ -n ${DATASET:-} ]] && ARGS+=(--dataset "$DATASET")
[[ -n ${VAE:-} ]] && ARGS+=(--vae "$VAE")
if [[ -n ${EVAL_REF:-} ]]; then
  [[ -f ${INCEPTION:-} ]] || fail 2 "EVAL_REF needs INCEPTION, the Inception weights file (got '${INCEPTION:-}')"
  ARGS+=(--eval-ref "$EVAL_REF" --inception "$INCEPTION" --eval-resize "${RESIZE:-tf1}")
fi
[[ ${DITSCALE_DEVICE:-} == cpu ]] && ARGS+=(--device cpu)
ARGS+=("$@")

say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
    "$SLURM_NTASKS task(s) -> $OUT"
run_srun --ntasks-per-node="${SLURM_NTASKS_PER_NODE:-1}" "$PYTHON" -m ditscale.sample "${ARGS[@]}"
rc=$SRUN_RC
case $rc in
  0) say "done: $(ls "$OUT"/samples_*.npz 2>/dev/null)"; exit 0 ;;
  2) fail 2 "bad input: not requeued" ;;
esac
if [[ $(job_field JobState) == RUNNING ]] && (( SIGNALLED || ${SLURM_RESTART_COUNT:-0} < ${MAX_RETRIES:-3} )); then
  say "exit $rc$( ((SIGNALLED)) && echo ' after a signal'): requeueing; finished chunks are kept"
  requeue_and_exit "$rc" "does only the chunks still missing"
fi
fail "$rc" "sampling failed (exit $rc) after ${SLURM_RESTART_COUNT:-0} restarts: not requeued"
