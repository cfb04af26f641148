#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine, so the slurm profile can be tested for real.
#
#   workflow/scripts/local_slurm.sh start  [STATE_DIR]   # install (Debian, root) if needed, start, wait idle
#   workflow/scripts/local_slurm.sh status [STATE_DIR]   # exit 0 when every daemon is alive and the node up
#   workflow/scripts/local_slurm.sh stop   [STATE_DIR]   # cancel our jobs, stop exactly the PIDs we started
#
# `start` prints `export SLURM_CONF=...` as its only stdout line: `eval "$(local_slurm.sh start)"` points
# sbatch/squeue/sinfo at this cluster. Everything (slurm.conf, munge key and socket, state, spool, logs, PIDs)
# lives in STATE_DIR (default /tmp/local-slurm-$UID), so a site SLURM or a system munged is never touched:
# munged runs on its own socket and slurm.conf names it via AuthInfo. No accounting (slurmdbd) is configured,
# so `sacct` cannot answer: clients must query job status with squeue (MinJobAge keeps finished jobs there).
# Environment knobs: LOCAL_SLURM_PORT (slurmctld port, slurmd uses +1; default 6817),
# LOCAL_SLURM_WAIT (seconds to wait for the node to become idle; default 60), LOCAL_SLURM_GPUS (GPUs the node
# declares, a GRES with stand-in device files: default 4). Partitions: `cpu` (default) and `gpu`, both on this one node.
# Exit status: 0 ok, 1 failure (with the daemon logs' tails), 2 usage, 3 `status`: not running,
# 4 SLURM is not installed and cannot be (not root, no apt-get, or apt-get failed).
set -euo pipefail

