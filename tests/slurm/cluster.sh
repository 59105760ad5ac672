#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost for the launcher's tests (and for trying
# `python -m launch ... --cluster slurm` on one machine): munge, MariaDB, slurmdbd (so `sacct`
# answers), slurmctld and slurmd, all from Debian's packages, run as root.
#
#   tests/slurm/cluster.sh start    install what is missing, write the config, start, wait until idle
#   tests/slurm/cluster.sh stop     stop the daemons this script started (by recorded PID), nothing else
#   tests/slurm/cluster.sh status   exit 0 when the cluster answers and its node is usable
#   tests/slurm/cluster.sh env      print `export SLURM_CONF=...` for a shell
#
# Idempotent: `start` on a running cluster does nothing; a half-dead one is stopped and restarted.
# State (config, logs, spool, database, PIDs) lives in $MEDSSL_SLURM_STATE (default /tmp/medssl-slurm).
# Clients find the cluster through SLURM_CONF=$STATE/etc/slurm.conf; when /etc/slurm/slurm.conf does
# not exist it is made a link to that file (removed again by `stop`), so plain `sbatch` works too.
set -euo pipefail

STATE="${MEDSSL_SLURM_STATE:-/tmp/medssl-slurm}"
ETC="$STATE/etc"
PIDS="$STATE/pids"
LOGS="$STATE/log"
CONF="$ETC/slurm.conf"
CTLD_PORT="${MEDSSL_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${MEDSSL_SLURM_SLURMD_PORT:-6818}"
DBD_PORT="${MEDSSL_SLURM_DBD_PORT:-6819}"
DB_PORT="${MEDSSL_SLURM_DB_PORT:-3307}"
NCPU="$(nproc)"
# More CPU slots than cores (config_overrides) so the tests' jobs (a 2-task job, an array, three
# single-task runs) can all run at once on a 2-core machine.
CPUS="${MEDSSL_SLURM_CPUS:-$((NCPU > 8 ? NCPU : 8))}"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
export SLURM_CONF="$CONF"

log() { echo "[cluster.sh] $*" >&2; }
die() { log "error: $*"; exit 1; }

recorded_pid() { [[ -f "$PIDS/$1" ]] && cat "$PIDS/$1" || true; }
# running NAME: the PID recorded for NAME is alive and still that daemon (PIDs get reused).
running() {
    local pid
    pid="$(recorded_pid "$1")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1" ]]
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${limit}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]} and not root: apt-get install ${PACKAGES[*]}"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"$LOGS/apt.log" 2>&1; then
        apt-get update -qq >>"$LOGS/apt.log" 2>&1
        apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$LOGS/apt.log" 2>&1 ||
            die "apt-get install failed, see $LOGS/apt.log"
    fi
}

write_config() {
    mkdir -p "$ETC" "$STATE/ctld" "$STATE/spool" "$LOGS" "$PIDS"
    # Job ids restart at FirstJobId after a restart; derive it from the clock so that ids from an
    # earlier cluster (still in the accounting database and in submitit folders) are not reused.
    local first_job_id=$(( ($(date +%s) % 600000) * 100 + 1 ))
    cat >"$CONF" <<EOF
# Written by medssl tests/slurm/cluster.sh: a single-node test cluster on localhost.
ClusterName=medssl
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime: a requeued job may start again after ~10 s instead of 120 s.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$PIDS/slurmctld.daemon.pid
SlurmdPidFile=$PIDS/slurmd.daemon.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No cgroups in a container: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default a job is given the whole node's memory and the next one waits.
DefMemPerCPU=1024
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
JobRequeue=1
FirstJobId=$first_job_id
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$ETC/slurmdbd.conf" <<EOF
# Written by medssl tests/slurm/cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$PIDS/slurmdbd.daemon.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=medssl
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
    if [[ ! -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]]; then
        mkdir -p /etc/slurm
        ln -s "$CONF" /etc/slurm/slurm.conf
        echo /etc/slurm/slurm.conf >"$STATE/linked_conf"
    fi
}

