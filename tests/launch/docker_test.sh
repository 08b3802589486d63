#!/usr/bin/env bash
# `make docker-test`: k2train's image built and trained in a real docker engine on this machine.
#
# No registry is reachable here, so the NGC base is replaced through the Dockerfile's BASE_IMAGE
# argument by a local one: a Debian root made with debootstrap and imported, with Python and CPU
# torch from the local wheel (tests/launch/cpu_base.Dockerfile). Then docker/build.sh builds the
# project's image on it, and the test checks that the image kept the base's torch and that the
# tiny K2 config trains inside a container without network: 4 processes under the entrypoint's
# torchrun (pp 2 x vp 2 x ep 2 x dp 1), exit code and losses checked. The engine is stopped by PID
# and its state removed on exit, whatever happened.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
ENGINE="$REPO/tests/launch/docker_engine.sh"
DIR=${K2TRAIN_DOCKER_DIR:-/tmp/k2train-docker}
WORK="$DIR/work"
DEBIAN_IMAGE=k2train-test/debian:bookworm
BASE_IMAGE=k2train-test/base:cpu
IMAGE=k2train-test/k2train:cpu
STEPS=5

say() { echo "docker-test: $*"; }
fail() { echo "docker-test: FAIL: $*" >&2; exit 1; }
elapsed() { echo "$(($(date +%s) - START))s"; }

# The CPU wheel of the torch version pyproject.toml pins, for the base image's Python, from the
# directories pip's find-links names (PIP_FIND_LINKS or pip's configuration).
find_torch_wheel() {
    local pytag=$1 version links d f
    version=$(sed -nE 's/^ *"torch==([^"]+)".*/\1/p' "$REPO/pyproject.toml" | head -n 1)
    [ -n "$version" ] || fail "pyproject.toml pins no torch==VERSION."
    links="${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true)"
    for d in $links; do
        d=${d#file://}
        for f in "$d"/torch-"$version"+cpu-"$pytag"-"$pytag"-*linux*_x86_64.whl; do
            [ -f "$f" ] && { echo "$f"; return; }
        done
    done
    fail "no CPU wheel torch-$version+cpu-$pytag in pip's find-links ($links); the test's base image needs one: pip download torch==$version --index-url https://download.pytorch.org/whl/cpu --no-deps -d DIR, then PIP_FIND_LINKS=DIR."
}

debian_image() {
    command -v debootstrap >/dev/null || {
        say "installing debootstrap from Debian's packages"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" \
        http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed; see $WORK/debootstrap.log."; }
    tar -C "$WORK/rootfs" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
}

base_image() {
    local pytag wheel ctx="$WORK/base-context"
    pytag=$(docker run --rm --network none "$DEBIAN_IMAGE" python3 -c \
        'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    wheel=$(find_torch_wheel "$pytag")
    mkdir -p "$ctx"
    cp "$REPO/tests/launch/cpu_base.Dockerfile" "$ctx/Dockerfile"
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-ca.crt"
    ln -f "$wheel" "$ctx/" 2>/dev/null || cp "$wheel" "$ctx/"
    docker build --network host --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" -t "$BASE_IMAGE" "$ctx" \
        > "$WORK/build-base.log" 2>&1 || { tail -n 30 "$WORK/build-base.log" >&2; fail "the base image did not build."; }
    rm -rf "$ctx"
}

cleanup() {
    "$ENGINE" down
    rm -rf "$WORK"
}

[ "$(id -u)" = 0 ] || fail "the docker engine and debootstrap need root."
START=$(date +%s)
trap cleanup EXIT
"$ENGINE" up
eval "$("$ENGINE" env)"
export DOCKER_BUILDKIT=0         # the engine here has no BuildKit; the Dockerfile needs none
rm -rf "$WORK" && mkdir -p "$WORK/out"

debian_image
say "local Debian image $DEBIAN_IMAGE ($(elapsed))"
base_image
BASE_TORCH=$(docker run --rm --network none "$BASE_IMAGE" python -c 'import torch; print(torch.__version__)' 2>/dev/null)
say "base image $BASE_IMAGE with torch $BASE_TORCH ($(elapsed))"

"$REPO/docker/build.sh" --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" > "$WORK/build.log" 2>&1 \
    || { tail -n 30 "$WORK/build.log" >&2; fail "docker/build.sh did not build the project's image on $BASE_IMAGE."; }
say "project image $IMAGE ($(elapsed))"
IMAGE_TORCH=$(docker run --rm --network none "$IMAGE" python -c 'import torch; print(torch.__version__)' 2>/dev/null)
[ "$IMAGE_TORCH" = "$BASE_TORCH" ] || fail "the image's torch is $IMAGE_TORCH, not the base's $BASE_TORCH."
! docker run --rm --network none "$IMAGE" pip list 2>/dev/null | grep -iE '^(nvidia-|triton )' \
    || fail "the project image installed CUDA packages over the base."

docker run --rm --network none --ipc=host -e K2TRAIN_NPROC_PER_NODE=4 -v "$WORK/out:/out" "$IMAGE" \
    train --config configs/k2_tiny.yaml --set "train.steps=$STEPS" --set logging.wandb=false \
    --set logging.plots=false --set logging.progress_bar=false --set logging.run_root=/out/runs \
    --set logging.run_name=docker > "$WORK/train.log" 2>&1 \
    || { tail -n 30 "$WORK/train.log" >&2; fail "the training in the container exited with an error."; }
summary=$(python3 "$REPO/tests/launch/check_run.py" "$WORK/out/runs/docker" --world-size 4 --steps "$STEPS")
say "ok   trained in the container: $summary, torch $IMAGE_TORCH from the base ($(elapsed))"
say "PASS"
