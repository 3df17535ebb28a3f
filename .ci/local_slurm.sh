#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the launcher integration tests.
#
# usage: bash .ci/local_slurm.sh start|stop|status
#
#   start   install (if missing) Debian's slurmctld, slurmd, slurm-client, munge and OpenMPI, write a
#           one-node slurm.conf under $MTP_SLURM_DIR, start munged, slurmctld and slurmd as daemons, and
#           wait until `sinfo` shows the node idle. Idempotent: daemons already running are left alone.
#   stop    kill the daemons by their pid files and remove $MTP_SLURM_DIR.
#   status  print sinfo, or exit 1 when the cluster is not up.
#
# Needs root on Debian 12 (bookworm). Everything the cluster writes lives under
# MTP_SLURM_DIR (default /tmp/mtp-local-slurm): config, munge key and socket, state, spool, logs,
# pid files. Client commands (sinfo, sbatch, srun) find the config through /etc/slurm/slurm.conf, a
# symlink this script makes only when no real config is there; otherwise export
# SLURM_CONF=$MTP_SLURM_DIR/slurm.conf. MTP_SLURMCTLD_PORT / MTP_SLURMD_PORT (6817 / 6818) move the
# daemons' ports if something else listens there.
set -euo pipefail

DIR=${MTP_SLURM_DIR:-/tmp/mtp-local-slurm}
CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
PACKAGES=(slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev)
export SLURM_CONF=$CONF

log() { echo "local_slurm: $*" >&2; }

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    # Package scripts would try to start the daemons with the distribution's config; forbid that
    # (the policy-rc.d convention) for the duration of the install, we start our own below.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ $made_policy -eq 1 ] && rm -f "$policy"
    return 0
}

# Alive if the pid file names a running process.
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
    mkdir -p "$DIR"/{munge,state,spool,log}
    # munged wants the socket directory searchable by all but writable only by its owner.
    chmod 755 "$DIR/munge"
    if [ ! -f "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    # Describe the node as slurmd sees it (CPUs, sockets, cores, memory), so it does not drain itself
    # for having less than configured; only the name is ours.
    local hw
    hw=$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ //; s/ UpTime=.*//')
    cat >"$CONF" <<EOF
# Written by .ci/local_slurm.sh: a one-node CI cluster. Do not edit; rerun the script.
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
SlurmctldPort=${MTP_SLURMCTLD_PORT:-6817}
SlurmdPort=${MTP_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups in CI containers: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Schedule every 2 s rather than every 60/30 s, so a requeued job restarts while the test still waits.
SchedulerParameters=sched_interval=2,bf_interval=2
# A node that was down comes back by itself once slurmd registers.
ReturnToService=2
# sbatch --wait polls every 2 s, then 8, then 32, unless the interval would exceed MinJobAge/2:
# a small MinJobAge keeps it at 2 s so the tests see a job end within seconds. Kill stragglers quickly.
MinJobAge=4
KillWait=10
NodeName=localhost $hw State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Client commands look at /etc/slurm/slurm.conf; point it at ours unless a real config lives there.
    mkdir -p /etc/slurm
    if [ ! -e "$ETC_CONF" ] || [ "$(readlink "$ETC_CONF" || true)" = "$CONF" ]; then
        ln -sfn "$CONF" "$ETC_CONF"
    else
        log "$ETC_CONF exists and is not ours: export SLURM_CONF=$CONF for sinfo/sbatch/srun"
    fi
}

start_daemons() {
    if ! running "$DIR/munge/munged.pid"; then
        munged --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
            --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/munged.seed"
    fi
    # Daemons already running keep the config they read; a fresh start only happens after stop.
    running "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
    running "$DIR/slurmd.pid" || slurmd -f "$CONF" -N localhost
}

wait_idle() {
    local state=""
    for _ in $(seq 1 60); do
        state=$(sinfo -h -N -n localhost -o %t 2>/dev/null || true)
        case "$state" in
            idle|alloc|mix|comp) log "up: node localhost is $state"; return 0 ;;
            drain*|down*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "the node did not become idle (sinfo says '${state}'); last log lines:"
    tail -n 20 "$DIR"/log/*.log >&2 || true
    return 1
}

stop() {
    local pidfile pid
    # slurmd first (it owns job steps), then the controller, then munge.
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        running "$pidfile" || continue
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    done
    [ "$(readlink "$ETC_CONF" 2>/dev/null || true)" = "$CONF" ] && rm -f "$ETC_CONF"
    rm -rf "$DIR"
    log "stopped"
}

[ "$(id -u)" -eq 0 ] || { log "run as root (it installs packages and runs slurmd)"; exit 1; }
case "${1:-}" in
    start) install_packages; write_config; start_daemons; wait_idle ;;
    stop) stop ;;
    status) [ -f "$CONF" ] || { log "not started"; exit 1; }; sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
