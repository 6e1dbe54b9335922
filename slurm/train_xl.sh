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
#   MAX_RETRIES    requeues after real crashes without a new checkpoint before giving up (3)
#   SIGNAL_MARGIN  the N of --signal=B:USR1@N (600, as below): set it with --signal so that the start-up
#                  check can warn when the last checkpoint's save time leaves too little of it
#   MASTER_PORT    rendezvous port (15000 + job id % 15000, or the next free one on the first node)
#   DITSCALE_REPO  the checkout, if you submit from elsewhere ($SLURM_SUBMIT_DIR)
#
# The trainer handles SIGUSR1/SIGTERM from its first line to its exit: in the loop it saves and exits 85,
# during start-up it exits 85 with nothing new to save, after its final checkpoint (of max_steps) it exits 0.
# It exits 2 also when there is no space for the next checkpoint, 4 when a checkpoint write failed with an
# I/O error (`latest` untouched), 5 when no step completed for train.hang_timeout_min (a hung rank): 4 and 5
# are crashes like any other code. What this script does when the trainer
# has ended is decided by `decide` below from four facts: the trainer's exit code, whether a stop signal
# reached this shell, whether a new checkpoint appeared, and what SLURM says of the job (scontrol):
#
#   trainer exit        stop signal  new ckpt  SLURM says     this script                       crash count
#   0                   -            -         -              finished: exit 0                  reset
#   2 (bad input/space) -            -         -              fail, never requeue               -
#   3 (non-finite)      -            -         -              fail, never requeue               -
#   85 (stopped)        -            -         RUNNING        requeue                           reset if new ckpt
#   not started         yes          no        RUNNING        requeue (twice in a row: fail)    kept
#   other               yes          -         RUNNING        requeue: killed by the stop,      reset if new ckpt
#                                                             not a crash
#   other (crash)       no           yes       RUNNING        requeue                           1
#   other (crash)       no           no        RUNNING        requeue; past MAX_RETRIES: fail   +1
#   85/other/not started  -          -         requeued it    nothing: SLURM already requeued   kept
#                                              (Restarts grew: scontrol requeue, node failure, preemption)
#   85/other/not started  -          -         ending         nothing: cancelled, past its time kept
#                                              (CANCELLED,    limit or preempted for good; the log says
#                                              TIMEOUT, ...)  "sbatch again to resume"
#   ("-": any. "not started": a stop signal reached this shell before srun; the trainer never ran.)
#   After its own `scontrol requeue` the script logs what SLURM then says of the job (Restarts, state).
#   `slurm/train_xl.sh --decide RC SIGNAL NEW_CKPT SLURM RETRIES MAX UNSTARTED` prints a row's outcome.
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

# ----------------------------------------------------------------------------------------------------------
# The decision table (see the header), as a pure function
# ----------------------------------------------------------------------------------------------------------
# decide RC SIGNAL NEW_CKPT SLURM RETRIES MAX UNSTARTED -> prints "ACTION RETRIES WHY..."
#   RC: the trainer's exit code, or "none" when it did not start; SIGNAL, NEW_CKPT: 0 or 1;
#   SLURM: running | requeued | ended:STATE | unknown; RETRIES: crashes in a row so far; MAX: MAX_RETRIES;
#   UNSTARTED: allocations in a row, this one included, stopped before the trainer started.
#   ACTION: finish | fail | requeue (this script requeues) | leave (SLURM decides; this script does not).
decide() {
  local rc=$1 signal=$2 progress=$3 slurm=$4 retries=$5 max=$6 unstarted=$7 why
  (( progress )) && retries=0
  case $rc in
    0) echo "finish 0 run finished$( ((signal)) && echo ' (the stop signal came after the final checkpoint)')"
       return ;;
    2) echo "fail $retries bad configuration or input, or no space for a checkpoint: not requeued (fix it and" \
            "sbatch again; the run resumes)"
       return ;;
    3) echo "fail $retries stopped on non-finite steps: not requeued (inspect the run, then sbatch again)"
       return ;;
    85) why="preempted after a complete checkpoint" ;;
    none)
      if (( unstarted >= 2 )) && [[ $slurm == running ]]; then
        echo "fail $retries a stop signal came before the trainer started in $unstarted allocations in a row" \
             "(is --time shorter than the --signal margin?): not requeued"
        return
      fi
      why="stopped by a signal before the trainer started (nothing to save)" ;;
    *)
      if (( signal )); then
        why="the trainer ended with exit $rc after a stop signal (not a crash; the newest checkpoint stands)"
      else
        retries=$((retries + 1))
        if (( retries > max )) && [[ $slurm == running ]]; then
          echo "fail $retries crashed (exit $rc) $retries times in a row without a new checkpoint: giving up," \
               "not requeued (MAX_RETRIES=$max; fix the cause and sbatch again)"
          return
        fi
        why="crashed (exit $rc)"
        [[ $slurm == running ]] && why+=": retry $retries/$max"
        (( progress )) && why+=" (a new checkpoint since the last start)"
      fi ;;
  esac
  case $slurm in
    running) echo "requeue $retries $why" ;;
    requeued) echo "leave $retries $why; SLURM has requeued the job itself (scontrol requeue, node failure or" \
                   "preemption): it resumes from the newest checkpoint when it starts again" ;;
    unknown) echo "leave $retries $why, but SLURM did not answer (scontrol show job failed): not requeued;" \
                  "sbatch again to resume from the newest checkpoint" ;;
    *) echo "leave $retries $why, but the job is ${slurm#ended:} (cancelled, past its time limit or preempted)" \
            "and SLURM will not requeue it: not requeued; sbatch again to resume from the newest checkpoint" ;;
  esac
}

