#!/usr/bin/env bash
# A real SLURM cluster on this machine, from Debian's packages, for tests and for trying the scripts.
#
#   slurm/local_cluster.sh start [--nodes 1|2] [--cpus N]   # prints `export SLURM_CONF=...` on stdout
#   slurm/local_cluster.sh status | stop | env
#   eval "$(slurm/local_cluster.sh start --nodes 2)" && sbatch --nodes=2 --wrap 'srun hostname'
#
# Runs as root: munged (as the munge user) with its own key and socket, slurmctld, and one slurmd per node
# (`slurmd -N node1`, `-N node2` for two nodes on one machine). Everything lives in $DITSCALE_SLURM_DIR
# (default /tmp/ditscale-slurm): slurm.conf, munge key/socket, state, spool, pid and log files.
# Two nodes on one machine are kept apart like real ones where it matters to jobs: each slurmd runs in its
# own mount namespace with a private /dev/shm, and a TaskProlog gives each node's tasks their own TMPDIR.
# Needs: apt-get install slurmctld slurmd slurm-client munge.
#
# Environment: DITSCALE_SLURM_DIR, DITSCALE_SLURM_PORT (slurmctld port, default 6817; slurmd ports follow),
# DITSCALE_SLURM_CPUS (CPUs per node, default nproc), DITSCALE_SLURM_PARTITION (default "debug").
set -euo pipefail

DIR=${DITSCALE_SLURM_DIR:-/tmp/ditscale-slurm}
CONF=$DIR/slurm.conf
PORT=${DITSCALE_SLURM_PORT:-6817}
PARTITION=${DITSCALE_SLURM_PARTITION:-debug}
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
HOST=$(hostname -s)

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds; false after SECONDS
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || return 1
    sleep 0.5
  done
}

stop_pidfiles() {  # SIGTERM the daemons named by pid files, wait up to 10 s, then SIGKILL
  local f pids=() pid
  for f in "$@"; do
    pid=$(cat "$f" 2>/dev/null) || continue
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  for _ in $(seq 50); do
    pid=
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; pid=; done
    [[ -n $pid ]] || break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null && { log "killing $pid"; kill -KILL "$pid" 2>/dev/null || true; }
  done
  rm -f "$@"
}

node_names() {  # node names of the configured cluster, one per line
  local n
  n=$(cat "$DIR/nodes" 2>/dev/null || echo 1)
  if [[ $n == 1 ]]; then echo "$HOST"; else seq -f 'node%g' 1 "$n"; fi
}

job_pids() {  # processes of this cluster's jobs: a job id and our slurm.conf in their environment
  local p env
  for p in /proc/[0-9]*; do
    env=$({ tr '\0' '\n' <"$p/environ"; } 2>/dev/null) || continue
    grep -qx "SLURM_CONF=$CONF" <<<"$env" && grep -q '^SLURM_JOB_ID=' <<<"$env" && echo "${p#/proc/}"
  done
  return 0
}

