#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for tests: munged, slurmctld and two slurmd
# daemons (nodes k2n1, k2n2 on 127.0.0.1 with their own ports), each node with 2 CPUs and 2
# stand-in GPU generic resources (so `--gpus-per-node` is accepted as on a GPU cluster; nothing
# here touches a GPU).
#
#   tests/launch/slurm_cluster.sh up      install slurm-wlm and munge if absent, start the daemons
#   tests/launch/slurm_cluster.sh down    stop the daemons by the PIDs in their pid files
#   tests/launch/slurm_cluster.sh env     print `export SLURM_CONF=...` for clients
#
# Everything lives under $K2TRAIN_SLURM_DIR (default /tmp/k2train-slurm): config, munge key and
# socket, state, logs, pid files. The ports (16817-16819) and the munge socket are private to it,
# so a system Slurm or munge on the same machine is left alone. `up` stops a previous instance
# first, so both commands are safe to repeat.
set -euo pipefail

DIR=${K2TRAIN_SLURM_DIR:-/tmp/k2train-slurm}
CTLD_PORT=16817
NODES=(k2n1 k2n2)
NODE_PORTS=(16818 16819)
HOSTS_MARK="# k2train slurm-test nodes"

say() { echo "slurm-cluster: $*"; }
die() { echo "slurm-cluster: error: $*" >&2; exit 1; }

install_packages() {
    local tool
    for tool in slurmctld slurmd sbatch munged; do command -v "$tool" >/dev/null || break; done
    command -v "$tool" >/dev/null && return
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and installing them needs root."
    say "installing slurm-wlm and munge from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

# Node names must resolve, or torch's rendezvous retries until the job's time limit.
add_host_names() {
    local missing=0 n
    for n in "${NODES[@]}"; do getent hosts "$n" >/dev/null || missing=1; done
    [ "$missing" = 0 ] && return
    echo "127.0.0.1 ${NODES[*]} $HOSTS_MARK" >> /etc/hosts
}

remove_host_names() {
    grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null || return 0
    # /etc/hosts may be a bind mount: rewrite it in place rather than replacing the file.
    local kept
    kept=$(grep -vF "$HOSTS_MARK" /etc/hosts)
    printf '%s\n' "$kept" > /etc/hosts
}

write_config() {
    local host i
    host=$(hostname)
    mkdir -p "$DIR/ctld" "$DIR/spool"
    {
        echo "ClusterName=k2train-test"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$CTLD_PORT"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=$DIR/munge/munge.socket"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "StateSaveLocation=$DIR/ctld"
        echo "SlurmdSpoolDir=$DIR/spool/%n"
        echo "SlurmctldPidFile=$DIR/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
        echo "SlurmctldLogFile=$DIR/slurmctld.log"
        echo "SlurmdLogFile=$DIR/slurmd-%n.log"
        # No systemd or cgroups here: track processes through /proc, no task binding.
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/filetxt"
        echo "JobCompLoc=$DIR/jobcomp.txt"
        echo "MpiDefault=none"
        # A small MinJobAge, or `sbatch --wait` polls up to 32 s apart.
        echo "MinJobAge=4"
        echo "SchedulerParameters=batch_sched_delay=0"
        echo "ReturnToService=2"
        echo "SlurmdParameters=config_overrides"
        echo "GresTypes=gpu"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        for i in "${!NODES[@]}"; do
            echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} CPUs=2 Gres=gpu:2 State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } > "$DIR/slurm.conf"
    # Slurm drops GPUs without device files; two stand-in character devices make the count real.
    printf 'AutoDetect=off\nNodeName=%s Name=gpu File=/dev/null,/dev/zero\n' \
        "$(IFS=,; echo "${NODES[*]}")" > "$DIR/gres.conf"
}

start_munge() {
    mkdir -p "$DIR/munge"
    [ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null 2>&1 \
        || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$DIR/munge"
    chmod 0755 "$DIR/munge"
    chmod 0400 "$DIR/munge/munge.key"
    runuser -u munge -- munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
}

# Wait until `scontrol` sees every node idle (the slurmds have registered).
wait_for_nodes() {
    local t
    for t in $(seq 1 60); do
        if [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" = "${#NODES[@]}" ]; then
            return 0
        fi
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "the nodes ${NODES[*]} did not register with slurmctld within 30 s; see $DIR/*.log."
}

up() {
    [ "$(id -u)" = 0 ] || die "the test cluster runs its daemons as root; run as root."
    install_packages
    down >/dev/null
    add_host_names
    write_config
    export SLURM_CONF="$DIR/slurm.conf"
    start_munge
    slurmctld -f "$SLURM_CONF"
    local n
    for n in "${NODES[@]}"; do slurmd -f "$SLURM_CONF" -N "$n"; done
    wait_for_nodes
    say "up: nodes ${NODES[*]} idle (SLURM_CONF=$SLURM_CONF)"
}

# Stop the process whose PID is in `pidfile` if it is still the daemon `name`; TERM, then KILL.
stop_pid() {
    local pidfile=$1 name=$2 pid t
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        for t in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
        [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

down() {
    if [ -f "$DIR/slurm.conf" ] && [ -f "$DIR/slurmctld.pid" ]; then
        # Cancel what is left of the test jobs so no job step outlives its slurmd.
        SLURM_CONF="$DIR/slurm.conf" timeout 10 scancel --quiet --full --partition=debug 2>/dev/null || true
    fi
    local n
    for n in "${NODES[@]}"; do stop_pid "$DIR/slurmd-$n.pid" slurmd; done
    stop_pid "$DIR/slurmctld.pid" slurmctld
    stop_pid "$DIR/munge/munged.pid" munged
    remove_host_names
    rm -rf "$DIR/ctld" "$DIR/spool"
    say "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$DIR/slurm.conf" ;;
    *) die "usage: $0 up|down|env" ;;
esac
