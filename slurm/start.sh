#!/usr/bin/env bash
# Start a real single-node SLURM cluster (with accounting) on a Debian machine.
#
#   sudo slurm/start.sh [--nodes N] [STATE_DIR]   # default: $IRPO_SLURM_DIR or /tmp/irpo-slurm
#   source STATE_DIR/env.sh              # SLURM_CONF for sinfo, sbatch, sacct, ...
#   sudo slurm/stop.sh [STATE_DIR]       # stops exactly what this started
#
# For irpo's tests (tests/test_slurm.py) and for trying `launcher=slurm` on one
# machine. As root it installs the Debian packages if missing (slurmctld slurmd
# slurm-client munge slurmdbd mariadb-server), writes every config, key,
# database, spool and log into STATE_DIR, and starts munged, a private MariaDB
# on 127.0.0.1, slurmdbd, slurmctld and slurmd directly (no systemd: containers
# have none and Debian's policy-rc.d blocks service starts). It registers
# cluster "irpo", account "irpo" and user root, and returns once the node is
# idle and sacct answers. Node CPUs and memory come from `slurmd -C`.
# --nodes N (or IRPO_SLURM_NODES=N) starts N slurmd on this machine, each a
# node of its own ($HOST, $HOST-2, ...): multi-node launches (srun across
# nodes, torchrun rendezvous) then run for real on one machine.
#
# Idempotent: if the cluster in STATE_DIR is already up it just says so.
# Ports (change them if a real SLURM or MariaDB runs here): IRPO_SLURMCTLD_PORT
# (6817), IRPO_SLURMD_PORT (6818), IRPO_SLURMDBD_PORT (6819),
# IRPO_MARIADB_PORT (16819). If /etc/slurm/slurm.conf does not exist it is made
# a link to STATE_DIR/etc/slurm.conf (removed again by stop.sh), so plain
# `sinfo` works without SLURM_CONF.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${IRPO_SLURM_DIR:-/tmp/irpo-slurm}"
NODES="${IRPO_SLURM_NODES:-1}"
while (($#)); do
    case $1 in
        --nodes) NODES=$2; shift ;;
        --nodes=*) NODES=${1#--nodes=} ;;
        -*) echo "usage: $0 [--nodes N] [STATE_DIR]" >&2; exit 2 ;;
        *) STATE=$1 ;;
    esac
    shift
done
export CLUSTER=irpo PARTITION=debug ACCOUNT=irpo
export SLURMCTLD_PORT="${IRPO_SLURMCTLD_PORT:-6817}" SLURMD_PORT="${IRPO_SLURMD_PORT:-6818}"
export SLURMDBD_PORT="${IRPO_SLURMDBD_PORT:-6819}" MARIADB_PORT="${IRPO_MARIADB_PORT:-16819}"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
MARKER=.irpo-slurm   # marks a directory this script owns (and may wipe)

log() { echo "[slurm/start $(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

check_platform() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons)"
    [[ -f /etc/debian_version ]] || die "needs Debian (apt packages slurmctld, slurmd, ...)"
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    [[ ${#missing[@]} == 0 ]] && return
    log "installing ${missing[*]}"
    apt-get update -qq
    # Debian's policy-rc.d may refuse to start the services: fine, we start them.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >"/tmp/irpo-slurm-apt.log" 2>&1 \
        || die "apt-get install failed; see /tmp/irpo-slurm-apt.log"
}

# alive NAME: the daemon recorded under NAME still runs (pid and command match).
alive() {
    local pidfile="$STATE/pids/$1.pid" pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -r /proc/$pid/cmdline && "$(tr '\0' ' ' <"/proc/$pid/cmdline")" == *"$2 "* ]]
}

already_up() {
    [[ -f $STATE/$MARKER && -f $STATE/pids/order ]] || return 1
    local name cmd
    while read -r name cmd; do alive "$name" "$cmd" || return 1; done <"$STATE/pids/order"
    SLURM_CONF="$STATE/etc/slurm.conf" sinfo -h >/dev/null 2>&1
}

