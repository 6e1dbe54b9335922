# Sourced by the slurm/*.sh batch scripts: repository, Python, rendezvous and environment defaults.
#
# SLURM runs a copy of the batch script from its spool directory, so the repository is found from the
# submit directory (or DITSCALE_REPO), never from the script's own path.

say() { echo "[$(date '+%F %T')] ${SCRIPT_NAME:-ditscale}: $*"; }
fail() {  # fail CODE MESSAGE: a clear error in the job's output; the caller decides it is not requeued
  local code=$1; shift
  echo "[$(date '+%F %T')] ${SCRIPT_NAME:-ditscale}: error: $*" >&2
  exit "$code"
}

# find_repo: set REPO (the ditscale checkout) and cd into it.
find_repo() {
  REPO=${DITSCALE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
  [[ -f $REPO/ditscale/__init__.py ]] \
    || fail 2 "no ditscale checkout at '$REPO': submit from the repository root or set DITSCALE_REPO"
  cd "$REPO"
}

# find_python: set PYTHON (default: the repository's .venv, else python3 on PATH) and put its directory
# first on PATH, as activating the venv would (its tools, e.g. the ninja that builds DeepSpeed's ops).
find_python() {
  if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
  fi
  command -v "$PYTHON" >/dev/null || fail 2 "PYTHON='$PYTHON' not found"
  local bin
  bin=$(dirname "$(command -v "$PYTHON")")
  [[ -f $bin/activate ]] && export PATH=$bin:$PATH
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
}

# rendezvous_env: MASTER_ADDR = first node of the allocation; MASTER_PORT = 15000 + job id % 15000, or when
# a socket on this node already listens there (two jobs sharing a node whose ids are a multiple of 15,000
# apart, or any other server) the next free port up (`free_port_from`). The batch script runs on the
# allocation's first node, where rank 0 will listen. Ranks come from SLURM_PROCID/NTASKS/LOCALID.
rendezvous_env() {
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE   # a launcher's leftovers would win over SLURM's ranks
  export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  if [[ -z ${MASTER_PORT:-} ]]; then
    MASTER_PORT=$(free_port_from $((15000 + SLURM_JOB_ID % 15000)))
    export MASTER_PORT
  fi
}

# free_port_from P: P, or the first port after it (wrapping within 15000-29999) that no socket on this node
# listens on (from /proc/net/tcp{,6}: no interpreter runs here, not even $PYTHON); P itself when none of the
# next 500 is free (the rendezvous then names the port in its error).
free_port_from() {
  local base=$1 f addr state port i
  local -A listening=()
  for f in /proc/net/tcp /proc/net/tcp6; do
    [[ -r $f ]] || continue
    while read -r _ addr _ state _; do
      if [[ $state == 0A ]]; then listening[$((16#${addr##*:}))]=1; fi
    done < <(tail -n +2 "$f")
  done
  for ((i = 0; i < 500; i++)); do
    port=$((15000 + (base - 15000 + i) % 15000))
    if [[ -z ${listening[$port]:-} ]]; then
      echo "$port"
      return
    fi
  done
  echo "$base"
}

# accelerator_env: GPUS_PER_NODE (default: the allocation's GPUs, else 8; 0 = CPU with gloo) and the
# NCCL / OMP / CUDA defaults. Sets DITSCALE_DEVICE=cpu when there are no GPUs.
accelerator_env() {
  GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export PYTHONUNBUFFERED=1
  if [[ $GPUS_PER_NODE == 0 || ${DITSCALE_DEVICE:-} == cpu ]]; then
    export DITSCALE_DEVICE=cpu
    return
  fi
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
  # NCCL picks InfiniBand / the right interface itself; pin one only where it guesses wrong:
  # export NCCL_SOCKET_IFNAME=ib0  NCCL_IB_HCA=mlx5
}

# run_srun ARGS...: srun in the background, forwarding SIGUSR1/SIGTERM that reach the batch shell
# (`--signal=B:USR1@...`, `scancel --signal=USR1 --batch`) to every task; sets SRUN_RC. Any stop signal
# the batch shell gets (note_signal, also trapped by the scripts before and after srun) sets SIGNALLED=1
# and SIGNAL_TIME (epoch seconds of the first one).
SIGNALLED=0
SIGNAL_TIME=
note_signal() { SIGNALLED=1; SIGNAL_TIME=${SIGNAL_TIME:-$(date +%s)}; }
run_srun() {
  local pid got=0
  srun "$@" &
  pid=$!
  trap 'got=1; note_signal; say "got SIGUSR1: forwarding to every task"; kill -USR1 $pid 2>/dev/null' USR1
  trap 'got=1; note_signal; say "got SIGTERM: forwarding to every task"; kill -TERM $pid 2>/dev/null' TERM
  while :; do
    wait "$pid"
    SRUN_RC=$?
    # a trapped signal interrupts `wait` with 128+n while srun keeps running: wait again
    if (( SRUN_RC > 128 && got )); then got=0; continue; fi
    break
  done
  trap note_signal USR1 TERM   # from here on, only remember a late signal
}

# slurm_job [ID]: SLURM's one-line record of a job (default: this one), asked with stop signals ignored (a
# signal must not cut scontrol short); job_field NAME [RECORD]: one field of it.
slurm_job() { ( trap '' USR1 TERM; exec scontrol show job -o "${1:-$SLURM_JOB_ID}" ) 2>/dev/null; }
job_field() { grep -o "$1=[^ ]*" <<<"${2-$(slurm_job)}" | cut -d= -f2-; }

# requeue_and_exit CODE RESUME [ID]: `scontrol requeue` the job (an array task: its own ID), say what SLURM
# then makes of it, and exit CODE. RESUME says where the next allocation starts ("resumes from ...").
# Messages go through REPORT (default: say). From here on stop signals are ignored: the decision is made,
# and the requeue's own SIGTERM, which follows at once, cannot cut the requeue or the question after it.
requeue_and_exit() {
  local code=$1 resume=$2 id=${3:-$SLURM_JOB_ID} report=${REPORT:-say} restart=${SLURM_RESTART_COUNT:-0}
  local err info state restarts
  trap '' USR1 TERM
  if ! err=$(scontrol requeue "$id" 2>&1); then
    state=$(job_field JobState "$(slurm_job "$id")")
    $report "error: scontrol requeue failed (${err:-no message}); SLURM says the job is ${state:-unknown}: not" \
            "requeued; sbatch again to resume"
    exit "$code"
  fi
  info=$(slurm_job "$id")
  state=$(job_field JobState "$info")
  restarts=$(job_field Restarts "$info")
  if [[ $restarts =~ ^[0-9]+$ ]] && (( restarts > restart )); then
    $report "SLURM: job $id is requeued (Restarts=$restarts; this allocation is $state): it starts again" \
            "when nodes are free and $resume"
  else
    $report "error: after scontrol requeue SLURM says job $id is ${state:-unknown} with" \
            "Restarts=${restarts:-unknown} (was $restart): it may not start again; if squeue does not list it," \
            "sbatch again to resume"
  fi
  exit "$code"
}
