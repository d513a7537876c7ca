#!/usr/bin/env bash
# A throw-away, single-node Slurm 22.05 cluster on localhost, for testing the
# pipeline's SLURM profile end to end (sbatch -> srun -> snakemake job step).
#
# Usage:  bash tests/slurm/cluster.sh start|stop|status|env|logs
#
#   start   install Debian's Slurm + munge (+ slurmdbd/MariaDB) if missing, write
#           the configuration, start the daemons, wait until the node is idle.
#           Idempotent: daemons already running are left alone (the Slurm ones are
#           restarted if the generated configuration changed).
#   stop    cancel the test cluster's jobs, then stop exactly the daemons that
#           `start` launched (their PIDs are recorded in $SLURM_TEST_DIR/run).
#   status  print the state of each daemon and of the node (exit 1 if not up).
#   env     print `export SLURM_CONF=... PATH=$SLURM_TEST_DIR/bin:$PATH` for the client
#           commands; use:  eval "$(bash tests/slurm/cluster.sh env)"
#   logs    print the daemon logs.
#
# Environment:
#   SLURM_TEST_DIR        state folder: conf, logs, spool, pid files, database
#                         (default /tmp/robustft-slurm)
#   SLURM_TEST_ACCOUNTING 1 (default): run slurmdbd with a private MariaDB, so
#                         `sacct` (the plugin's default status command) works and
#                         keeps a complete record of every job.
#                         0: no accounting (faster start); Snakemake must then be
#                         run with `--slurm-status-command squeue`.
#   SLURM_TEST_CPUS       CPUs (default 64) and memory in MB (default 256000) the node
#   SLURM_TEST_MEM_MB     advertises: more than the machine has, so that the real
#                         profile's requests (slurm/profile.yaml) fit unchanged. Nothing
#                         enforces them (no cgroups); fine for tiny test jobs.
#   SLURM_TEST_GPUS       fake GPUs (GRES gpu, type $SLURM_TEST_GPU_TYPE, default
#                         "fake") on the node (default 4; 0 for none), so that
#                         `--gpus=1` and `--gpus=fake:1` can be scheduled. No device
#                         is behind them: a job gets CUDA_VISIBLE_DEVICES, no GPU.
#   SLURM_TEST_PORT_BASE  ports used: BASE+17 slurmctld, +18 slurmd, +19 slurmdbd,
#                         +6 MariaDB (default 16800: does not clash with a real
#                         Slurm on 6817-6819 or a real MariaDB on 3306).
#
# The client commands (sbatch, squeue, sacct, sinfo, ...) need SLURM_CONF to point at
# $SLURM_TEST_DIR/etc/slurm.conf, and the jobs need $SLURM_TEST_DIR/bin first in PATH
# (see write_configs); `env` prints both.
set -euo pipefail

D=${SLURM_TEST_DIR:-/tmp/robustft-slurm}
ACCOUNTING=${SLURM_TEST_ACCOUNTING:-1}
NPROC=$(nproc)
CPUS=${SLURM_TEST_CPUS:-64}
MEM_MB=${SLURM_TEST_MEM_MB:-256000}
GPUS=${SLURM_TEST_GPUS:-4}
GPU_TYPE=${SLURM_TEST_GPU_TYPE:-fake}
PORT_BASE=${SLURM_TEST_PORT_BASE:-16800}
CTLD_PORT=$((PORT_BASE + 17))
SLURMD_PORT=$((PORT_BASE + 18))
DBD_PORT=$((PORT_BASE + 19))
DB_PORT=$((PORT_BASE + 6))
CLUSTER=robustft
ACCOUNT=robustft
NODE=localhost
TIMEOUT=${SLURM_TEST_TIMEOUT:-60}   # seconds to wait for each daemon

export SLURM_CONF="$D/etc/slurm.conf"

# daemons in start order; `stop` goes in reverse
DAEMONS=(munged)
[[ $ACCOUNTING == 1 ]] && DAEMONS+=(mariadbd slurmdbd)
DAEMONS+=(slurmctld slurmd)

die() {
    echo "cluster.sh: $*" >&2
    show_logs >&2
    exit 1
}

show_logs() {
    local name f
    for name in "${DAEMONS[@]}" mariadb-install sacctmgr apt; do
        # slurm daemons run with -D print each log line on stderr too: show the
        # stderr file only where there is no log file (e.g. a usage error)
        for f in "$D/log/$name.log" "$D/log/$name.stderr"; do
            [[ -s $f ]] || continue
            echo "----- $f (last 20 lines) -----"
            tail -n 20 "$f"
            break
        done
    done
    if [[ -x $(command -v sinfo) && -f $SLURM_CONF ]]; then
        echo "----- sinfo -----"
        timeout 5 sinfo -N -l 2>&1 || true
    fi
}

