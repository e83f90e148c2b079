#!/usr/bin/env bash
# A one-node Slurm cluster on this machine from Debian's packages, for CI and for trying the Slurm
# launcher presets (docs/evaluation.md, "Running on Slurm"). Run as root. Idempotent: installs
# the packages if missing, writes /etc/slurm/slurm.conf (cgroup-free; node localhost with this
# machine's CPUs and memory) and slurmdbd.conf, and starts munged, mariadbd, slurmdbd, slurmctld
# and slurmd directly (no systemd) unless they already run. Accounting (slurmdbd on MariaDB) is
# there because submitit follows its jobs with `sacct`: without it a job that Slurm kills (time
# limit, memory) is never seen as finished. Returns once the node takes jobs; prints `sinfo`.
set -euo pipefail

say() { echo "[slurm_up] $*"; }
die() { echo "[slurm_up] error: $*" >&2; exit 1; }
running() {  # running /run/NAME.pid: a live process NAME holds that pid (not a reused pid)
    [ -f "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ]
}
wait_for() {  # wait_for SECONDS COMMAND...: until the command succeeds
    local end=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do [ "$SECONDS" -lt "$end" ] || return 1; sleep 0.2; done
}
write_if_changed() {  # write_if_changed FILE MODE TEXT: 0 when the file was (re)written
    if [ -f "$1" ] && [ "$(cat "$1")" = "$3" ]; then return 1; fi
    (umask 077; printf '%s\n' "$3" > "$1.tmp")
    chmod "$2" "$1.tmp"
    mv "$1.tmp" "$1"
}

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v slurmdbd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null || ! command -v mariadbd >/dev/null; then
    say "installing slurmctld, slurmd, slurmdbd, slurm-client, munge, mariadb-server (Debian)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurmdbd slurm-client munge mariadb-server >/dev/null
fi

# 2. munge: a key, its directories, the daemon as user munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! wait_for 0 bash -c 'munge -n | unmunge'; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 bash -c 'munge -n | unmunge' \
        || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# 3. slurm.conf: one node named localhost with the CPUs and memory this process can use
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cpus=$(nproc)
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
changed=0
write_if_changed /etc/slurm/slurm.conf 0644 "# written by scripts/slurm_up.sh: one node, no cgroups
ClusterName=tta
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
InactiveLimit=0
MinJobAge=300
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" && changed=1
[ "$changed" = 0 ] || say "wrote /etc/slurm/slurm.conf (localhost: $cpus CPUs, $mem_mb MB)"

# 4. accounting: MariaDB (root by socket authentication) holding slurm_acct_db, and slurmdbd
install -d -o mysql -g mysql /run/mysqld
if ! wait_for 0 mariadb -e 'SELECT 1'; then
    say "starting mariadbd"
    (setsid mariadbd --user=mysql >>/var/log/slurm-mariadb.log 2>&1 </dev/null &)
    wait_for 60 mariadb -e 'SELECT 1' \
        || die "mariadbd does not answer (see /var/log/slurm-mariadb.log)"
fi
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
if write_if_changed /etc/slurm/slurmdbd.conf 0600 "# written by scripts/slurm_up.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db" && running /run/slurmdbd.pid; then
    say "slurmdbd.conf changed: stopping slurmdbd"
    kill "$(cat /run/slurmdbd.pid)"
    wait_for 30 bash -c '! kill -0 "$(cat /run/slurmdbd.pid)"'
fi
if ! running /run/slurmdbd.pid; then
    say "starting slurmdbd"
    slurmdbd
    wait_for 60 sacctmgr -n list cluster \
        || die "slurmdbd does not answer (see /var/log/slurm/slurmdbd.log)"
fi
[ -n "$(sacctmgr -n -P list cluster tta format=cluster)" ] || sacctmgr -i add cluster tta >/dev/null

# 5. slurmctld and slurmd (restarted when slurm.conf changed)
if [ "$changed" = 1 ] && { running /run/slurmctld.pid || running /run/slurmd.pid; }; then
    say "slurm.conf changed: restarting slurmctld and slurmd"
    for pid in /run/slurmctld.pid /run/slurmd.pid; do
        if running "$pid"; then
            kill "$(cat "$pid")"
            wait_for 30 bash -c "! kill -0 \$(cat $pid)" || die "$pid does not stop"
        fi
    done
fi
if ! running /run/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld
fi
wait_for 60 scontrol ping || die "slurmctld does not answer (see /var/log/slurm/slurmctld.log)"
if ! running /run/slurmd.pid; then
    say "starting slurmd"
    slurmd -N localhost
fi

# 6. wait until the node takes jobs; a node left down or drained by an earlier session is resumed
node_up() { [[ "$(sinfo -h -n localhost -o %T)" =~ ^(idle|mixed|allocated|completing)$ ]]; }
if ! wait_for 10 node_up; then
    scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
    wait_for 30 node_up || die "node localhost is $(sinfo -h -n localhost -o %T) (sinfo -R;" \
        "/var/log/slurm/slurmd.log)"
fi
sinfo
