#!/usr/bin/env bash
# A private single-node Slurm for testing jobs/*.slurm on one machine (Debian 12, root).
#
#   scripts/slurm.sh start DIR    install (when missing) and start munged, slurmctld, slurmd
#   scripts/slurm.sh status DIR   which of them run, and what sinfo says
#   scripts/slurm.sh stop DIR     cancel the jobs, stop the daemons this script started
#
# Everything lives in DIR: slurm.conf, state, spool, logs, pid files and a munged of its own
# (its own socket), so several instances can run side by side and the machine's
# /etc/slurm/slurm.conf and /run/munge are never touched. Clients need the config too:
#
#   export SLURM_CONF=DIR/slurm.conf     (printed by `start`; jobs inherit it)
#
# Facts behind the settings (../shared/ENVIRONMENT.md, "A real Slurm on one machine"): no
# systemd and no cgroups here (proctrack/linuxproc, task/none); the node name must be
# `hostname -s` with NodeAddr=127.0.0.1 (no DNS); MpiDefault=pmix (srun --mpi=pmi2 does not
# work with Debian's OpenMPI); no accounting (no sacct); a small MinJobAge so finished jobs
# leave squeue quickly; SlurmdParameters=config_overrides lets the node claim more CPUs than
# it has (MTX_SLURM_CPUS, default 8) so 2-task jobs fit on a 2-core machine.
#
# Environment: MTX_SLURM_CPUS (CPUs the node claims, default 8); MTX_SLURM_CTLD_PORT and
# MTX_SLURM_SLURMD_PORT (default: two free ports from 16817 up).
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|status DIR" >&2
    exit 2
}
[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

log() { echo "slurm.sh: $*" >&2; }

install_packages() {
    local p missing=()
    for p in slurmctld slurmd slurm-client munge; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    # Installing does not start the daemons here (no systemd); we start our own below.
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# The pid in DIR/NAME.pid when that process is alive.
alive_pid() {
    local f=$DIR/$1.pid pid
    [ -s "$f" ] || return 1
    pid=$(cat "$f")
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

port_busy() {
    ss -Htln "sport = :$1" 2>/dev/null | grep -q . && return 0
    (: </dev/tcp/127.0.0.1/"$1") 2>/dev/null
}

free_port() {
    local p=$1
    while port_busy "$p" || [ "$p" = "${2:-}" ]; do
        p=$((p + 1))
        [ "$p" -lt 17817 ] || {
            log "no free port between 16817 and 17817"
            exit 1
        }
    done
    echo "$p"
}

start_munge() {
    if alive_pid munged >/dev/null; then return 0; fi
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        log "creating the munge key $key"
        mungekey --create --keyfile="$key" 2>/dev/null || create-munge-key -f
        chown munge:munge "$key"
        chmod 400 "$key"
    fi
    # munged runs as user munge: it must be able to reach DIR/munge.
    mkdir -p "$DIR/munge"
    chmod 755 "$DIR"
    chown munge:munge "$DIR/munge"
    chmod 755 "$DIR/munge"
    if ! runuser -u munge -- test -w "$DIR/munge"; then
        log "user munge cannot write $DIR/munge: a folder above $DIR is closed to other users"
        exit 1
    fi
    rm -f "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
    runuser -u munge -- munged \
        --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" \
        --key-file="$key"
    local i
    for i in $(seq 50); do
        [ -s "$DIR/munge/munged.pid" ] && [ -S "$DIR/munge/munge.socket" ] && break
        sleep 0.1
    done
    cp "$DIR/munge/munged.pid" "$DIR/munged.pid"
    if ! munge -n -S "$DIR/munge/munge.socket" | unmunge -S "$DIR/munge/munge.socket" >/dev/null; then
        log "munged does not answer; its log:"
        cat "$DIR/munge/munged.log" >&2 || true
        exit 1
    fi
}

write_conf() {
    local node cpus ctld_port slurmd_port first_job
    node=$(hostname -s)
    cpus=${MTX_SLURM_CPUS:-8}
    ctld_port=${MTX_SLURM_CTLD_PORT:-$(free_port 16817)}
    slurmd_port=${MTX_SLURM_SLURMD_PORT:-$(free_port $((ctld_port + 1)) "$ctld_port")}
    # A busy port would connect our clients and slurmd to another instance's slurmctld.
    local p
    for p in "$ctld_port" "$slurmd_port"; do
        if port_busy "$p"; then
            log "port $p is in use (another Slurm?): choose other MTX_SLURM_*_PORT values"
            exit 1
        fi
    done
    # Distinct job ids per instance: PMIx and spool paths carry the job id.
    first_job=$(((RANDOM % 30000 + 1) * 1000))
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/tmp"
    cat >"$CONF" <<EOF
# Written by scripts/slurm.sh for a private single-node test cluster; do not edit.
ClusterName=mtx
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS=$DIR/tmp
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=pmix
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=5
KillWait=5
FirstJobId=$first_job
SlurmdParameters=config_overrides
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

show_logs() {
    local f
    for f in "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log"; do
        [ -f "$f" ] && {
            echo "--- $f (last lines)" >&2
            tail -n 20 "$f" >&2
        }
    done
}

start() {
    if alive_pid slurmctld >/dev/null && alive_pid slurmd >/dev/null; then
        log "already running in $DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    install_packages
    start_munge
    write_conf
    rm -f "$DIR/slurmctld.pid" "$DIR/slurmd.pid"
    # -c: a fresh cluster (clear the saved state of an earlier instance in DIR).
    slurmctld -c
    local i
    for i in $(seq 100); do
        scontrol ping 2>/dev/null | grep -q UP && break
        sleep 0.2
    done
    scontrol ping 2>/dev/null | grep -q UP || {
        log "slurmctld did not come up"
        show_logs
        exit 1
    }
    slurmd
    local state=""
    for i in $(seq 150); do
        state=$(sinfo -h -N -o %t 2>/dev/null | head -n1)
        [ "$state" = idle ] && break
        sleep 0.2
    done
    if [ "$state" != idle ]; then
        log "the node is '$state', not idle, after 30 s"
        show_logs
        exit 1
    fi
    log "Slurm is up in $DIR ($(sinfo -h -o '%D node, %c CPUs, partition %P'))"
    echo "export SLURM_CONF=$CONF"
}

stop() {
    local name pid i
    if alive_pid slurmctld >/dev/null; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        for i in $(seq 50); do
            [ -z "$(squeue -h 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    for name in slurmd slurmctld munged; do
        pid=$(alive_pid "$name") || continue
        kill "$pid" 2>/dev/null || true
        for i in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ($pid) ignores TERM: killing it"
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$name.pid"
    done
    log "stopped the Slurm in $DIR"
}

status() {
    local name rc=0 pid
    for name in munged slurmctld slurmd; do
        if pid=$(alive_pid "$name"); then
            echo "$name: running ($pid)"
        else
            echo "$name: not running"
            rc=1
        fi
    done
    [ $rc -eq 0 ] && sinfo
    return $rc
}

case $cmd in
start) start ;;
stop) stop ;;
status) status ;;
*) usage ;;
esac
