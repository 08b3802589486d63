#!/usr/bin/env bash
# Build k2train's image from this checkout:
#
#   docker/build.sh -t k2train:latest [docker build options, e.g. --build-arg BASE_IMAGE=...]
#
# The build context is the working tree without the files git ignores (.venv, runs/, wandb/),
# streamed to docker as a tar, so that a virtual environment of several GB never travels to the
# engine. `docker build -f docker/Dockerfile .` works too, with the whole directory as context.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! git rev-parse --git-dir >/dev/null 2>&1; then
    echo "docker/build.sh: error: $(pwd) is not a git checkout; run docker build -f docker/Dockerfile . instead." >&2
    exit 2
fi
# --cached --others: tracked files and new ones not ignored; a tracked file deleted in the
# working tree is skipped.
git ls-files -z --cached --others --exclude-standard \
    | tar --null --files-from=- --ignore-failed-read --create --file=- 2>/dev/null \
    | docker build --file docker/Dockerfile "$@" -