require_tools() {
  (( EUID == 0 )) || die "must run as root (SlurmUser=root, munged is started as the munge user)"
  local t missing=()
  for t in slurmctld slurmd sinfo sbatch scontrol munged mungekey munge unmunge runuser; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  (( ${#missing[@]} == 0 )) || die "missing ${missing[*]}: apt-get install slurmctld slurmd slurm-client munge"
  id munge >/dev/null 2>&1 || die "no 'munge' user: apt-get install munge"
}

# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
write_conf() {  # write_conf NODES CPUS > slurm.conf
  local nodes=$1 cpus=$2 mem_mb
  # RealMemory below the machine's: each slurmd sees all of it, the nodes share it.
  mem_mb=$(awk -v n="$nodes" '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8 / n}' /proc/meminfo)
  {
    echo "# Written by slurm/local_cluster.sh: a local test cluster ($nodes node(s) on $HOST)."
    echo "ClusterName=ditscale"
    echo "SlurmctldHost=$HOST(127.0.0.1)"
    echo "SlurmctldPort=$PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # cred_expire is also how long a requeued job waits before it may start again (default 120 s).
    echo "AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5"
    echo "StateSaveLocation=$DIR/ctld"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$DIR/log/jobcomp.log"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "MpiDefault=none"
    echo "MailProg=/bin/true"
    echo "TaskProlog=$DIR/task_prolog.sh"
    echo "SchedulerType=sched/builtin"
    echo "SchedulerParameters=sched_interval=2"
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    echo "MinJobAge=1200"   # finished jobs stay in scontrol 20 min: tests read them after others ran
    echo "KillWait=30"   # SIGTERM to SIGKILL, as SLURM's default: scancel or a requeue leave the trainer time to save
    echo "InactiveLimit=0"
    echo "SlurmctldTimeout=30"
    echo "SlurmdTimeout=60"
    if [[ $nodes == 1 ]]; then
      echo "SlurmdPort=$((PORT + 1))"
      echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    else
      local i
      for i in $(seq 1 "$nodes"); do
        echo "NodeName=node$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + i))" \
             "CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
      done
    fi
    echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  }
}

add_hosts_line() {  # node1 node2 must resolve (MASTER_ADDR is a node name); idempotent
  local want=() n
  for n in "$@"; do
    getent hosts "$n" >/dev/null 2>&1 || want+=("$n")
  done
  (( ${#want[@]} == 0 )) && return 0
  echo "127.0.0.1 ${want[*]}" >>/etc/hosts || die "cannot add '127.0.0.1 ${want[*]}' to /etc/hosts"
  log "added '127.0.0.1 ${want[*]}' to /etc/hosts"
}

# ----------------------------------------------------------------------------------------------------------
# Daemons
# ----------------------------------------------------------------------------------------------------------
munge_ok() { munge --socket="$MUNGE_SOCKET" -n | unmunge --socket="$MUNGE_SOCKET"; }

start_munge() {
  if pid_alive "$MUNGE_DIR/munged.pid" && munge_ok >/dev/null 2>&1; then return 0; fi
  install -d -o munge -g munge -m 0711 "$MUNGE_DIR"
  if [[ ! -s $MUNGE_DIR/munge.key ]]; then
    runuser -u munge -- mungekey -c -k "$MUNGE_DIR/munge.key"
  fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  env -u SLURM_CONF runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" \
    || die "munged did not start; see $MUNGE_DIR/munged.log"
  wait_for 20 munge_ok || die "munged does not answer on $MUNGE_SOCKET; see $MUNGE_DIR/munged.log"
}

write_task_prolog() {  # node-local TMPDIR for every task (its stdout lines `export X=Y` set the task's env)
  printf '#!/bin/sh\nd=%s/node-tmp/$SLURMD_NODENAME\nmkdir -p "$d" && echo "export TMPDIR=$d"\n' "$DIR" \
    >"$DIR/task_prolog.sh"
  chmod 0755 "$DIR/task_prolog.sh"
}

start_slurmd() {  # start_slurmd NODE: with its own /dev/shm when several nodes share this machine
  local n=$1
  if [[ $(cat "$DIR/nodes") != 1 ]] && command -v unshare >/dev/null \
     && unshare --mount --propagation private true 2>/dev/null; then
    unshare --mount --propagation private sh -c \
      'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec slurmd -f "$1" -N "$2"' sh "$CONF" "$n"
  else
    [[ $(cat "$DIR/nodes") == 1 ]] || log "warning: no mount namespaces here: the nodes share /dev/shm"
    slurmd -f "$CONF" -N "$n"
  fi
}

ctld_up() { scontrol ping | grep -q 'is UP'; }

nodes_idle() {  # every node of the cluster is up (idle, mixed or allocated)
  local states
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  [[ -n $states ]] || return 1
  ! grep -qvE ' (idle|mix|alloc|comp)$' <<<"$states"
}

start_daemons() {
  export SLURM_CONF=$CONF
  start_munge
  if ! pid_alive "$DIR/run/slurmctld.pid"; then
    slurmctld -c -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  fi
  wait_for 30 ctld_up || die "slurmctld does not answer; see $DIR/log/slurmctld.log"
  local n
  for n in $(node_names); do
    mkdir -p "$DIR/spool/$n"
    pid_alive "$DIR/run/slurmd-$n.pid" && continue
    start_slurmd "$n" || die "slurmd -N $n did not start; see $DIR/log/slurmd-$n.log"
  done
  if ! wait_for 60 nodes_idle; then
    sinfo -N -l >&2 || true
    die "nodes did not come up; see $DIR/log/slurmd-*.log and $DIR/log/slurmctld.log"
  fi
}

daemons_running() {
  pid_alive "$MUNGE_DIR/munged.pid" && pid_alive "$DIR/run/slurmctld.pid" || return 1
  local n
  for n in $(node_names); do pid_alive "$DIR/run/slurmd-$n.pid" || return 1; done
}

# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
cmd_start() {
  local nodes=1 cpus=${DITSCALE_SLURM_CPUS:-$(nproc)}
  while (( $# )); do
    case $1 in
      --nodes) nodes=${2:?--nodes needs a value}; shift 2 ;;
      --nodes=*) nodes=${1#*=}; shift ;;
      --cpus) cpus=${2:?--cpus needs a value}; shift 2 ;;
      --cpus=*) cpus=${1#*=}; shift ;;
      *) die "unknown option '$1' (start takes --nodes 1|2, --cpus N)" ;;
    esac
  done
  [[ $nodes == 1 || $nodes == 2 ]] || die "--nodes must be 1 or 2, got '$nodes'"
  [[ $cpus =~ ^[1-9][0-9]*$ ]] || die "--cpus must be a positive integer, got '$cpus'"
  require_tools
  mkdir -p "$DIR"
  write_conf "$nodes" "$cpus" >"$DIR/slurm.conf.new"
  if [[ -f $CONF ]] && cmp -s "$CONF" "$DIR/slurm.conf.new" && daemons_running; then
    rm -f "$DIR/slurm.conf.new"
    SLURM_CONF=$CONF wait_for 30 nodes_idle \
      || die "cluster is running but its nodes are not up; try '$0 stop' then start"
    log "already running ($nodes node(s)) in $DIR"
  else
    [[ -f $CONF ]] && cmd_stop
    (( nodes > 1 )) && add_hosts_line $(seq -f 'node%g' 1 "$nodes")
    mkdir -p "$DIR"/{ctld,spool,run,log}
    mv "$DIR/slurm.conf.new" "$CONF"
    echo "$nodes" >"$DIR/nodes"
    write_task_prolog
    start_daemons
    log "started $nodes node(s) x $cpus CPU(s) in $DIR"
  fi
  echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
  export SLURM_CONF=$CONF
  if [[ -f $CONF ]] && pid_alive "$DIR/run/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      log "cancelling jobs: $(echo $jobs)"
      scancel $jobs 2>/dev/null || true
      wait_for 20 bash -c '[[ -z $(squeue -h -o %A) ]]' || log "jobs still listed after 20 s"
    fi
  fi
  local left
  stop_pidfiles $(node_names | sed "s|.*|$DIR/run/slurmd-&.pid|")
  stop_pidfiles "$DIR/run/slurmctld.pid"
  # Job processes outlive slurmd when it is stopped mid-job; they are found by the SLURM_CONF they carry.
  left=$(job_pids)
  if [[ -n $left ]]; then
    log "stopping leftover job processes: $(echo $left)"
    kill -TERM $left 2>/dev/null || true
    sleep 1
    kill -KILL $(job_pids) 2>/dev/null || true
  fi
  stop_pidfiles "$MUNGE_DIR/munged.pid"
  rm -rf "$DIR/node-tmp"
  log "stopped ($DIR)"
}

cmd_status() {
  [[ -f $CONF ]] || { log "not configured ($CONF missing)"; return 1; }
  export SLURM_CONF=$CONF
  local rc=0 f
  for f in "$MUNGE_DIR/munged.pid" "$DIR/run/slurmctld.pid" $(node_names | sed "s|.*|$DIR/run/slurmd-&.pid|"); do
    if pid_alive "$f"; then log "up:   $(basename "$f" .pid) (pid $(cat "$f"))"
    else log "down: $(basename "$f" .pid)"; rc=1; fi
  done
  if (( rc == 0 )); then sinfo -N -l >&2; squeue >&2; fi
  echo "export SLURM_CONF=$CONF"
  return $rc
}

case ${1:-} in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) usage ;;
esac
