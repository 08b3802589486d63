#!/usr/bin/env bash
# `make slurm-test`: the project's sbatch scripts on a real two-node Slurm cluster on this machine.
#
# Brings the cluster up (tests/launch/slurm_cluster.sh), then submits with `sbatch -N2 --wait`:
#   1. launch/slurm/torchrun_per_node.sbatch: 2 nodes x 2 torchrun processes, gloo, k2_tiny
#      (pp 2 x vp 2 x ep 2 x dp 1) for a few steps; checks the exit code and the losses it wrote;
#   2. launch/slurm/task_per_gpu.sbatch: the same world as 4 Slurm tasks; the losses must equal 1's;
#   3. bad launches, each of which must fail within seconds naming the problem: one node (a world
#      of 2 the layout cannot use), a config file that does not exist, and a rendezvous host that
#      cannot be reached (a name that does not resolve), in both modes.
# The daemons are stopped by PID on exit, whatever happened.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CLUSTER="$REPO/tests/launch/slurm_cluster.sh"
DIR=${K2TRAIN_SLURM_DIR:-/tmp/k2train-slurm}
OUT="$DIR/jobs"
PY="$REPO/.venv/bin/python"
STEPS=5
# A rendezvous host that cannot be reached: a name under .invalid (RFC 2606) never resolves, so
# the test sends no traffic off this machine. (The in-suite tests time out a rendezvous on loopback.)
UNREACHABLE=no-such-node.invalid

fail() { echo "slurm-test: FAIL: $*" >&2; exit 1; }

# The scripts take the checkout from the submit directory, and settings from K2TRAIN_* variables
# of the submitting shell: submit from the checkout with none of them set.
cd "$REPO"
unset K2TRAIN_CONFIG K2TRAIN_IMAGE K2TRAIN_NPROC_PER_NODE K2TRAIN_HOME K2TRAIN_VENV K2TRAIN_MOUNTS \
    K2TRAIN_MASTER_ADDR K2TRAIN_MASTER_PORT K2TRAIN_RENDEZVOUS_TIMEOUT

[ -x "$PY" ] || fail "no $PY: run \`make install\` first."
trap '"$CLUSTER" down' EXIT
"$CLUSTER" up
export SLURM_CONF="$DIR/slurm.conf"
rm -rf "$OUT" && mkdir -p "$OUT"

TRAIN_ARGS=(
    --config configs/k2_tiny.yaml --set "train.steps=$STEPS" --set logging.wandb=false
    --set logging.plots=false --set logging.progress_bar=false --set "logging.run_root=$OUT/runs"
)
# The sbatch options a GPU cluster would take, at this machine's size.
SBATCH=(sbatch -N2 --wait --time=5 --gpus-per-node=2 --chdir="$REPO" --quiet)

# submit NAME EXPECT(ok|fail) SCRIPT [sbatch options...] -- [script arguments...]: runs the job,
# checks its exit status, and sets ELAPSED_MS, ELAPSED (seconds, as text) and LOG (its output file).
submit() {
    local name=$1 expect=$2 script=$3 opts=() start status=0
    shift 3
    while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    LOG="$OUT/$name.out"
    start=$(date +%s%N)
    "${SBATCH[@]}" "${opts[@]}" --job-name="$name" --output="$LOG" "$REPO/launch/slurm/$script" "$@" \
        || status=$?
    ELAPSED_MS=$((($(date +%s%N) - start) / 1000000))
    ELAPSED="$((ELAPSED_MS / 1000)).$((ELAPSED_MS % 1000 / 100))"
    if [ "$expect" = ok ] && [ "$status" != 0 ]; then
        cat "$LOG" >&2 || true
        fail "$name: the job exited with $status."
    fi
    if [ "$expect" = fail ] && [ "$status" = 0 ]; then
        cat "$LOG" >&2 || true
        fail "$name: the job succeeded, but it should have failed."
    fi
}

# expect_failure NAME MAX_SECONDS PATTERN: the failed job ended in time and its log says PATTERN.
expect_failure() {
    local name=$1 max=$2 pattern=$3 line
    line=$(grep -E -m 1 "$pattern" "$LOG" || true)
    [ -n "$line" ] || { cat "$LOG" >&2; fail "$name: the log does not say /$pattern/."; }
    [ "$ELAPSED_MS" -lt $((max * 1000)) ] || fail "$name: took ${ELAPSED}s, expected under ${max}s."
    printf 'slurm-test: ok   %-22s failed in %5ss: %s\n' "$name" "$ELAPSED" "$line"
}

submit torchrun-2x2 ok torchrun_per_node.sbatch -- "${TRAIN_ARGS[@]}" --set logging.run_name=torchrun
summary=$("$PY" "$REPO/tests/launch/check_run.py" "$OUT/runs/torchrun" --world-size 4 --steps "$STEPS")
printf 'slurm-test: ok   %-22s %5ss: %s\n' "torchrun-2x2" "$ELAPSED" "$summary"

submit tasks-2x2 ok task_per_gpu.sbatch --ntasks-per-node=2 -- "${TRAIN_ARGS[@]}" --set logging.run_name=tasks
summary=$("$PY" "$REPO/tests/launch/check_run.py" "$OUT/runs/tasks" --world-size 4 --steps "$STEPS" \
    --same-losses "$OUT/runs/torchrun")
printf 'slurm-test: ok   %-22s %5ss: %s, losses equal to torchrun-2x2\n' "tasks-2x2" "$ELAPSED" "$summary"

submit one-node fail torchrun_per_node.sbatch -N1 -- "${TRAIN_ARGS[@]}"
expect_failure one-node 20 "does not fit the layout"

submit missing-config fail task_per_gpu.sbatch --ntasks-per-node=2 -- --config configs/no_such.yaml
expect_failure missing-config 20 "config file configs/no_such.yaml does not exist"

export K2TRAIN_MASTER_ADDR=$UNREACHABLE K2TRAIN_RENDEZVOUS_TIMEOUT=3
submit unreachable-tasks fail task_per_gpu.sbatch --ntasks-per-node=2 -- "${TRAIN_ARGS[@]}"
expect_failure unreachable-tasks 40 "rendezvous host $UNREACHABLE does not resolve"
submit unreachable-torchrun fail torchrun_per_node.sbatch -- "${TRAIN_ARGS[@]}"
expect_failure unreachable-torchrun 40 "rendezvous host $UNREACHABLE does not resolve"
unset K2TRAIN_MASTER_ADDR K2TRAIN_RENDEZVOUS_TIMEOUT

echo "slurm-test: PASS (job logs and run directories in $OUT)"
