#!/usr/bin/env bash
# A one-node SLURM cluster on this host, for the tests of medjax under SLURM (tests/slurm/):
#   tests/slurm/cluster.sh start DIR   # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf   # then sbatch, srun, squeue, scontrol talk to it
#   tests/slurm/cluster.sh stop DIR    # stops the three daemons started in DIR
#
# Needs Debian's slurm-wlm and munge packages (`apt-get install slurm-wlm munge`) and root, as
# slurmd runs jobs as their submitter. Everything of the cluster lives in DIR (config, munge key
# and socket, state, spool, logs); nothing in /etc is touched, so several clusters can run on one
# host at once: each picks free ports for slurmctld and slurmd. The node declares what `slurmd -C`
# finds on this host (its CPUs and memory), nothing more.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)

stop() {  # each daemon by the pid it recorded, then whatever of them is left after 10 s
  for name in slurmd slurmctld munged; do
    [ -f "$dir/$name.pid" ] || continue
    pid=$(cat "$dir/$name.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/$name.pid"
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  for tool in munged slurmctld slurmd; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install slurm-wlm munge" >&2; exit 1; }
  done
  stop  # a cluster left in DIR by an earlier run
  mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
  chmod 700 "$dir/munge"
  # munged: its own key and socket (the key must be private to the user running it).
  head -c 1024 /dev/urandom > "$dir/munge/munge.key"
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"

  local node ctld_port slurmd_port
  node=$(slurmd -C | awk 'NR == 1 {print}')  # NodeName=<host> CPUs=... RealMemory=...
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  cat > "$dir/slurm.conf" <<EOF
# One-node cluster for medjax's tests (tests/slurm/cluster.sh); not for production.
ClusterName=medjax-test
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers rarely allow them): processes are tracked by their parentage, and each
# task is bound to its CPUs by sched_setaffinity.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# CPUs are what jobs ask for; memory is not scheduled.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
# SIGTERM, then SIGKILL after KillWait seconds: the time a preempted run has to save.
KillWait=30
MinJobAge=300
InactiveLimit=0
SlurmdTimeout=60
$node State=UNKNOWN NodeAddr=127.0.0.1
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  SLURM_CONF=$dir/slurm.conf slurmctld -f "$dir/slurm.conf" -i
  SLURM_CONF=$dir/slurm.conf slurmd -f "$dir/slurm.conf"
  for _ in $(seq 150); do  # the node idle: the cluster takes jobs
    if SLURM_CONF=$dir/slurm.conf sinfo -h -o %t 2>/dev/null | grep -qx idle; then
      echo "SLURM_CONF=$dir/slurm.conf"
      return
    fi
    sleep 0.2
  done
  echo "the node did not come up in 30 s; logs in $dir (slurmctld.log, slurmd.log)" >&2
  tail -5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  stop
  exit 1
}

case $action in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
