#!/usr/bin/env bash
# A real Slurm cluster for the tests (Debian's Slurm 22.05 + munge), on this machine only.
#   tests/slurm_cluster.sh start [--nodes N]   install if missing, start munged, slurmctld and N
#                                              slurmd, wait until every node is idle; prints
#                                              `export SLURM_CONF=...` (also in tests/.slurm/env)
#   tests/slurm_cluster.sh stop                cancel jobs, stop the daemons (TERM, then KILL),
#                                              remove the namespaces, veths and bridge it made
#   tests/slurm_cluster.sh kill-node N         node N dies as a powered-off machine does: its link
#                                              goes down first (no peer sees a reset), then every
#                                              process in its namespace (slurmd, job steps, ranks)
#                                              is SIGKILLed
#   tests/slurm_cluster.sh revive-node N       its link comes back and its slurmd starts again
#
# One node (the default without namespaces): node1 on 127.0.0.1.
# Two or more nodes: each slurmd runs in its own network namespace (dipnet-node1, ...) joined to a
# bridge (dipnetbr0) by a veth pair, with link-local addresses 169.254.77.1 (slurmctld, on the
# bridge) and 169.254.77.1N (node N). Those addresses exist only inside what this script creates
# and are removed on stop; nothing else is ever contacted. munge is shared through the file
# system (its socket is a file). Each node declares the machine's CPUs; test jobs ask for few.
# State lives in tests/.slurm/. Facts and fixes: ../shared/docs/SLURM_LOCAL.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="$here/.slurm"
conf="$dir/etc/slurm.conf"
BR=dipnetbr0
NET=169.254.77

