#!/usr/bin/env bash
# A real one-node Slurm cluster on 127.0.0.1 for the launcher's tests (4 fake GPUs).
#
#   .ci/slurm.sh start DIR   install the Debian packages if missing, write DIR/slurm.conf, start munged,
#                            slurmctld and slurmd (pids in DIR/pids), wait until the node is idle;
#                            prints `export SLURM_CONF=DIR/slurm.conf` on its last line
#   .ci/slurm.sh stop DIR    cancel remaining jobs, stop the three daemons by their recorded pids
#
# Needs root (the daemons run as root, munged as the munge user). State, spool and logs live under
# DIR and are wiped at each start, so job ids start again at 1. Each DIR gets its own munge socket
# and free ports, so clusters of concurrent test sessions on one machine do not meet.
set -euo pipefail

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
export SLURM_CONF=$dir/slurm.conf

# munged's socket, pid and seed files: in /run/munge (munged cannot reach DIR when it is under a 0700 folder)
tag=$(printf '%s' "$dir" | md5sum | cut -c1-12)
munge_socket=/run/munge/ci-$tag.socket

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds, SECONDS of wall time at most
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  while [ "$SECONDS" -lt "$end" ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "slurm.sh: $what did not come up in ${limit}s (logs in $dir/log)" >&2; return 1
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
     || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  fi
  [ -f "$dir/pids" ] && stop
  rm -rf "$dir/state" "$dir/spool" "$dir/log" "$dir/gpu"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/gpu"
  for i in 0 1 2 3; do ln -s /dev/null "$dir/gpu/gpu$i"; done

  local host node
  host=$(hostname -s)
  node=$(slurmd -C | head -n1)   # "NodeName=<host> CPUs=... RealMemory=..."
  local ctld_port slurmd_port
  ctld_port=$(free_port); slurmd_port=$(free_port)
  while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
  cat > "$SLURM_CONF" <<CONF
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$munge_socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pidfile
SlurmdPidFile=$dir/slurmd.pidfile
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
DependencyParameters=kill_invalid_depend
GresTypes=gpu
$node NodeAddr=127.0.0.1 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  echo "NodeName=$host Name=gpu File=$dir/gpu/gpu[0-3]" > "$dir/gres.conf"

  mkdir -p /run/munge
  [ -f /etc/munge/munge.key ] || mungekey --create
  chown munge:munge /run/munge /etc/munge/munge.key
  setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F --socket="$munge_socket" \
    --pid-file="/run/munge/ci-$tag.pid" --seed-file="/run/munge/ci-$tag.seed" --log-file="/run/munge/ci-$tag.log" \
    >"$dir/log/munged.out" 2>&1 &
  echo "munged $!" > "$dir/pids"
  wait_for 20 munged timeout 5 munge --socket="$munge_socket" -n
  setsid /usr/sbin/slurmctld -D -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 &
  echo "slurmctld $!" >> "$dir/pids"
  setsid /usr/sbin/slurmd -D -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 &
  echo "slurmd $!" >> "$dir/pids"
  idle() { [ "$(timeout 5 sinfo -h -n "$host" -o %T 2>/dev/null)" = idle ]; }
  wait_for 60 "the node (sinfo: idle)" idle || { stop; return 1; }
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  [ -f "$dir/pids" ] || { echo "slurm.sh: no $dir/pids: nothing to stop" >&2; return 0; }
  scancel --full --quiet --user="$(id -un)" >/dev/null 2>&1 || true
  # reverse order: slurmd, slurmctld, then munged
  tac "$dir/pids" | while read -r name pid; do
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    echo "stopped $name ($pid)"
  done
  rm -f "$dir/pids" "/run/munge/ci-$tag.pid" "/run/munge/ci-$tag.seed" "/run/munge/ci-$tag.log"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
