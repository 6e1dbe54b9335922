#!/usr/bin/env bash
# DiT-XL/2 at 256x256 on N nodes x 8 GPUs, one srun task per GPU, surviving preemption and time limits.
#
#   sbatch slurm/train_xl.sh                                  # from the repository root
#   RUN_DIR=runs/xl_a DATA=/data/in1k_256 sbatch --nodes=8 slurm/train_xl.sh train.max_steps=400000
#
# Edit the #SBATCH lines below for your cluster (partition, account, nodes, time); sbatch options on the
# command line override them. Everything else comes from the environment (exported by sbatch) or from
# arguments, which are dotted config overrides passed to the trainer. Relative paths are relative to the
# repository (the submit directory):
#   CONFIG     experiment YAML                      (configs/dit_xl_2_256.yaml)
#   DS_CONFIG  DeepSpeed JSON                       (the config's engine.ds_config)
#   RUN_DIR    the run: checkpoints, logs, TensorBoard; the same RUN_DIR continues the same run
#                                                   (runs/dit_xl_2_256)
#   DATA       dataset root written by data_prep    (the config's data.root)
#   VAE        VAE for in-training sample grids     (the config's sample.vae, else dataset.json's)
#   EXTRA      more overrides, space separated      ("")
#   PYTHON     interpreter                          (.venv/bin/python, else python3)
#   GPUS_PER_NODE  GPUs per node, must equal --ntasks-per-node (the allocation's GPUs, else 8);
#                  0 = CPU with gloo, for tests (also DITSCALE_DEVICE=cpu)
#   MAX_RETRIES    requeues after crashes without a new checkpoint before giving up (3)
#   MASTER_PORT    rendezvous port (15000 + job id % 15000)
#   DITSCALE_REPO  the checkout, if you submit from elsewhere ($SLURM_SUBMIT_DIR)
#
# Exit codes of the trainer decide what happens: 0 done (checkpoint of max_steps complete); 2 bad
# config/input, or no space for the next checkpoint: fail, never requeue; 3 non-finite loss: fail (a human
# looks); 85 preempted after a complete checkpoint: requeue this job. 4 (a checkpoint write failed with an
# I/O error; `latest` untouched) and any other code are crashes: requeued up to MAX_RETRIES times in a row
# unless a new checkpoint appeared.
# Only a job still RUNNING is requeued: `scancel` (the trainer saves on its SIGTERM) ends the run for good.
#
#SBATCH --job-name=dit-xl-2-256
#SBATCH --partition=gpu
##SBATCH --account=YOUR_ACCOUNT
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=12
#SBATCH --time=2-00:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
SCRIPT_NAME=train_xl
source "${DITSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" 2>/dev/null || {
  echo "train_xl: error: slurm/common.sh not found: submit from the repository root or set DITSCALE_REPO" >&2
  exit 2
}
[[ -n ${SLURM_JOB_ID:-} ]] || fail 2 "not inside a SLURM job: submit with sbatch slurm/train_xl.sh"
trap 'SIGNALLED=1' USR1 TERM   # a stop signal before the trainer runs: requeue without starting it

find_repo
find_python
accelerator_env
rendezvous_env

CONFIG=${CONFIG:-configs/dit_xl_2_256.yaml}
RUN_DIR=${RUN_DIR:-runs/dit_xl_2_256}
MAX_RETRIES=${MAX_RETRIES:-3}
RESTART=${SLURM_RESTART_COUNT:-0}

# ----------------------------------------------------------------------------------------------------------
# Trainer arguments
# ----------------------------------------------------------------------------------------------------------
OVERRIDES=("run_dir=$RUN_DIR" "train.resume=auto")
[[ -n ${DS_CONFIG:-} ]] && OVERRIDES+=("engine.ds_config=$DS_CONFIG")
[[ -n ${DATA:-} ]] && OVERRIDES+=("data.root=$DATA")
[[ -n ${VAE:-} ]] && OVERRIDES+=("sample.vae=$VAE")
read -r -a extra <<<"${EXTRA:-}"
OVERRIDES+=("${extra[@]}" "$@")
TRAIN=("$PYTHON" -m ditscale.train --config "$CONFIG" "${OVERRIDES[@]}")

# ----------------------------------------------------------------------------------------------------------
# Pre-flight: fail at once (exit 2, not requeued) on what no retry can fix
# ----------------------------------------------------------------------------------------------------------
[[ -f $CONFIG ]] || fail 2 "config '$CONFIG' not found (CONFIG=...)"
[[ -z ${DS_CONFIG:-} || -f $DS_CONFIG ]] || fail 2 "DeepSpeed config '$DS_CONFIG' not found (DS_CONFIG=...)"
[[ -z ${DATA:-} || -e $DATA ]] || fail 2 "data path '$DATA' does not exist (DATA=...)"
[[ -z ${VAE:-} || -e $VAE ]] || fail 2 "VAE path '$VAE' does not exist (VAE=...)"
why=$({ mkdir -p "$RUN_DIR/logs" && : >"$RUN_DIR/logs/.write-test-$SLURM_JOB_ID"; } 2>&1) \
  || fail 2 "run directory '$RUN_DIR' is not writable (RUN_DIR=...): ${why:-permission denied}"
