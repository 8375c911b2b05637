#!/usr/bin/env bash
# Stop the single-node SLURM cluster that slurm/start.sh started in STATE_DIR.
#
#   sudo slurm/stop.sh [STATE_DIR] [--purge]   # default: $IRPO_SLURM_DIR or /tmp/irpo-slurm
#
# Touches only what start.sh recorded: it cancels the jobs of that cluster,
# stops the daemons whose pids are in STATE_DIR/pids (newest first, and only if
# the pid still runs the recorded command), kills job-step daemons
# (slurmstepd) that belong to that cluster's slurmd, and removes the
# /etc/slurm/slurm.conf link if start.sh made it. Logs stay in STATE_DIR;
# --purge deletes the whole directory. Running it twice is harmless.
set -euo pipefail

STATE="${IRPO_SLURM_DIR:-/tmp/irpo-slurm}"
PURGE=0
for arg in "$@"; do
    case $arg in
        --purge) PURGE=1 ;;
        *) STATE=$arg ;;
    esac
done
MARKER=.irpo-slurm

log() { echo "[slurm/stop $(date +%T)] $*" >&2; }

if [[ ! -f $STATE/$MARKER ]]; then
    log "no cluster started by slurm/start.sh in $STATE; nothing to stop"
    exit 0
fi
STATE="$(cd "$STATE" && pwd)"
export SLURM_CONF="$STATE/etc/slurm.conf"

# pid_of NAME PATTERN: the recorded pid, if it still runs a matching command.
pid_of() {
    local pidfile="$STATE/pids/$1.pid" pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -r /proc/$pid/cmdline && "$(tr '\0' ' ' <"/proc/$pid/cmdline")" == *"$2 "* ]] && echo "$pid"
}

# running PID: the process exists and is not a zombie waiting for its reaper.
running() { [[ -r /proc/$1/stat ]] && [[ $(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) != Z ]]; }

# terminate PID...: SIGTERM, then SIGKILL what is left after 20 s.
terminate() {
    local pid t
    kill -TERM "$@" 2>/dev/null || true
    for ((t = 0; t < 40; t++)); do
        for pid in "$@"; do running "$pid" && break; pid=; done
        [[ -z ${pid:-} ]] && return
        sleep 0.5
    done
    log "still running after 20 s, killing: $*"
    kill -KILL "$@" 2>/dev/null || true
}

cancel_jobs() {
    pid_of slurmctld slurmctld >/dev/null || return 0
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    [[ -z ${jobs// /} ]] && return
    log "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for ((t = 0; t < 60; t++)); do
        [[ -z $(squeue -h -o %A 2>/dev/null) ]] && return
        sleep 0.5
    done
}

# Job steps run under slurmstepd, which slurmd detaches; they carry our SLURM_CONF.
stepds_of_cluster() {
    local d
    for d in /proc/[0-9]*; do
        [[ $(cat "$d/comm" 2>/dev/null) == slurmstepd ]] || continue
        tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF" && echo "${d#/proc/}"
    done
}

stop_daemons() {
    [[ -f $STATE/pids/order ]] || return 0
    local name pattern pid
    tac "$STATE/pids/order" | while read -r name pattern; do
        if pid=$(pid_of "$name" "$pattern"); then
            log "stopping $name (pid $pid)"
            terminate "$pid"
        fi
        rm -f "$STATE/pids/$name.pid"
    done
    rm -f "$STATE/pids/order"
    local stepds
    mapfile -t stepds < <(stepds_of_cluster)
    if ((${#stepds[@]})); then
        log "stopping leftover job steps (pids ${stepds[*]})"
        terminate "${stepds[@]}"
    fi
}

remove_links() {
    [[ -f $STATE/created_links ]] || return 0
    local link
    while read -r link; do
        [[ -L $link && $(readlink "$link") == "$STATE/etc/slurm.conf" ]] && rm -f "$link"
    done <"$STATE/created_links"
    rm -f "$STATE/created_links"
}

cancel_jobs
stop_daemons
remove_links
if ((PURGE)); then
    rm -rf "${STATE:?}"
    log "removed $STATE"
else
    log "stopped; logs kept in $STATE/log"
fi