pidfile() { echo "$D/run/$1.pid"; }

# prints the PID if the daemon we recorded is alive (and is still that program)
alive() {
    local name=$1 pid comm
    [[ -f $(pidfile "$name") ]] || return 1
    pid=$(<"$(pidfile "$name")")
    [[ $pid =~ ^[0-9]+$ && -d /proc/$pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    # /proc/PID/comm is cut to 15 characters
    [[ $comm == "${name:0:15}" ]] || return 1
    echo "$pid"
}

# launch NAME CMD...: run CMD in the foreground of its own session, record its PID
launch() {
    local name=$1
    shift
    alive "$name" >/dev/null && return 0
    # setsid: its own session, so a Ctrl-C at the terminal that ran `start` does
    # not reach the daemon. Run in the background of this (non-interactive) shell
    # the child is no group leader, so setsid execs in place and $! is the daemon.
    # The daemons write their own log files; what they print goes to NAME.stderr.
    setsid "$@" </dev/null >"$D/log/$name.stderr" 2>&1 &
    local pid=$! i
    echo "$pid" >"$(pidfile "$name")"
    # until the exec, /proc/PID/comm still says bash or setsid
    for ((i = 0; i < 50; i++)); do
        alive "$name" >/dev/null && return 0
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    die "could not start $name ($*)"
}

wait_for() { # wait_for NAME DESCRIPTION CMD...: poll CMD until it succeeds
    local name=$1 what=$2 i
    shift 2
    for ((i = 0; i < TIMEOUT * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        alive "$name" >/dev/null || die "$name died while waiting for $what"
        sleep 0.2
    done
    die "timed out after ${TIMEOUT}s waiting for $what"
}

install_packages() {
    local need=()
    command -v slurmctld >/dev/null || need+=(slurmctld)
    command -v slurmd >/dev/null || need+=(slurmd)
    command -v sbatch >/dev/null || need+=(slurm-client)
    command -v munged >/dev/null || need+=(munge)
    if [[ $ACCOUNTING == 1 ]]; then
        command -v slurmdbd >/dev/null || need+=(slurmdbd)
        command -v mariadbd >/dev/null || need+=(mariadb-server)
    fi
    ((${#need[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "need root to apt-get install ${need[*]}"
    local log="$D/log/apt.log" rc=0
    export DEBIAN_FRONTEND=noninteractive
    # The packages' scripts would start system-wide munge, MariaDB and Slurm services
    # (which `stop` must not touch): a temporary policy-rc.d forbids that, where the
    # machine has none of its own (containers usually have one).
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >"$log" 2>&1; then
        apt-get update -qq >>"$log" 2>&1 || true
        apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$log" 2>&1 || rc=1
    fi
    ((own_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install ${need[*]} failed (see $log)"
}

write_if_changed() { # write_if_changed FILE MODE < content
    local f=$1 mode=$2 tmp
    tmp=$(mktemp "$f.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $f ]] && cmp -s "$tmp" "$f"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$f"
        CONF_CHANGED=1
    fi
}
CONF_CHANGED=0

write_configs() {
    local acct
    if [[ $ACCOUNTING == 1 ]]; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# clients reach slurmdbd with the munge socket named here, not the AuthInfo one
AccountingStoragePass=$D/munge/munge.socket.2
# jobs' GPUs in sacct's AllocTRES (needs slurmdbd)
AccountingStorageTRES=gres/gpu
# keep the job comment (the plugin puts rule_<rule>_wildcards_<...> there) in sacct
AccountingStoreFlags=job_comment"
    else
        acct="AccountingStorageType=accounting_storage/none"
    fi
    local gres_node="" gres_types="" gres_conf="" i
    if ((GPUS > 0)); then
        # Fake GPUs: Slurm wants a character device per GPU; symlinks to /dev/null
        # named fakegpuN pass its check (N is the GPU's index). Nothing is bound:
        # jobs see CUDA_VISIBLE_DEVICES but no device.
        mkdir -p "$D/dev"
        for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$D/dev/fakegpu$i"; done
        gres_node=" Gres=gpu:$GPU_TYPE:$GPUS"
        gres_types="GresTypes=gpu"
        gres_conf="NodeName=$NODE Name=gpu Type=$GPU_TYPE File=$D/dev/fakegpu[0-$((GPUS - 1))]"
    fi
    write_if_changed "$D/etc/slurm.conf" 644 <<EOF
# generated by tests/slurm/cluster.sh -- do not edit, edit the script
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (default 120 s)
AuthInfo=socket=$D/munge/munge.socket.2,cred_expire=20
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd
SlurmctldPidFile=$D/run/slurmctld.daemon.pid
SlurmdPidFile=$D/run/slurmd.daemon.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
PlugStackConfig=$D/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# the node advertises what is configured here, not what slurmd detects
# ($NPROC cores, $(awk '/^MemTotal:/ {printf "%d", $2 / 1024}' /proc/meminfo) MB)
SlurmdParameters=config_overrides
# finished jobs stay visible to squeue for 5 minutes
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
# jobs are not requeueable unless submitted with --requeue (as the profile does with
# slurm-requeue: true), so the requeue test shows that the flag reaches sbatch
JobRequeue=0
$gres_types
$acct
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB$gres_node State=UNKNOWN
# partition names as in slurm/profile.yaml: the default one for CPU jobs, "gpu"
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
    write_if_changed "$D/etc/gres.conf" 644 <<<"$gres_conf"
    # an empty SPANK plugin stack (the Debian default one includes other files)
    write_if_changed "$D/etc/plugstack.conf" 644 </dev/null
    # Client wrappers. The job step executor of the Snakemake plugin
    # (snakemake-executor-plugin-slurm-jobstep 0.6.1) clears every SLURM_* variable,
    # SLURM_CONF included, before its nested `srun`; srun then looks for
    # /etc/slurm/slurm.conf, /run/slurm/conf/ or DNS SRV records and fails with
    # "Could not establish a configuration source". With $D/bin first in PATH
    # (exported to the jobs by sbatch --export=ALL) the commands find this cluster.
    local cmd
    for cmd in srun sbatch squeue sacct scancel scontrol sinfo sacctmgr sshare salloc; do
        write_if_changed "$D/bin/$cmd" 755 <<EOF
#!/bin/sh
# generated by tests/slurm/cluster.sh: always talk to the test cluster in $D
SLURM_CONF=$(printf %q "$SLURM_CONF")
export SLURM_CONF
exec /usr/bin/$cmd "\$@"
EOF
    done
    if [[ $ACCOUNTING == 1 ]]; then
        # slurmdbd insists on mode 600, owned by SlurmUser
        write_if_changed "$D/etc/slurmdbd.conf" 600 <<EOF
# generated by tests/slurm/cluster.sh
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket.2
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.daemon.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    fi
}

start_munge() {
    if [[ ! -s $D/munge/munge.key ]]; then
        # 1 KiB random key, readable by root only (munged checks)
        (umask 077 && head -c 1024 /dev/urandom >"$D/munge/munge.key")
    fi
    launch munged munged --foreground --force \
        --key-file="$D/munge/munge.key" \
        --socket="$D/munge/munge.socket.2" \
        --pid-file="$D/run/munged.daemon.pid" \
        --seed-file="$D/munge/munged.seed" \
        --log-file="$D/log/munged.log"
    wait_for munged "munged" \
        bash -c "munge -n -S '$D/munge/munge.socket.2' | unmunge -S '$D/munge/munge.socket.2'"
}

sql() { mariadb --no-defaults -uroot --socket="$D/mysql/mysqld.sock" -e "$1"; }

start_db() {
    local datadir="$D/mysql/data"
    if [[ ! -d $datadir/mysql ]]; then
        rm -rf "$datadir"
        mkdir -p "$datadir"
        mariadb-install-db --no-defaults --datadir="$datadir" --user=root \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
    fi
    # a private server: own data dir, own socket, TCP on 127.0.0.1 only
    launch mariadbd mariadbd --no-defaults --user=root --datadir="$datadir" \
        --socket="$D/mysql/mysqld.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$D/run/mariadbd.daemon.pid" --log-error="$D/log/mariadbd.log" \
        --skip-log-bin --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
        --innodb-flush-log-at-trx-commit=0 --skip-name-resolve
    wait_for mariadbd "MariaDB" sql "SELECT 1"
    if [[ ! -f $D/mysql/.users-created ]]; then
        sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
             CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
             GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
             GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
            >>"$D/log/mariadb-install.log" 2>&1 || die "could not create the slurm DB user"
        touch "$D/mysql/.users-created"
    fi
}

start_dbd() {
    # slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF
    launch slurmdbd slurmdbd -D
    wait_for slurmdbd "slurmdbd" sacctmgr -n list cluster
    # register the cluster, an account and root's association once (the DB persists
    # in $D, so this is skipped on later starts)
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster 2>/dev/null) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >>"$D/log/sacctmgr.log" 2>&1 \
            || die "sacctmgr add cluster failed"
    fi
    if [[ -z $(sacctmgr -n -P list account "$ACCOUNT" format=account 2>/dev/null) ]]; then
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" \
            description="robustft tests" organization=robustft >>"$D/log/sacctmgr.log" 2>&1 \
            || die "sacctmgr add account failed"
    fi
    if [[ -z $(sacctmgr -n -P list assoc user=root account="$ACCOUNT" format=user 2>/dev/null) ]]; then
        sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" \
            >>"$D/log/sacctmgr.log" 2>&1 || die "sacctmgr add user failed"
    fi
}

node_idle() {
    local state
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null) || return 1
    case $state in
    idle | mixed | allocated) return 0 ;;
    down* | drain* | fail*)
        # e.g. left "down" by an earlier unclean stop
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        return 1
        ;;
    *) return 1 ;;
    esac
}

cmd_start() {
    mkdir -p "$D"/{bin,etc,log,run,state,spool/slurmd,munge,mysql}
    chmod 755 "$D/munge"  # munged wants the socket folder world-executable
    install_packages
    write_configs
    if ((CONF_CHANGED)); then
        # daemons still running from an earlier `start` read the old configuration
        stop_daemons slurmd slurmctld
        stop_daemons slurmdbd
    fi
    start_munge
    if [[ $ACCOUNTING == 1 ]]; then
        start_db
        start_dbd
    fi
    launch slurmctld slurmctld -D -i -f "$SLURM_CONF"
    wait_for slurmctld "slurmctld" scontrol ping
    launch slurmd slurmd -D -N "$NODE" -f "$SLURM_CONF"
    wait_for slurmd "node $NODE to be idle" node_idle
}

# stop_daemons NAME...: SIGTERM the recorded daemons, wait up to 15 s, then SIGKILL
stop_daemons() {
    local name pid pids=() i
    for name in "$@"; do
        if pid=$(alive "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$(pidfile "$name")"
    done
    for pid in "${pids[@]}"; do
        for ((i = 0; i < 150; i++)); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        if [[ -d /proc/$pid ]]; then
            echo "cluster.sh: $(cat "/proc/$pid/comm" 2>/dev/null) ($pid) ignored SIGTERM, killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

cmd_stop() {
    local name pid i
    # 1. cancel this cluster's jobs, so no job step outlives slurmd
    if alive slurmctld >/dev/null; then
        local ids
        ids=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $ids ]]; then
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                [[ -z $(squeue -h -t PD,R,CG,S -o %i 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    # 2. the daemons, in reverse start order; those in one stage stop together
    stop_daemons slurmd slurmctld
    stop_daemons slurmdbd
    stop_daemons mariadbd munged
    # 3. job steps of this cluster still around (slurmstepd daemonizes, so they are
    #    no children of slurmd): a slurmstepd of this cluster holds its log file open
    local f victims=()
    for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
        for f in /proc/"$pid"/fd/*; do
            if [[ $(readlink "$f" 2>/dev/null) == "$D/log/slurmd.log" ]]; then
                mapfile -t -O "${#victims[@]}" victims < <(echo "$pid"; descendants "$pid")
                break
            fi
        done
    done
    if ((${#victims[@]})); then
        echo "cluster.sh: killing leftover job steps: ${victims[*]}" >&2
        kill -KILL "${victims[@]}" 2>/dev/null || true
    fi
}

descendants() { # all descendants of PID
    local child
    for child in $(pgrep -P "$1" 2>/dev/null || true); do
        echo "$child"
        descendants "$child"
    done
}

cmd_status() {
    local name pid rc=0
    for name in "${DAEMONS[@]}"; do
        if pid=$(alive "$name"); then
            printf '%-10s running (pid %s)\n' "$name" "$pid"
        else
            printf '%-10s stopped\n' "$name"
            rc=1
        fi
    done
    if alive slurmctld >/dev/null; then
        printf 'node       %s\n' "$(sinfo -h -n "$NODE" -o '%N %T cpus=%c mem=%m gres=%G' 2>&1)"
    fi
    echo "SLURM_CONF=$SLURM_CONF"
    return $rc
}

cmd_env() {
    # shellcheck disable=SC2016  # $PATH is for the shell that evals this
    printf 'export SLURM_CONF=%q\nexport PATH=%q:"$PATH"\n' "$SLURM_CONF" "$D/bin"
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) cmd_env ;;
logs) show_logs ;;
*)
    echo "usage: $0 start|stop|status|env|logs" >&2
    exit 2
    ;;
esac
