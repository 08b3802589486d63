# Shared by the sbatch scripts of launch/slurm/ (sourced, not run): the arguments, the checks made
# before any rank starts, the rendezvous address, and the environment of NCCL/CUDA jobs.
#
# Arguments (or the environment variable in brackets):
#   --config FILE           the job config, relative to the submit directory or absolute [K2TRAIN_CONFIG]
#   --image IMAGE           run inside this container image through pyxis/enroot [K2TRAIN_IMAGE]
#   --nproc-per-node N      processes per node (torchrun mode; default: the node's GPUs, else 8)
#                           [K2TRAIN_NPROC_PER_NODE]
#   anything else           passed on to `k2train train`, e.g. --set train.steps=100
# Other settings: K2TRAIN_HOME (the checkout, default the submit directory), K2TRAIN_VENV (the
# environment with k2train and torchrun outside containers, default $K2TRAIN_HOME/.venv),
# K2TRAIN_MOUNTS (extra pyxis mounts, e.g. /data:/data), K2TRAIN_MASTER_ADDR / K2TRAIN_MASTER_PORT
# (the rendezvous; default the job's first node and a port derived from the job id) and
# K2TRAIN_RENDEZVOUS_TIMEOUT (seconds the ranks wait for each other to start, default 300).

k2_die() {
    echo "k2train-slurm: error: $*" >&2
    exit 2
}

k2_say() { echo "k2train-slurm: $*"; }

# Sets K2_CONFIG, K2_IMAGE, K2_NPROC (may be empty) and the array K2_TRAIN_ARGS.
k2_parse_args() {
    K2_CONFIG=${K2TRAIN_CONFIG:-}
    K2_IMAGE=${K2TRAIN_IMAGE:-}
    K2_NPROC=${K2TRAIN_NPROC_PER_NODE:-}
    K2_TRAIN_ARGS=()
    while [ $# -gt 0 ]; do
        case $1 in
            --config=*) K2_CONFIG=${1#*=} ;;
            --image=*) K2_IMAGE=${1#*=} ;;
            --nproc-per-node=*) K2_NPROC=${1#*=} ;;
            --config | --image | --nproc-per-node)
                [ $# -ge 2 ] || k2_die "$1 needs a value."
                case $1 in
                    --config) K2_CONFIG=$2 ;;
                    --image) K2_IMAGE=$2 ;;
                    *) K2_NPROC=$2 ;;
                esac
                shift ;;
            *) K2_TRAIN_ARGS+=("$1") ;;
        esac
        shift
    done
    [ -n "$K2_CONFIG" ] || k2_die "no job config: pass --config FILE (e.g. configs/k2_1t.yaml) or set K2TRAIN_CONFIG."
}