usage() { echo "usage: $0 start|stop|status [STATE_DIR]" >&2; exit 2; }
log() { echo "local_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }
cannot_install() { log "error: $*"; exit 4; }   # exit 4: SLURM is absent and cannot be installed here

[[ $# -ge 1 && $# -le 2 ]] || usage
ACTION=$1
STATE=${2:-/tmp/local-slurm-$(id -u)}
STATE=$(realpath -m "$STATE")
CONF=$STATE/slurm.conf
PIDS=$STATE/pids           # lines "name pid", written by start, read by stop/status
PORT=${LOCAL_SLURM_PORT:-6817}
WAIT=${LOCAL_SLURM_WAIT:-60}
GPUS=${LOCAL_SLURM_GPUS:-4}   # GPUs (GRES) of the node, for partition `gpu`
export SLURM_CONF=$CONF

# Is `pid` alive and still the program `name`? (guards against PID reuse after a crash)
alive() {
    local name=$1 pid=$2 comm
    [[ -r /proc/$pid/comm ]] || return 1
    comm=$(<"/proc/$pid/comm") || return 1
    [[ $comm == "$name" ]]
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return 0
    [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null \
        || cannot_install "slurmctld/slurmd/munged/sbatch not installed, and installing them needs root and apt-get" \
               "(Debian/Ubuntu: apt-get install slurmctld slurmd slurm-client munge)."
    log "installing slurmctld slurmd slurm-client munge with apt-get (once)"
    # policy-rc.d 101 keeps the packages' maintainer scripts from starting system daemons we do not manage.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made_policy=1; fi
    local rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge; } >"${TMPDIR:-/tmp}/local_slurm_apt.log" 2>&1 || rc=$?
    [[ $made_policy -eq 1 ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || { tail -n 20 "${TMPDIR:-/tmp}/local_slurm_apt.log" >&2; cannot_install "apt-get install failed (rc=$rc)"; }
}

HEADER="# Written by workflow/scripts/local_slurm.sh"
write_config() {
    mkdir -p "$STATE"/{log,state,spool,munge}
    chmod 755 "$STATE"                     # munged (user munge) must traverse it
    # Regenerated on every start (ports, memory), unless someone replaced it with their own file.
    if [[ -s $CONF ]] && ! head -n 1 "$CONF" | grep -q "^$HEADER"; then
        log "keeping $CONF (not written by this script)"
        return 0
    fi
    local cpus mem_total mem
    cpus=$(nproc)
    mem_total=$(free -m | awk '/^Mem:/ {print $2}')
    # Headroom for the daemons, snakemake itself and page cache: 10% but at least 1 GiB.
    mem=$(( mem_total - (mem_total / 10 > 1024 ? mem_total / 10 : 1024) ))
    (( mem >= 256 )) || die "only ${mem_total} MB of memory; need at least 1.3 GB for a local SLURM node"
    cat >"$CONF.tmp" <<EOF
$HEADER: one node (this machine), partitions cpu and gpu, no accounting.
ClusterName=localslurm
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
MailProg=/bin/true
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
# squeue must still list a job for a while after it ends: the executor's status checks run every few seconds.
MinJobAge=300
# Seconds between the time limit's SIGTERM and its SIGKILL (SLURM's default 30): a trainer saves in between.
KillWait=30
InactiveLimit=0
SlurmdTimeout=60
# Two partitions on the one node, as on a GPU cluster: cpu (the default) and gpu. The node declares
# $GPUS GPUs as a GRES whose device files are links to /dev/null (jobs get a GPU allocation, never a device), so the
# scheduler books and reports --gpus requests exactly as a real cluster would.
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
EOF
    # slurmd counts a GPU per character device: links to /dev/null stand in for /dev/nvidia0.. (no job opens them).
    mkdir -p "$STATE/dev"
    local i
    for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$STATE/dev/gpu$i"; done
    printf '%s\nNodeName=localhost Name=gpu File=%s\n' "$HEADER" "$STATE/dev/gpu[0-$((GPUS - 1))]" >"$STATE/gres.conf.tmp"
    mv "$STATE/gres.conf.tmp" "$STATE/gres.conf"
    mv "$CONF.tmp" "$CONF"
}

make_munge_key() {
    local key=$STATE/munge/munge.key
    if [[ ! -s $key ]]; then
        dd if=/dev/urandom of="$key.tmp" bs=1024 count=1 status=none
        mv "$key.tmp" "$key"
    fi
    chown -R munge:munge "$STATE/munge"
    chmod 755 "$STATE/munge"               # clients need to reach the socket; the key itself stays 0400
    chmod 400 "$key"
}

# The executor runs each job's command through `srun` inside the allocation, with every SLURM_* variable
# (SLURM_CONF included) stripped from srun's environment, so that srun reads the compiled-in default
# /etc/slurm/slurm.conf, exactly as on a real cluster. Point that path at our config while we run, unless a
# real configuration is there (then stop: this script must not shadow a site's SLURM).
DEFAULT_CONF=/etc/slurm/slurm.conf
link_default_conf() {
    if [[ -L $DEFAULT_CONF ]]; then
        local target
        target=$(readlink "$DEFAULT_CONF")
        [[ $target == "$CONF" ]] && return 0
        # Another local cluster's link: refuse while that cluster runs, replace if it is stale.
        if [[ -e $target && -s $(dirname "$target")/pids ]]; then
            die "$DEFAULT_CONF links to $target, a local SLURM that may still run; stop it first" \
                "(local_slurm.sh stop $(dirname "$target"))."
        fi
        rm -f "$DEFAULT_CONF"
    elif [[ -e $DEFAULT_CONF ]]; then
        die "$DEFAULT_CONF exists: this machine has its own SLURM configuration. Use it (profile" \
            "workflow/profiles/slurm) instead of a local test cluster."
    fi
    mkdir -p "$(dirname "$DEFAULT_CONF")"
    ln -s "$CONF" "$DEFAULT_CONF"
}

unlink_default_conf() {
    [[ -L $DEFAULT_CONF && $(readlink "$DEFAULT_CONF") == "$CONF" ]] && rm -f "$DEFAULT_CONF"
    return 0
}

record() { echo "$1 $2" >>"$PIDS"; }

# Wait for a daemon's pidfile, then record the PID.
await_pidfile() {
    local name=$1 file=$2 i pid
    for ((i = 0; i < 100; i++)); do
        if [[ -s $file ]]; then
            pid=$(tr -dc '0-9' <"$file")
            if [[ -n $pid ]] && alive "$name" "$pid"; then record "$name" "$pid"; return 0; fi
        fi
        sleep 0.1
    done
    return 1
}

dump_logs() {
    local f
    for f in "$STATE"/log/*.log "$STATE"/log/*.out "$STATE"/munge/munged.log; do
        [[ -s $f ]] || continue
        echo "---- tail of $f" >&2
        tail -n 25 "$f" >&2
    done
}

start_fail() {
    log "error: $*"
    dump_logs
    stop_daemons >/dev/null 2>&1 || true
    unlink_default_conf
    exit 1
}

cluster_up() {
    local ok=1 name pid
    [[ -s $PIDS ]] || return 1
    while read -r name pid; do alive "$name" "$pid" || ok=0; done <"$PIDS"
    [[ $ok -eq 1 ]]
}

start() {
    if cluster_up; then
        log "already running (state in $STATE)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "must run as root: slurmd starts jobs as the submitting user and munged as munge."
    install_packages
    id munge >/dev/null 2>&1 || die "user 'munge' missing (the munge package creates it); reinstall munge."
    [[ -e $PIDS ]] && stop_daemons >/dev/null 2>&1 || true   # leftovers from a crashed run
    rm -f "$PIDS"
    write_config
    link_default_conf
    make_munge_key
    local m=$STATE/munge
    runuser -u munge -- munged --socket="$m/munge.socket" --key-file="$m/munge.key" \
        --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
        </dev/null >"$STATE/log/munged.out" 2>&1 || start_fail "munged did not start"
    await_pidfile munged "$m/munged.pid" || start_fail "munged wrote no pid file"
    # -c: start from a clean state (no jobs from an earlier run of this cluster); -i: ignore stale state.
    slurmctld -f "$CONF" -c -i </dev/null >"$STATE/log/slurmctld.out" 2>&1 || start_fail "slurmctld did not start"
    await_pidfile slurmctld "$STATE/slurmctld.pid" || start_fail "slurmctld wrote no pid file"
    slurmd -f "$CONF" -N localhost </dev/null >"$STATE/log/slurmd.out" 2>&1 || start_fail "slurmd did not start"
    await_pidfile slurmd "$STATE/slurmd.pid" || start_fail "slurmd wrote no pid file"
    local t state=""
    for ((t = 0; t < WAIT * 2; t++)); do
        # one line per partition of the node: the node's state is the same on each
        state=$(sinfo -h -N -n localhost -o '%t' 2>/dev/null | head -n 1 || true)
        [[ $state == idle ]] && break   # not "idle*": that node is not responding
        # A node that registered as down/drained (e.g. a memory mismatch) will not recover on its own.
        if [[ $state == drain* || $state == down* ]] && (( t > 10 )); then
            scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
        fi
        sleep 0.5
    done
    [[ $state == idle ]] || start_fail "node 'localhost' not idle after ${WAIT}s (sinfo says '${state:-nothing}')"
    log "up: $(sinfo -h -o '%P %D %t %c cpus %m MB') (state in $STATE)"
    echo "export SLURM_CONF=$CONF"
}

stop_daemons() {
    [[ -s $PIDS ]] || { unlink_default_conf; log "nothing recorded in $PIDS"; return 0; }
    local name n pid i left
    # Cancel jobs of this cluster first so their steps end; then the daemons, slurmd before slurmctld.
    if [[ -n $(awk '$1 == "slurmctld" {print $2}' "$PIDS") ]] \
        && alive slurmctld "$(awk '$1 == "slurmctld" {print $2}' "$PIDS")"; then
        squeue -h -o '%i' 2>/dev/null | xargs -r scancel --full >/dev/null 2>&1 || true
        for ((i = 0; i < 30; i++)); do
            [[ -z $(squeue -h -t RUNNING,COMPLETING -o '%i' 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    for name in slurmd slurmctld munged; do
        while read -r n pid; do
            [[ $n == "$name" ]] && alive "$name" "$pid" && kill -TERM "$pid" 2>/dev/null || true
        done <"$PIDS"
    done
    for ((i = 0; i < 100; i++)); do
        left=0
        while read -r n pid; do alive "$n" "$pid" && left=1; done <"$PIDS"
        [[ $left -eq 0 ]] && break
        sleep 0.1
    done
    while read -r n pid; do
        if alive "$n" "$pid"; then log "$n ($pid) ignored SIGTERM; sending SIGKILL"; kill -KILL "$pid" || true; fi
    done <"$PIDS"
    for ((i = 0; i < 50; i++)); do
        left=0
        while read -r n pid; do alive "$n" "$pid" && left=1; done <"$PIDS"
        [[ $left -eq 0 ]] && break
        sleep 0.1
    done
    [[ $left -eq 0 ]] || die "could not stop: $(cat "$PIDS")"
    mv "$PIDS" "$PIDS.stopped"
    unlink_default_conf
    log "stopped (state kept in $STATE)"
}

status() {
    [[ -s $PIDS ]] || { log "not running (no $PIDS)"; return 3; }
    local name pid rc=0
    while read -r name pid; do
        if alive "$name" "$pid"; then echo "$name $pid running"; else echo "$name $pid dead"; rc=3; fi
    done <"$PIDS"
    [[ $rc -eq 0 ]] && sinfo -N -o '%N %P %t %c %m' || true
    return $rc
}

case $ACTION in
    start) start ;;
    stop) stop_daemons ;;
    status) status ;;
    *) usage ;;
esac