log() { echo "[slurm_cluster] $*" >&2; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return 0
  log "installing slurmctld slurmd slurm-client munge"
  # Keep the packages' post-install scripts from starting services (no systemd here).
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge iproute2 >/dev/null
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

netns_up() {  # namespaces, veths and the bridge for N nodes
  local n=$1
  ip link show "$BR" >/dev/null 2>&1 || { ip link add "$BR" type bridge && ip addr add "$NET.1/24" dev "$BR"; }
  ip link set "$BR" up
  for i in $(seq 1 "$n"); do
    ip netns list | grep -qw "dipnet-node$i" || ip netns add "dipnet-node$i"
    if ! ip link show "dipnetv$i" >/dev/null 2>&1; then
      ip link add "dipnetv$i" type veth peer name eth0 netns "dipnet-node$i"
      ip link set "dipnetv$i" master "$BR" up
      ip -n "dipnet-node$i" addr add "$NET.1$i/24" dev eth0
      ip -n "dipnet-node$i" link set eth0 up
      ip -n "dipnet-node$i" link set lo up
    fi
  done
}

netns_down() {
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^dipnet-node' || true); do ip netns del "$ns" || true; done
  for l in $(ip -br link 2>/dev/null | awk '{print $1}' | grep '^dipnetv' | sed 's/@.*//' || true); do ip link del "$l" 2>/dev/null || true; done
  ip link show "$BR" >/dev/null 2>&1 && ip link del "$BR" || true
}

start_slurmd() {  # node index, node count
  local i=$1 nodes=$2
  mkdir -p "$dir/spool/node$i"
  alive "$dir/run/slurmd-node$i.pid" && return 0
  if [ "$nodes" -gt 1 ]; then
    # nsenter --net, not `ip netns exec`: the latter also remounts /sys, hiding the cgroup
    # file system slurmd needs; only the network is this node's own.
    SLURM_CONF="$conf" setsid nsenter --net="/run/netns/dipnet-node$i" slurmd -D -N "node$i" -f "$conf" >>"$dir/log/slurmd-node$i.out" 2>&1 < /dev/null &
  else
    SLURM_CONF="$conf" setsid slurmd -D -N node1 -f "$conf" >>"$dir/log/slurmd-node1.out" 2>&1 < /dev/null &
  fi
}

need_node() {  # N -> the node exists in the running multi-node cluster
  local i=$1
  [[ "$i" =~ ^[0-9]+$ ]] || { log "node index must be a number, got '$i'"; exit 2; }
  local nodes; nodes=$(cat "$dir/nodes" 2>/dev/null || echo 0)
  if [ "$nodes" -lt 2 ] || [ "$i" -lt 1 ] || [ "$i" -gt "$nodes" ]; then
    log "no node $i in a multi-node test cluster (nodes: $nodes)"; exit 2
  fi
}

kill_node() {
  local i=$1; need_node "$i"
  ip link set "dipnetv$i" down
  local pids; pids=$(ip netns pids "dipnet-node$i" || true)
  if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null || true; fi
  log "node$i killed (link down, $(wc -w <<<"$pids") process(es) SIGKILLed)"
}

revive_node() {
  local i=$1; need_node "$i"
  ip link set "dipnetv$i" up
  export SLURM_CONF="$conf"
  start_slurmd "$i" "$(cat "$dir/nodes")"
  log "node$i revived (slurmd started)"
}

start() {
  local nodes=1
  if [ "${1:-}" = "--nodes" ]; then nodes=$2; fi
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
  local cpus cores threads mem ctl
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$c")
  cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$c")
  threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$c")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$c")
  # Each node declares twice this machine's cores and 80% of its memory (slurmd takes the declared
  # counts: config_overrides). The two xdist workers submit side by side and their test jobs
  # mostly wait (Slurm's holds, rank start-up); declared as they are, every test job (2 CPUs)
  # filled a node and one worker's job queued behind the other's (40 s of queueing in a suite run,
  # 18 s now; docs/testing.md). Each node runs two test jobs at once; the node-loss test still
  # has its nodes to itself (--exclusive). The jobs' --mem is sized for real models (3 GiB a
  # process, docs/cluster.md), far above a tiny test job's use, and Slurm here enforces none.
  cpus=$(( cpus * 2 )); cores=$(( cores * 2 ))
  mem=$(( mem * 8 / 10 ))
  local nodelines=""
  if [ "$nodes" -gt 1 ]; then
    netns_up "$nodes"
    ctl="$NET.1"
    for i in $(seq 1 "$nodes"); do
      nodelines+="NodeName=node$i NodeAddr=$NET.1$i CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN"$'\n'
    done
  else
    ctl=127.0.0.1
    nodelines="NodeName=node1 NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN"$'\n'
  fi
  cat > "$conf" <<CONF
ClusterName=dipnettest
SlurmctldHost=$(hostname -s)($ctl)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmdParameters=config_overrides
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
# Time for ranks to finish their step and write a checkpoint after SIGTERM (requeue, time limit).
KillWait=15
# Slurm holds a requeued job cred_expire+1 s (default 120) before starting it again: each node
# revokes the old start's credential only once it has finished cleaning that start up, and a
# new start whose credential is not newer than the revocation is refused ("already killed, do
# not launch batch job": the job fails with JobLaunchFailure). So the hold must outlast the old
# start's end (at most KillWait, then SIGKILL): 20 s here, and the tests never cut it short.
AuthInfo=cred_expire=20
# A requeued job whose hold has ended waits for the next scheduling pass (the main loop runs every
# 60 s by default: 74 s from requeue to start measured here); a small cluster can look every 2 s.
SchedulerParameters=sched_interval=2,bf_interval=2
# Finished jobs stay visible to `scontrol show job` for an hour: a chain slowed by requeues on a
# loaded machine outlived 300 s, and its first job then read as unknown, never finished.
MinJobAge=3600
JobRequeue=1
# A node that stops answering is DOWN after this long (default 300 s); Slurm then ends its jobs
# and requeues those that allow it (the node-loss test). slurmd answers pings from its own
# thread, so a busy machine does not trip it.
SlurmdTimeout=15
${nodelines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  export SLURM_CONF="$conf"
  alive "$dir/run/slurmctld.pid" || SLURM_CONF="$conf" setsid slurmctld -D -i -f "$conf" >>"$dir/log/slurmctld.out" 2>&1 < /dev/null &
  sleep 1
  for i in $(seq 1 "$nodes"); do start_slurmd "$i" "$nodes"; done
  local deadline=$(( $(date +%s) + 90 ))
  until [ "$(sinfo -h -o '%T %D' 2>/dev/null | awk '$1 ~ /^(idle|mixed|allocated)$/ {s += $2} END {print s+0}')" -ge "$nodes" ]; do
    if [ "$(date +%s)" -gt "$deadline" ]; then log "nodes never became idle"; sinfo >&2 || true; dump_logs; exit 1; fi
    sleep 0.5
  done
  echo "export SLURM_CONF=$conf" > "$dir/env"
  echo "$nodes" > "$dir/nodes"
  log "cluster up: $(sinfo -h -o '%P %D %T %c CPUs' | tr '\n' ' ')"
  echo "export SLURM_CONF=$conf"
}

stop() {
  export SLURM_CONF="$conf"
  [ -f "$conf" ] && scancel --user="$(id -un)" 2>/dev/null || true
  for f in "$dir"/run/slurmd-*.pid "$dir/run/slurmd.pid" "$dir/run/slurmctld.pid"; do
    [ -f "$f" ] || continue
    if alive "$f"; then
      local pid; pid=$(cat "$f")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do alive "$f" || break; sleep 0.5; done
      alive "$f" && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  netns_down
  rm -f "$dir/nodes"
  log "cluster stopped"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  kill-node) kill_node "${2:-}" ;;
  revive-node) revive_node "${2:-}" ;;
  *) echo "usage: $0 start [--nodes N] | stop | kill-node N | revive-node N" >&2; exit 2 ;;
esac