# Checks that need no rank: inside a Slurm job, in the checkout, a config that exists, and
# (outside containers) the environment that runs k2train. Sets K2_HOME, K2_NNODES and K2_BIN.
k2_check_job() {
    [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_JOB_NUM_NODES:-}" ] \
        || k2_die "this script runs as a Slurm batch job: submit it with sbatch -N NODES $0 --config FILE."
    K2_HOME=${K2TRAIN_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$K2_HOME" || k2_die "K2TRAIN_HOME $K2_HOME is not a directory."
    K2_NNODES=$SLURM_JOB_NUM_NODES
    [ -f "$K2_CONFIG" ] \
        || k2_die "the config file $K2_CONFIG does not exist (relative paths start at $K2_HOME, the submit directory or K2TRAIN_HOME)."
    if [ -n "$K2_IMAGE" ]; then
        K2_BIN=""                          # the image's own k2train and torchrun, on its PATH
    else
        K2_BIN=${K2TRAIN_VENV:-$K2_HOME/.venv}/bin/
        [ -x "${K2_BIN}k2train" ] \
            || k2_die "there is no ${K2_BIN}k2train: run \`make install\` in $K2_HOME, set K2TRAIN_VENV, or pass --image."
    fi
}

# The world the job will launch must fit the config's PP x EP x DP layout; checked with the
# host's k2train before any node starts a rank (in a container, each rank checks it at start).
k2_check_layout() {
    local nproc=$1 world=$2
    if [ -n "$K2_IMAGE" ]; then
        k2_say "$K2_NNODES nodes x $nproc processes = $world ranks (each rank checks the layout at start)"
        return
    fi
    if ! "${K2_BIN}k2train" layout --config "$K2_CONFIG" "${K2_TRAIN_ARGS[@]}" \
        --set "parallel.gpus_per_node=$nproc" --world-size "$world" --ranks 0; then
        k2_die "a world of $world ranks ($K2_NNODES node(s) x $nproc processes) does not fit the layout of $K2_CONFIG (the line above says why); submit with a node count the layout can use."
    fi
}

# Sets and exports MASTER_ADDR / MASTER_PORT: the job's first node (where rank 0 and torchrun's
# c10d store run) and a port derived from the job id, so jobs sharing a node do not collide.
k2_rendezvous() {
    MASTER_ADDR=${K2TRAIN_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    MASTER_PORT=${K2TRAIN_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    [ -n "$MASTER_ADDR" ] || k2_die "no rendezvous host: scontrol could not name the first node of $SLURM_JOB_NODELIST."
    getent ahosts "$MASTER_ADDR" >/dev/null \
        || k2_die "the rendezvous host $MASTER_ADDR does not resolve on $(hostname); the nodes must reach each other by these names (or set K2TRAIN_MASTER_ADDR)."
    export MASTER_ADDR MASTER_PORT
    export K2TRAIN_RENDEZVOUS_TIMEOUT=${K2TRAIN_RENDEZVOUS_TIMEOUT:-300}
}

# The environment of every rank; an exported value from the submitting shell wins.
k2_job_env() {
    # Print NCCL's warnings (why a communicator failed), not its info chatter.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # A failed or stuck collective ends the process (then the job, through --kill-on-bad-exit)
    # instead of holding every GPU until the time limit; torchrun sets the same for its workers.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # MoE activations change size every step with the routing: growable segments keep the
    # caching allocator from fragmenting.
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    # Ranks feed GPUs, they do not compute on CPU; one thread each keeps N ranks from oversubscribing.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # NCCL_SOCKET_IFNAME, NCCL_IB_HCA and the like are the cluster's: export them before sbatch.
}

# srun options that run a step inside K2_IMAGE (pyxis), with the checkout mounted at the same
# path so relative config paths and runs/ land on the shared file system.
k2_container_args() {
    K2_CONTAINER_ARGS=()
    [ -n "$K2_IMAGE" ] || return 0
    K2_CONTAINER_ARGS=(
        "--container-image=$K2_IMAGE"
        "--container-mounts=$K2_HOME:$K2_HOME${K2TRAIN_MOUNTS:+,$K2TRAIN_MOUNTS}"
        "--container-workdir=$K2_HOME"
    )
}

# Runs `srun "$@"`; a failed step ends the script with one sentence: a torchrun rendezvous that
# did not complete, or the exit status of the ranks. Only the lines that tell which are kept
# aside (not a long run's whole output).
k2_srun() {
    local status i
    K2_STEP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/k2train-step.XXXXXX")
    trap 'rm -rf "$K2_STEP_DIR"' EXIT
    set +e
    srun "$@" 2>&1 | tee >(grep -E "Rendezvous(Connection|Timeout)Error" > "$K2_STEP_DIR/part"; \
        mv "$K2_STEP_DIR/part" "$K2_STEP_DIR/found")
    status=${PIPESTATUS[0]}
    set -e
    # The grep ends just after tee; "found" appears (atomically) once it has.
    for i in $(seq 1 50); do [ -e "$K2_STEP_DIR/found" ] && break; sleep 0.1; done
    if [ "$status" != 0 ] && [ -s "$K2_STEP_DIR/found" ]; then
        k2_die "the nodes did not all meet in torchrun's rendezvous at $MASTER_ADDR:$MASTER_PORT within $K2TRAIN_RENDEZVOUS_TIMEOUT s (K2TRAIN_RENDEZVOUS_TIMEOUT); check that $MASTER_ADDR is the job's first node and that the other nodes reach it."
    fi
    [ "$status" = 0 ] || k2_die "the training step failed (srun exit status $status); the ranks' errors are above."
}