start_munge() {
    if [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null >/dev/null 2>&1; then
        return 0  # a munged is already serving (ours from before, or the system's)
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [[ ! -f /etc/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged  # refuses to run as root
    wait_for 10 "munged pid file" test -s /run/munge/munged.pid
    cp /run/munge/munged.pid "$PIDS/munged"
    wait_for 10 "munge" munge -n
}

start_mariadb() {
    local db="$STATE/db"
    if [[ ! -d "$db/mysql" ]]; then
        mariadb-install-db --no-defaults --datadir="$db" --user=root --auth-root-authentication-method=normal \
            --skip-test-db >"$LOGS/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $LOGS/mariadb-install.log"
    fi
    setsid /usr/sbin/mariadbd --no-defaults --datadir="$db" --socket="$STATE/mysqld.sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$STATE/mariadbd.pid" --user=root \
        --skip-log-bin --innodb-buffer-pool-size=32M --log-error="$LOGS/mariadb.log" \
        </dev/null >/dev/null 2>&1 &
    echo $! >"$PIDS/mariadbd"
    wait_for 30 "MariaDB" mariadb --no-defaults --socket="$STATE/mysqld.sock" -uroot -e "SELECT 1"
    mariadb --no-defaults --socket="$STATE/mysqld.sock" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'medssl';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'medssl';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_daemon() {  # start_daemon NAME COMMAND...: a forking SLURM daemon; record the PID it writes
    local name=$1
    shift
    rm -f "$PIDS/$name.daemon.pid"
    "$@"
    wait_for 20 "$name pid file" test -s "$PIDS/$name.daemon.pid"
    cp "$PIDS/$name.daemon.pid" "$PIDS/$name"
}

node_ready() {
    local state
    state="$(sinfo -h -n localhost -o %T 2>/dev/null | head -1)"
    [[ "$state" =~ ^(idle|mixed|allocated|completing) ]]
}

status() {
    for name in mariadbd slurmdbd slurmctld slurmd; do
        running "$name" || return 1
    done
    node_ready
}

start() {
    mkdir -p "$LOGS" "$PIDS"
    if status; then
        log "already running (SLURM_CONF=$CONF)"
        return 0
    fi
    if compgen -G "$PIDS/*" >/dev/null; then
        log "some daemons are missing; restarting the ones this script started"
        stop
        mkdir -p "$LOGS" "$PIDS"
    fi
    local t0=$SECONDS
    install_packages
    write_config
    start_munge
    start_mariadb
    start_daemon slurmdbd /usr/sbin/slurmdbd
    wait_for 30 "slurmdbd" sacctmgr -n list cluster
    sacctmgr -i add cluster medssl >/dev/null 2>&1 || true
    start_daemon slurmctld /usr/sbin/slurmctld -c
    wait_for 30 "slurmctld" scontrol ping
    start_daemon slurmd /usr/sbin/slurmd -N localhost
    if ! wait_for 30 "node localhost to become idle" node_ready; then
        sinfo -N -l >&2 || true
        tail -20 "$LOGS/slurmd.log" "$LOGS/slurmctld.log" >&2 || true
        die "the node did not become usable"
    fi
    log "up in $((SECONDS - t0)) s: $CPUS CPU slots, ${MEM_MB} MB; export SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid NAME: TERM, then KILL after 10 s, the PID recorded for NAME
    local name=$1 pid
    pid="$(recorded_pid "$name")"
    if running "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do running "$name" || break; sleep 0.2; done
        running "$name" && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDS/$name"
}

stop() {
    [[ -d "$PIDS" ]] || return 0
    # Jobs still running belong to this cluster: cancel them before slurmd goes.
    if running slurmctld; then
        scancel --user="$(id -un)" >/dev/null 2>&1 || true
    fi
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        stop_pid "$name"
    done
    if [[ -f "$STATE/linked_conf" ]]; then
        local link
        link="$(cat "$STATE/linked_conf")"
        [[ -L "$link" && "$(readlink "$link")" == "$CONF" ]] && rm -f "$link"
        rm -f "$STATE/linked_conf"
    fi
    log "stopped"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
