#!/usr/bin/env bash
# A 2-node SLURM cluster on this one machine, for the tests and CI:
#   scripts/slurm_local_cluster.sh start   install (Debian packages) if missing, start munged, slurmctld
#                                          and two slurmd "nodes" (node1, node2); idempotent
#   scripts/slurm_local_cluster.sh stop    cancel its jobs, stop the daemons it started (pid files)
#   scripts/slurm_local_cluster.sh env     print the `export SLURM_CONF=...` line clients need
#
# Settings (environment): DISTLORA_SLURM_ROOT (/tmp/distlora-slurm) holds config, state, logs, pids;
# DISTLORA_SLURM_PORT (16817) is slurmctld's port, node i listens on PORT+i. Both differ from
# SLURM's defaults so that this cluster never meets another one on the same machine.
#
# Choices that the tests rely on:
# - cred_expire=5 in AuthInfo: a requeued job may start again after 5 s (default 120 s).
# - Node names do not resolve: every node has NodeAddr=127.0.0.1 and its own port. Job scripts
#   take the main address from `scontrol show node` (NodeAddr), as on a real cluster.
# - No systemd here: daemons are started directly and found again through their pid files.
set -euo pipefail

ROOT=${DISTLORA_SLURM_ROOT:-/tmp/distlora-slurm}
PORT=${DISTLORA_SLURM_PORT:-16817}
NODES=(node1 node2)
CONF=$ROOT/etc/slurm.conf
export SLURM_CONF=$CONF

say() { echo "[slurm_local_cluster $(date +%T)] $*" >&2; }

# running <pidfile> <name>: the pid in the file is alive and is that program
running() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -d "/proc/$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}

install_if_missing() {
  local missing=0 cmd
  for cmd in slurmctld slurmd sbatch munged; do command -v "$cmd" >/dev/null || missing=1; done
  [ "$missing" = 0 ] && return 0
  say "installing slurmctld slurmd slurm-client munge (Debian packages)"
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "ERROR: SLURM is not installed and apt-get as root is not available here"
    return 1
  fi
  # keep the packages' postinst from starting system services (no systemd here)
  local policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_added=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get update -qq || rc=$?
  if [ "$rc" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null || rc=$?
  fi
  if [ "$policy_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  return "$rc"
}

write_config() {
  local host ncpu mem i
  host=$(hostname -s)
  ncpu=$(nproc)
  # each node gets 40% of the memory (in MB), so two nodes fit with room for the rest
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.4)}' /proc/meminfo)
  mkdir -p "$ROOT/etc" "$ROOT/state" "$ROOT/log" "$ROOT/run" "$ROOT/munge"
  for n in "${NODES[@]}"; do mkdir -p "$ROOT/spool/$n"; done
  chmod 755 "$ROOT/munge"
  {
    echo "ClusterName=distlora-ci"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmctldPort=$PORT"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$ROOT/munge/munge.socket.2,cred_expire=5"
    echo "StateSaveLocation=$ROOT/state"
    echo "SlurmdSpoolDir=$ROOT/spool/%n"
    echo "SlurmctldPidFile=$ROOT/run/slurmctld.pid"
    echo "SlurmdPidFile=$ROOT/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$ROOT/log/slurmctld.log"
    echo "SlurmdLogFile=$ROOT/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/pgid"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "MpiDefault=none"
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$ROOT/log/jobcomp.log"
    echo "MailProg=/bin/true"
    echo "ReturnToService=2"
    echo "KillWait=5"
    echo "MinJobAge=600"
    echo "SchedulerParameters=sched_interval=2,bf_interval=1,batch_sched_delay=0"
    i=0
    for n in "${NODES[@]}"; do
      i=$((i + 1))
      echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$ncpu RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF.new"
  if running "$ROOT/run/slurmctld.pid" slurmctld && ! cmp -s "$CONF.new" "$CONF"; then
    say "ERROR: slurmctld already runs with another config; run '$0 stop' first"
    return 1
  fi
  mv "$CONF.new" "$CONF"
}

start() {
  install_if_missing
  write_config
  if ! running "$ROOT/munge/munged.pid" munged; then
    [ -s "$ROOT/munge/munge.key" ] || mungekey --create --keyfile="$ROOT/munge/munge.key"
    chmod 600 "$ROOT/munge/munge.key"
    rm -f "$ROOT"/munge/munge.socket.2*
    munged --socket="$ROOT/munge/munge.socket.2" --key-file="$ROOT/munge/munge.key" \
      --log-file="$ROOT/munge/munged.log" --pid-file="$ROOT/munge/munged.pid" \
      --seed-file="$ROOT/munge/munged.seed"
    say "munged started"
  fi
  if ! running "$ROOT/run/slurmctld.pid" slurmctld; then
    slurmctld -f "$CONF"
    for _ in $(seq 1 100); do
      scontrol ping 2>/dev/null | grep -q 'is UP' && break
      sleep 0.1
    done
    say "slurmctld started"
  fi
  for n in "${NODES[@]}"; do
    if ! running "$ROOT/run/slurmd-$n.pid" slurmd; then
      slurmd -f "$CONF" -N "$n"
      say "slurmd $n started"
    fi
  done
  # ready = both nodes idle (or busy with jobs) in the partition, within 60 s
  local state
  for _ in $(seq 1 300); do
    state=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null || true)
    if [ "$(echo "$state" | grep -cE ' (idle|mix|alloc)$')" = "${#NODES[@]}" ]; then
      say "cluster ready: $(echo "$state" | tr '\n' ' ')"
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.2
  done
  say "ERROR: nodes not ready: $state"
  tail -n 20 "$ROOT/log/slurmctld.log" >&2 || true
  return 1
}

stop_pid() {  # stop_pid <name> <pidfile>: TERM, wait up to 10 s, then KILL
  local pid
  if running "$2" "$1"; then
    pid=$(cat "$2")
    kill -TERM "$pid" || true
    for _ in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid" || true; fi
    say "stopped $1 ($pid)"
  fi
  rm -f "$2"
}

stop() {
  if running "$ROOT/run/slurmctld.pid" slurmctld; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086  # one argument per job id
      scancel $jobs || true
      for _ in $(seq 1 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  for n in "${NODES[@]}"; do stop_pid slurmd "$ROOT/run/slurmd-$n.pid"; done
  stop_pid slurmctld "$ROOT/run/slurmctld.pid"
  stop_pid munged "$ROOT/munge/munged.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