rm -f "$RUN_DIR/logs/.write-test-$SLURM_JOB_ID"
if [[ ${DITSCALE_DEVICE:-} != cpu && ${SLURM_NTASKS_PER_NODE:-1} != "$GPUS_PER_NODE" ]]; then
  fail 2 "--ntasks-per-node=${SLURM_NTASKS_PER_NODE:-1} but $GPUS_PER_NODE GPUs per node: one task per GPU"
fi
# The trainer's own check (config, dataset, DeepSpeed JSON, run dir) before N nodes start; a requeued job
# passed it already (and the trainer exits 2 on its own should something have changed since).
if (( RESTART == 0 )); then
  "${TRAIN[@]}" --check >"$RUN_DIR/logs/check-$SLURM_JOB_ID.log" 2>&1 \
    || { cat "$RUN_DIR/logs/check-$SLURM_JOB_ID.log" >&2; fail 2 "configuration check failed (see above)"; }
fi

# One job per run directory at a time: a second one would write the same checkpoints.
owner_file=$RUN_DIR/.slurm_job
if [[ -s $owner_file ]]; then
  owner=$(cat "$owner_file")
  if [[ $owner != "$SLURM_JOB_ID" ]] && squeue -h -j "$owner" -t RUNNING,COMPLETING 2>/dev/null | grep -q .; then
    fail 2 "run directory '$RUN_DIR' is in use by running job $owner"
  fi
fi
echo "$SLURM_JOB_ID" >"$owner_file"

LOG=$RUN_DIR/logs/slurm-$SLURM_JOB_ID.log
say "job $SLURM_JOB_ID (restart $RESTART): logging to $LOG"
exec 3>&1 >>"$LOG" 2>&1
both() { say "$@"; say "$@" >&3; }   # the outcome also goes to the job's own output file

# ----------------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------------
tasks_per_node=${SLURM_NTASKS_PER_NODE:-1}
say "=== job $SLURM_JOB_ID restart $RESTART on $SLURM_JOB_NODELIST: $SLURM_JOB_NUM_NODES node(s) x" \
    "$tasks_per_node task(s), device ${DITSCALE_DEVICE:-cuda}, master $MASTER_ADDR:$MASTER_PORT"
say "run: ${TRAIN[*]}"

checkpoint_mark() { cat "$RUN_DIR/ckpt/latest" 2>/dev/null; }   # the newest complete checkpoint's tag
before=$(checkpoint_mark)
if (( SIGNALLED )); then
  rc=143
  say "got a stop signal before the trainer started (is --time shorter than the --signal margin?)"
else
  # every task sees all of its node's GPUs and takes cuda:LOCAL_RANK (--gpu-bind=none); a task that ends
  # leaves the others 300 s to end too (a crashed rank must not leave the rest hanging in a collective)
  srun_args=(--ntasks-per-node="$tasks_per_node" --wait=300)
  [[ ${DITSCALE_DEVICE:-} == cpu ]] || srun_args+=(--gpu-bind=none)
  run_srun "${srun_args[@]}" "${TRAIN[@]}"
  rc=$SRUN_RC
  say "trainer exited with $rc"
fi

retries_file=$RUN_DIR/.slurm_retries
(( RESTART == 0 )) && rm -f "$retries_file"   # a new submission gets a fresh retry budget
case $rc in
  0)
    rm -f "$retries_file"
    both "run finished"
    exit 0 ;;
  2)
    both "error: bad configuration or input, or no space for a checkpoint: not requeued (fix it and sbatch" \
         "again; the run resumes)"
    exit 2 ;;
  3)
    both "error: stopped after too many non-finite steps: not requeued (inspect $RUN_DIR, then sbatch again)"
    exit 3 ;;
  85)
    rm -f "$retries_file"
    why="preempted after a complete checkpoint" ;;
  *)
    retries=$(cat "$retries_file" 2>/dev/null || echo 0)
    [[ $before != "$(checkpoint_mark)" ]] && retries=0   # progress since the last start: a fresh budget
    retries=$((retries + 1))
    if (( retries > MAX_RETRIES )); then
      both "error: crashed (exit $rc) $retries times in a row without a new checkpoint: giving up," \
           "not requeued (MAX_RETRIES=$MAX_RETRIES; fix the cause and sbatch again)"
      exit "$rc"
    fi
    echo "$retries" >"$retries_file"
    why="crashed (exit $rc): retry $retries/$MAX_RETRIES" ;;
esac
# Requeue only a job that is still running: after scancel (whose SIGTERM also makes the trainer save and
# exit 85), a time-limit kill or SLURM's own preemption, the job is already ending and stays ended.
state=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*')
if [[ $state != JobState=RUNNING ]]; then
  both "$why, but job $SLURM_JOB_ID is ${state#JobState=} (cancelled or past its limit): not requeued;" \
       "sbatch again to resume from the newest checkpoint"
  exit "$rc"
fi
both "$why: requeueing job $SLURM_JOB_ID"
scontrol requeue "$SLURM_JOB_ID" || { both "error: scontrol requeue failed; sbatch again to resume"; exit "$rc"; }
# the requeue ends this job step; should it return, do not report success
sleep 60
exit "$rc"
