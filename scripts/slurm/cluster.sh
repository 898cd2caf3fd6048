#!/usr/bin/env bash
# A one-host SLURM cluster for the tests: munged + slurmctld + slurmd (Debian's munge and slurm-wlm), every
# file of it (key, sockets, config, state, logs) inside one folder, CPU-only. docs/slurm.md explains it.
#
#   scripts/slurm/cluster.sh start DIR [CPUS]   # configure and start; prints `export SLURM_CONF=...` last
#   scripts/slurm/cluster.sh stop DIR           # stop the three daemons (by their pid files); DIR stays
#
# Clients (sbatch, squeue, scontrol, submitit) find the cluster through SLURM_CONF=DIR/slurm.conf, which
# names the private munge socket, so nothing in /etc is read or written. Root is needed (slurmd starts jobs).
# Exit codes: 0 started/stopped; 2 setup error (not root, a binary missing, a daemon did not come up: the
# last lines of its log are printed).
set -euo pipefail

die() { echo "cluster.sh: error: $*" >&2; exit 2; }
usage() { echo "usage: $0 start DIR [CPUS] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1
dir=$2

stop_pidfile() {   # stop_pidfile FILE: SIGTERM the daemon named in FILE, SIGKILL if still alive after 10 s
    local pid
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

if [ "$action" = stop ]; then
    [ -d "$dir" ] || exit 0
    stop_pidfile "$dir/run/slurmd.pid"
    stop_pidfile "$dir/run/slurmctld.pid"
    stop_pidfile "$dir/run/munged.pid"
    exit 0
fi
[ "$action" = start ] || usage
cpus=${3:-2}

[ "$(id -u)" -eq 0 ] || die "must run as root (slurmd starts the jobs' processes)"
for bin in munged mungekey slurmctld slurmd sbatch scontrol sinfo; do
    command -v "$bin" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$bin" >/dev/null 2>&1 \
        || die "$bin not found: apt-get install slurm-wlm munge"
done
PATH=$PATH:/usr/sbin

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir/munge" "$dir/run" "$dir/log" "$dir/state" "$dir/spool"
chmod 700 "$dir/munge"   # munged refuses a socket folder that others can write to

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# munge: a private key and socket, so the host's munge (if any) is neither used nor disturbed
[ -s "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
    || die "munged did not start: $(tail -n 3 "$dir/log/munged.log" 2>/dev/null | tr '\n' ' ')"

node=$(hostname -s)
ctld_port=$(free_port)
slurmd_port=$(free_port)
# Every plugin that needs cgroups, a database or systemd is off: proctrack/linuxproc tracks job processes by
# parent pid, task/none binds nothing, accounting_storage/none keeps no database. SlurmdParameters=
# config_overrides lets the node declare CPUS whatever the machine has. ReturnToService=2 brings a node
# that was down back once it registers. KillWait: seconds between SIGTERM and SIGKILL on requeue/scancel/
# time limit, i.e. how long a job has to save its checkpoint.
cat > "$dir/slurm.conf.tmp" <<CONF
ClusterName=invsr-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
mv "$dir/slurm.conf.tmp" "$dir/slurm.conf"
export SLURM_CONF=$dir/slurm.conf

# -c: forget jobs of an earlier start of this folder (a test session starts from an empty queue)
slurmctld -c -f "$SLURM_CONF" || die "slurmctld did not start: $(tail -n 3 "$dir/log/slurmctld.log" | tr '\n' ' ')"
slurmd -f "$SLURM_CONF" || die "slurmd did not start: $(tail -n 3 "$dir/log/slurmd.log" | tr '\n' ' ')"

# ready when the node is idle (registered and accepting jobs); 60 s at most
for _ in $(seq 120); do
    state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n 1 || true)
    [ "$state" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.5
done
echo "cluster.sh: node state '${state:-none}' after 60 s; slurmctld.log / slurmd.log end:" >&2
tail -n 5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
"$0" stop "$dir"
exit 2
