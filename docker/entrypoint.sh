#!/bin/bash
# The entrypoint of k2train's image.
#
#   docker run IMAGE train --config FILE [--set KEY=VALUE ...]    k2train train, one process, or
#                                                                 K2TRAIN_NPROC_PER_NODE processes
#                                                                 of this node under torchrun
#   docker run IMAGE layout|data|optimizer-plan ...                that k2train command
#   docker run IMAGE bash | python ... | torchrun ...             any other command, as given
set -euo pipefail

case "${1:-}" in
    train)
        nproc=${K2TRAIN_NPROC_PER_NODE:-1}
        if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
            echo "k2train-entrypoint: error: K2TRAIN_NPROC_PER_NODE is '$nproc', expected a positive whole number." >&2
            exit 2
        fi
        if [ "$nproc" -gt 1 ]; then
            # One node: the processes meet on localhost, which resolves even where the container's
            # own hostname does not (--network none).
            exec torchrun --standalone --local-addr=localhost --nproc-per-node "$nproc" --no-python k2train "$@"
        fi
        exec k2train "$@" ;;
    layout | data | optimizer-plan | -h | --help)
        exec k2train "$@" ;;
    "")
        exec k2train --help ;;
    *)
        exec "$@" ;;
esac