prepare_state() {
    if [[ -d $STATE && -n $(ls -A "$STATE") && ! -f $STATE/$MARKER ]]; then
        die "$STATE exists, is not empty and was not made by this script; pick another directory"
    fi
    if [[ -f $STATE/pids/order ]]; then
        log "stopping leftovers of an earlier start in $STATE"
        "$HERE/stop.sh" "$STATE" >&2
    fi
    rm -rf "${STATE:?}"/{etc,run,log,pids,spool,munge,mariadb}
    mkdir -p "$STATE"/{etc,run,log,pids,spool/ctld,munge,mariadb}
    touch "$STATE/$MARKER"
    STATE="$(cd "$STATE" && pwd)"
    export STATE
}

# start_daemon NAME PATTERN CMD...: run CMD in its own session (so it outlives
# this script and a Ctrl-C of the caller) and record its pid; PATTERN is what
# its command line must contain for stop.sh to be sure the pid is still ours.
start_daemon() {
    local name=$1 pattern=$2
    shift 2
    (exec setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1) &
    echo $! >"$STATE/pids/$name.pid"
    echo "$name $pattern" >>"$STATE/pids/order"
}

# wait_for SECONDS WHAT CMD...: poll CMD (10 s at most per try) until it succeeds.
wait_for() {
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    until timeout 10 "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what not ready after ${limit}s; logs in $STATE/log"
        sleep 0.5
    done
}

start_munge() {
    # A private key and socket: independent of any system munged.
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE/munge/munge.key"
    start_daemon munged "munged" munged --foreground --force \
        --socket="$STATE/run/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed"
    wait_for 20 munged bash -c "munge -S '$STATE/run/munge.socket' -n | unmunge -S '$STATE/run/munge.socket'"
}

sql() { mariadb --no-defaults --socket="$STATE/run/mariadb.sock" -uroot -e "$1"; }

start_mariadb() {
    mariadb-install-db --no-defaults --user=root --datadir="$STATE/mariadb" \
        --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
    # Native AIO is off because sandboxed kernels (gVisor) lack io_setup; the
    # lock timeout is SLURM's recommendation for slurmdbd.
    start_daemon mariadb "$STATE/mariadb" mariadbd --no-defaults --user=root \
        --datadir="$STATE/mariadb" --socket="$STATE/run/mariadb.sock" \
        --port="$MARIADB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$STATE/run/mariadb.pid" --log-error="$STATE/log/mariadb.log" \
        --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --innodb-use-native-aio=0
    wait_for 60 MariaDB mariadb-admin --no-defaults --socket="$STATE/run/mariadb.sock" ping
    DB_PASSWORD=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
    export DB_PASSWORD
    local host
    for host in 127.0.0.1 localhost; do
        sql "CREATE USER 'slurm'@'$host' IDENTIFIED BY '$DB_PASSWORD';
             GRANT ALL ON slurm_acct_db.* TO 'slurm'@'$host';"
    done
}

# node_name I: the name of the I-th node (1-based) of this machine.
node_name() { if (($1 == 1)); then echo "$HOST"; else echo "$HOST-$1"; fi; }

# start_slurmd I: node I's slurmd. Nodes 2.. run in a mount namespace of their own
# where STATE/node-local is an empty tmpfs: a folder each node has for itself, like
# a node's local disk, so tests can give the nodes a path that is not shared.
# Everything else (the repository, /tmp, STATE) is one file system for all nodes.
start_slurmd() {
    local name
    name=$(node_name "$1")
    mkdir -p "$STATE/node-local"
    if (($1 == 1)) || ! unshare --mount --propagation private true 2>/dev/null; then
        start_daemon "slurmd-$1" "slurmd -D -N $name" slurmd -D -N "$name"
    else
        start_daemon "slurmd-$1" "slurmd -D -N $name" unshare --mount --propagation private \
            sh -c 'mount -t tmpfs node-local "$0" && exec slurmd -D -N "$1"' "$STATE/node-local" "$name"
    fi
}

