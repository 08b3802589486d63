#!/usr/bin/env bash
# A private docker engine on this machine, for tests (no systemd here: dockerd runs directly).
#
#   tests/launch/docker_engine.sh up      install docker.io if absent, start dockerd
#   tests/launch/docker_engine.sh down    stop dockerd by its pid file, remove its state
#   tests/launch/docker_engine.sh env     print `export DOCKER_HOST=...` for clients
#
# Socket, data, exec root and pid file live under $K2TRAIN_DOCKER_DIR (default /tmp/k2train-docker),
# so a system docker on the same machine is left alone. The engine makes no bridge and no iptables
# rules (builds use --network host, test containers --network none); `down` still removes a docker0
# link and DOCKER iptables chains if an engine left them. Both commands are safe to repeat.
set -euo pipefail

DIR=${K2TRAIN_DOCKER_DIR:-/tmp/k2train-docker}
SOCK="$DIR/docker.sock"
PIDFILE="$DIR/dockerd.pid"

say() { echo "docker-engine: $*"; }
die() { echo "docker-engine: error: $*" >&2; exit 1; }

install_packages() {
    command -v dockerd >/dev/null && command -v docker >/dev/null && return
    [ "$(id -u)" = 0 ] || die "docker.io is not installed and installing it needs root."
    say "installing docker.io from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
}

up() {
    [ "$(id -u)" = 0 ] || die "dockerd needs root."
    install_packages
    down >/dev/null
    mkdir -p "$DIR/data" "$DIR/exec"
    dockerd --host "unix://$SOCK" --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$PIDFILE" \
        --exec-opt native.cgroupdriver=cgroupfs --bridge=none --iptables=false --ip6tables=false \
        >"$DIR/dockerd.log" 2>&1 &
    local t
    for t in $(seq 1 60); do
        DOCKER_HOST="unix://$SOCK" docker version >/dev/null 2>&1 && { say "up (DOCKER_HOST=unix://$SOCK)"; return; }
        sleep 0.5
    done
    tail -n 20 "$DIR/dockerd.log" >&2 || true
    die "dockerd did not answer on $SOCK within 30 s; see $DIR/dockerd.log."
}

# The docker0 link and DOCKER iptables chains an engine with a bridge leaves behind. This engine
# makes none; they are removed only when no dockerd is running, so another engine keeps its own.
remove_leftover_network() {
    [ -z "$(pgrep -x dockerd || true)" ] || return 0
    if ip link show docker0 >/dev/null 2>&1; then ip link delete docker0 || true; fi
    command -v iptables-save >/dev/null || return 0
    local table rule chain
    for table in filter nat; do
        # First the jumps into DOCKER chains from the built-in ones, then the chains themselves.
        { iptables-save -t "$table" 2>/dev/null | grep -E '^-A [A-Z]+ .*-j DOCKER' | grep -vE '^-A DOCKER' || true; } \
            | while read -r rule; do eval "iptables -t $table -D ${rule#-A }" || true; done
        for chain in $(iptables-save -t "$table" 2>/dev/null | grep -oE '^:DOCKER[A-Z0-9-]*' | tr -d : || true); do
            iptables -t "$table" -F "$chain" 2>/dev/null || true
        done
        for chain in $(iptables-save -t "$table" 2>/dev/null | grep -oE '^:DOCKER[A-Z0-9-]*' | tr -d : || true); do
            iptables -t "$table" -X "$chain" 2>/dev/null || true
        done
    done
}

down() {
    if [ -f "$PIDFILE" ]; then
        local pid t
        pid=$(cat "$PIDFILE" 2>/dev/null || true)
        if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
            # dockerd stops its containers (and their containerd) itself on TERM.
            kill -TERM "$pid" 2>/dev/null || true
            for t in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
            [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$PIDFILE"
    fi
    remove_leftover_network
    # Mounts under the exec root and the overlay layers go with the directory.
    local m
    for m in $(grep -o " $DIR/[^ ]*" /proc/mounts | sort -r || true); do umount -l "$m" || true; done
    rm -rf "$DIR/data" "$DIR/exec" "$SOCK"
    say "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) echo "export DOCKER_HOST=unix://$SOCK" ;;
    *) die "usage: $0 up|down|env" ;;
esac