if [[ ${1:-} == --decide ]]; then
  (( $# == 8 )) || fail 2 "--decide takes RC SIGNAL NEW_CKPT SLURM RETRIES MAX UNSTARTED, got: ${*:2}"
  decide "${@:2}"
  exit 0
fi

[[ -n ${SLURM_JOB_ID:-} ]] || fail 2 "not inside a SLURM job: submit with sbatch slurm/train_xl.sh"
trap note_signal USR1 TERM   # a stop signal before the trainer runs: requeue without starting it

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
[[ -z ${DATA:-} || $DATA == *://* || -e $DATA ]] || fail 2 "data path '$DATA' does not exist (DATA=...)"
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
# The stop margin: SLURM's warning signal must leave time to reach a step boundary, save and exit
# ----------------------------------------------------------------------------------------------------------
SIGNAL_MARGIN=${SIGNAL_MARGIN:-600}
last_save_seconds() {  # the trainer writes each save's duration to metrics.jsonl ("checkpoint" events)
  grep '"event": "checkpoint"' "$RUN_DIR/metrics.jsonl" 2>/dev/null | tail -n 1 | grep -o '"seconds": [0-9.]*' \
    | cut -d' ' -f2
}
check_margin() {  # at start: warn when the last save would not fit twice in the margin, plus a minute
  local last need
  last=$(last_save_seconds)
  [[ -n $last ]] || return 0
  need=$(( 2 * ${last%.*} + 60 ))
  if (( SIGNAL_MARGIN < need )); then
    both "warning: the last checkpoint took $last s to save: a stop margin of $SIGNAL_MARGIN s (SIGNAL_MARGIN) is" \
         "too small; submit with --signal=B:USR1@$need or more and SIGNAL_MARGIN=$need (README: Preemption)"
  else
    say "stop margin $SIGNAL_MARGIN s, last checkpoint save $last s"
  fi
}
report_signal_margin() {  # after a stop signal: when it came, against the save time
  (( SIGNALLED )) || return 0
  local end
  end=$(date -d "$(job_field EndTime)" +%s 2>/dev/null) || return 0
  say "the stop signal came $((end - SIGNAL_TIME)) s before the job's time limit; the last checkpoint took" \
      "$(last_save_seconds) s to save"
}

# ----------------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------------
tasks_per_node=${SLURM_NTASKS_PER_NODE:-1}
say "=== job $SLURM_JOB_ID restart $RESTART on $SLURM_JOB_NODELIST: $SLURM_JOB_NUM_NODES node(s) x" \
    "$tasks_per_node task(s), device ${DITSCALE_DEVICE:-cuda}, master $MASTER_ADDR:$MASTER_PORT"
say "run: ${TRAIN[*]}"

checkpoint_mark() { cat "$RUN_DIR/ckpt/latest" 2>/dev/null; }   # the newest complete checkpoint's tag
check_margin
before=$(checkpoint_mark)
# test hook (tests/slurm): DITSCALE_TEST_PAUSE "R:script" holds allocation R here, before srun, until a
# stop signal has come (the trainer's own points are in ditscale/engine/signals.py)
if [[ ,${DITSCALE_TEST_PAUSE:-}, == *",$RESTART:script,"* ]]; then
  say "test pause before srun: waiting for a stop signal"
  while (( ! SIGNALLED )); do sleep 0.1; done
fi
if (( SIGNALLED )); then
  rc=none
  say "got a stop signal before the trainer started: not starting it"
else
  # every task sees all of its node's GPUs and takes cuda:LOCAL_RANK (--gpu-bind=none); a task that ends
  # leaves the others 60 s to end too (a crashed or hung rank must not hold the rest in a collective)
  srun_args=(--ntasks-per-node="$tasks_per_node" --wait=60)
  [[ ${DITSCALE_DEVICE:-} == cpu ]] || srun_args+=(--gpu-bind=none)
  run_srun "${srun_args[@]}" "${TRAIN[@]}"
  rc=$SRUN_RC
  say "trainer exited with $rc"
fi
report_signal_margin

# ----------------------------------------------------------------------------------------------------------
# What next: the decision table (header); SLURM is asked what it is doing with the job
# ----------------------------------------------------------------------------------------------------------
retries_file=$RUN_DIR/.slurm_retries
unstarted_file=$RUN_DIR/.slurm_unstarted
(( RESTART == 0 )) && rm -f "$retries_file" "$unstarted_file"   # a new submission: a fresh budget
progress=0
[[ $before != "$(checkpoint_mark)" ]] && progress=1
unstarted=0
[[ $rc == none ]] && unstarted=$(( $(cat "$unstarted_file" 2>/dev/null || echo 0) + 1 ))
info=$(slurm_job)
if [[ -z $info ]]; then slurm=unknown
elif (( $(job_field Restarts "$info") > RESTART )); then slurm=requeued
else slurm=ended:$(job_field JobState "$info"); [[ $slurm == ended:RUNNING ]] && slurm=running
fi
read -r action retries why < <(decide "$rc" "$SIGNALLED" "$progress" "$slurm" \
                                      "$(cat "$retries_file" 2>/dev/null || echo 0)" "$MAX_RETRIES" "$unstarted")
say "decision: exit $rc, stop signal $SIGNALLED, new checkpoint $progress, SLURM: $slurm -> $action"
echo "$retries" >"$retries_file"
echo "$unstarted" >"$unstarted_file"
code=${rc/none/143}
case $action in
  finish) both "$why"; exit 0 ;;
  fail) both "error: $why"; exit "$code" ;;
  leave) both "$why"; exit "$code" ;;
esac
both "$why: requeueing job $SLURM_JOB_ID"
REPORT=both requeue_and_exit "$code" "resumes from $(checkpoint_mark || echo 'the start')"