write_configs() {
    HOST=$(hostname -s)
    # `slurmd -C` prints the machine as slurmd will register it; keep its counts.
    local hw i name port
    hw="$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')"
    NODE_LINES="" NODE_NAMES=""
    for ((i = 1; i <= NODES; i++)); do
        name=$(node_name "$i")
        # Extra nodes listen on SLURMD_PORT+22, +23, ... (clear of slurmdbd's port).
        port=$((i == 1 ? SLURMD_PORT : SLURMD_PORT + 20 + i))
        NODE_LINES+="NodeName=$name NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port $hw State=UNKNOWN"$'\n'
        NODE_NAMES+="${NODE_NAMES:+,}$name"
        mkdir -p "$STATE/spool/slurmd-$name"
    done
    NODE_SPEC="$hw"
    export HOST NODE_LINES NODE_NAMES
    # shellcheck disable=SC2016  # envsubst takes the variable names literally
    local vars='${CLUSTER} ${PARTITION} ${HOST} ${NODE_LINES} ${NODE_NAMES} ${STATE} ${SLURMCTLD_PORT}
                ${SLURMD_PORT} ${SLURMDBD_PORT} ${MARIADB_PORT} ${DB_PASSWORD}'
    envsubst "$vars" <"$HERE/templates/slurm.conf" >"$STATE/etc/slurm.conf"
    (umask 077 && envsubst "$vars" <"$HERE/templates/slurmdbd.conf" >"$STATE/etc/slurmdbd.conf")
    chmod 600 "$STATE/etc/slurmdbd.conf"
    cat >"$STATE/env.sh" <<EOF
# source this to talk to the irpo test cluster ($STATE)
export SLURM_CONF=$STATE/etc/slurm.conf
EOF
    if [[ ! -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]]; then
        mkdir -p /etc/slurm
        ln -s "$STATE/etc/slurm.conf" /etc/slurm/slurm.conf
        echo /etc/slurm/slurm.conf >"$STATE/created_links"
    fi
}

register_accounts() {
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=irpo Organization=irpo >/dev/null
    sacctmgr -i add user root Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
}

# On any failure after the state directory was prepared, show the logs' tails
# and stop whatever was already started.
on_exit() {
    local rc=$?
    [[ $rc == 0 ]] && return
    log "start failed; last log lines:"
    tail -n 5 "$STATE"/log/* >&2 2>/dev/null || true
    "$HERE/stop.sh" "$STATE" >&2 || true
    exit "$rc"
}

main() {
    check_platform
    install_packages
    if already_up; then
        log "cluster already running in $STATE"
        echo "export SLURM_CONF=$STATE/etc/slurm.conf"
        return
    fi
    local t0=$SECONDS
    prepare_state
    trap on_exit EXIT
    export SLURM_CONF="$STATE/etc/slurm.conf"
    start_munge
    start_mariadb
    write_configs
    start_daemon slurmdbd "slurmdbd" slurmdbd -D
    wait_for 60 slurmdbd sacctmgr -n list cluster
    register_accounts
    start_daemon slurmctld "slurmctld" slurmctld -D -i
    local i
    for ((i = 1; i <= NODES; i++)); do
        start_slurmd "$i"
    done
    wait_for 60 "$NODES idle node(s)" bash -c "[[ \$(sinfo -h -N -o %T | grep -cx idle) == $NODES ]]"
    wait_for 30 sacct sacct -n -X
    trap - EXIT
    log "cluster '$CLUSTER' up in $((SECONDS - t0))s: partition $PARTITION, account $ACCOUNT," \
        "node(s) $NODE_NAMES, each $NODE_SPEC"
    echo "export SLURM_CONF=$SLURM_CONF"
}

main
