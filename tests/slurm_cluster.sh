#!/usr/bin/env bash
# A real one-node Slurm cluster on 127.0.0.1 for the tests (Debian's Slurm 22.05 + munge).
#   tests/slurm_cluster.sh start   install if missing, start munged/slurmctld/slurmd, wait for idle;
#                                  prints `export SLURM_CONF=...` (also written to tests/.slurm/env)
#   tests/slurm_cluster.sh stop    cancel jobs, stop the daemons by PID (TERM, then KILL)
# State lives in tests/.slurm/. Facts and fixes: ../shared/docs/SLURM_LOCAL.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="$here/.slurm"
conf="$dir/etc/slurm.conf"

log() { echo "[slurm_cluster] $*" >&2; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return 0
  log "installing slurmctld slurmd slurm-client munge"
  # Keep the packages' post-install scripts from starting services (no systemd here).
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  rm -f /usr/sbin/policy-rc.d
}

alive() {  # PID file -> running and not a zombie
  local f=$1
  [ -f "$f" ] || return 1
  local pid; pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -d "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null
}

dump_logs() {
  for f in "$dir"/log/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 30 "$f"; } >&2; done
}

start() {
  install_packages
  mkdir -p "$dir"/{etc,state,spool,run,log} /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
  if [ ! -f /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1024 count=1 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid || munged --force
  fi
  local c; c=$(slurmd -C | head -1)
  local cpus sockets cores threads mem
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$c")
  cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$c")
  sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$c")
  threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$c")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$c")
  mem=$(( mem * 9 / 10 ))
  cat > "$conf" <<CONF
ClusterName=dipnettest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$conf"
  alive "$dir/run/slurmctld.pid" || SLURM_CONF="$conf" setsid slurmctld -D -i -f "$conf" >>"$dir/log/slurmctld.out" 2>&1 < /dev/null &
  sleep 1
  alive "$dir/run/slurmd.pid" || SLURM_CONF="$conf" setsid slurmd -D -N localhost -f "$conf" >>"$dir/log/slurmd.out" 2>&1 < /dev/null &
  local deadline=$(( $(date +%s) + 60 ))
  until sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; do
    if [ "$(date +%s)" -gt "$deadline" ]; then log "node never became idle"; sinfo >&2 || true; dump_logs; exit 1; fi
    sleep 0.5
  done
  echo "export SLURM_CONF=$conf" > "$dir/env"
  log "cluster up: $(sinfo -h -o '%P %D %T %c CPUs')"
  echo "export SLURM_CONF=$conf"
}

stop() {
  export SLURM_CONF="$conf"
  [ -f "$conf" ] && scancel --user="$(id -un)" 2>/dev/null || true
  for name in slurmd slurmctld; do
    local f="$dir/run/$name.pid"
    if alive "$f"; then
      local pid; pid=$(cat "$f")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do alive "$f" || break; sleep 0.5; done
      alive "$f" && kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  log "cluster stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
