#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and for trying the batch scripts:
# munge, slurmctld and two slurmd "nodes" (node1, node2) on loopback ports, all state under
# one directory.   slurm/local/cluster.sh up|down|status|is-up|env
#
# Needs root (installs slurm-wlm and munge from the system's packages when missing). No
# cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none. Clients find it with
#   eval "$(slurm/local/cluster.sh env)"     # exports SLURM_CONF
set -euo pipefail
STATE=${DGXTRAIN_SLURM_DIR:-/tmp/dgxtrain-slurm}
CONF=$STATE/slurm.conf
NODES=(node1 node2)
CPUS=${DGXTRAIN_SLURM_CPUS:-2}   # per node; both nodes share this machine's cores
GPUS=8                           # per node, stand-ins (see write_conf)
say() { echo "[cluster] $*" >&2; }

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [[ $(id -u) == 0 ]] || { say "not root: cannot install slurm-wlm and munge"; exit 3; }
  say "installing slurm-wlm and munge"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  mkdir -p "$STATE"/{ctld,log,run,munge}
  # Our own munge key and socket: nothing of the system's munge is used or changed.
  [[ -f $STATE/munge/munge.key ]] || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=128 count=1 status=none
  chmod 700 "$STATE/munge"; chmod 600 "$STATE/munge/munge.key"
  {
    echo "ClusterName=dgxlocal"
    echo "SlurmctldHost=localhost(127.0.0.1)"
    echo "SlurmctldPort=${DGXTRAIN_SLURM_PORT:-16817}"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$STATE/munge/munge.sock"
    echo "CredType=cred/munge"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "StateSaveLocation=$STATE/ctld"
    echo "SlurmdSpoolDir=$STATE/spool-%n"
    echo "SlurmctldPidFile=$STATE/run/slurmctld.pid"
    echo "SlurmdPidFile=$STATE/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$STATE/log/slurmctld.log"
    echo "SlurmdLogFile=$STATE/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "SchedulerType=sched/backfill"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "MpiDefault=none"
    echo "ReturnToService=2"
    echo "SlurmdTimeout=60"
    echo "KillWait=10"
    echo "JobRequeue=1"
    echo "MaxJobCount=1000"
    # Stand-in GPUs (empty device files): jobs written for DGX nodes (--gpus-per-node=8)
    # run unchanged; their processes find no CUDA device and train on the CPU.
    echo "GresTypes=gpu"
    local port=16818
    for n in "${NODES[@]}"; do
      echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=2048 Gres=gpu:$GPUS State=UNKNOWN"
      port=$((port + 1))
    done
    # Preemption as on a shared DGX cluster: a job in `urgent` takes the nodes of `debug`
    # jobs, which get SIGTERM, GraceTime seconds to save, then SIGKILL, and are requeued.
    echo "PreemptType=preempt/partition_prio"
    echo "PreemptMode=REQUEUE"
    local all; all=$(IFS=,; echo "${NODES[*]}")
    echo "PartitionName=debug Nodes=$all Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4 PriorityTier=1 GraceTime=${DGXTRAIN_SLURM_GRACE_S:-30}"
    echo "PartitionName=urgent Nodes=$all MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=2 PreemptMode=OFF"
  } >"$CONF"
  # slurmd drops GPUs that have no device file: empty files stand in for /dev/nvidia*.
  mkdir -p "$STATE/dev"; for i in $(seq 0 $((GPUS - 1))); do : >"$STATE/dev/gpu$i"; done
  printf "AutoDetect=off\nNodeName=%s Name=gpu File=%s\n" "$(IFS=,; echo "${NODES[*]}")" \
    "$STATE/dev/gpu[0-$((GPUS - 1))]" >"$STATE/gres.conf"
}

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  install
  write_conf
  export SLURM_CONF=$CONF  # the daemons find gres.conf next to it
  if ! running "$STATE/run/munged.pid"; then
    munged --force --socket="$STATE/munge/munge.sock" --key-file="$STATE/munge/munge.key" \
      --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
      --seed-file="$STATE/munge/munge.seed"
  fi
  running "$STATE/run/slurmctld.pid" || slurmctld -f "$CONF" -i
  for n in "${NODES[@]}"; do
    running "$STATE/run/slurmd-$n.pid" || slurmd -f "$CONF" -N "$n"
  done
  for _ in $(seq 60); do
    if [[ $(sinfo -h -N -o '%T' 2>/dev/null | grep -c idle) -ge ${#NODES[@]} ]]; then
      say "up: ${NODES[*]} idle (SLURM_CONF=$CONF)"; return 0
    fi
    sleep 1
  done
  say "nodes did not come up; see $STATE/log/"; sinfo >&2 || true; exit 1
}

down() {
  # Exactly the processes this script started, by their pid files.
  for f in "$STATE"/run/slurmd-*.pid "$STATE/run/slurmctld.pid" "$STATE/run/munged.pid"; do
    [[ -f $f ]] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  say "down"
}

status() {
  for f in "$STATE"/run/*.pid; do
    [[ -f $f ]] && echo "$(basename "$f" .pid): $(running "$f" && echo running || echo stopped)"
  done
  SLURM_CONF=$CONF sinfo 2>/dev/null || true
}

is_up() {  # every daemon of ours running
  running "$STATE/run/munged.pid" && running "$STATE/run/slurmctld.pid" || return 1
  for n in "${NODES[@]}"; do running "$STATE/run/slurmd-$n.pid" || return 1; done
}

case "${1:-}" in
  up) up ;;
  is-up) is_up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|status|is-up|env" >&2; exit 2 ;;
esac
