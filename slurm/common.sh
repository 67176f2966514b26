# shellcheck shell=bash
# Shared by slurm/stage1.sh, slurm/stage2.sh and slurm/preprocess.sh (sourced, never run on its own): runs one
# Kiln entry point on every node of the SLURM allocation and turns the time-limit warning into
# checkpoint-and-requeue. The training and preprocessing logic lives in the Python entry points; this file only
# assembles a command line and handles one signal.
#
# Environment (all optional; sbatch passes the submitting shell's environment to the job, --export=ALL):
#   NPROC_PER_NODE  ranks per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT     c10d rendezvous port on the first node of the allocation (default 29500)
#   SRUN_ARGS       extra srun options, split on spaces (e.g. --container-image=... with pyxis)
#   KILN_ENV_FILE   a file sourced before launching: the place for cluster settings (module loads, a virtual
#                   environment, network variables: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, GLOO_SOCKET_IFNAME). Kiln sets
#                   none of these itself; exporting them before `sbatch` works as well.
#   KILN_DRY_RUN=1  print the srun line, the torchrun line every node runs and the requeue command, run nothing
#   KILN_TRAIN_CMD  for tests only: a bash command that srun runs instead of launch/multinode.sh + torchrun

# Print a command line, shell-quoted, so that it can be pasted back into a shell.
kiln_print() {
    printf '%q ' "$@" | sed 's/ $//'
    echo
}

# The job step is running: ask it to stop at the end of its current step. Called from the USR1 trap, which SLURM
# fires --signal=B:USR1@SECONDS before the time limit (and at preemption where the cluster sends user signals).
kiln_on_usr1() {
    KILN_STOP_REQUESTED=1
    if [ -n "$KILN_STOP_FILE" ]; then
        echo "kiln: USR1 received, touching $KILN_STOP_FILE: the step stops after its next checkpoint" >&2
        touch "$KILN_STOP_FILE"
    else
        echo "kiln: USR1 received, sending SIGTERM to the job step (resumable: finished shards are kept)" >&2
        if [ -n "$KILN_STEP_PID" ]; then
            kill -TERM "$KILN_STEP_PID" 2>/dev/null || true
        fi
    fi
}

# kiln_job MODULE STOP_FILE HYDRA_ARGS...
#   Runs `torchrun ... -m MODULE HYDRA_ARGS...` on all nodes: srun starts one launch/multinode.sh per node, with
#   c10d rendezvous on the first node of the allocation. On USR1 it touches STOP_FILE (the training loop saves a
#   checkpoint, removes the file and exits 0) or, when STOP_FILE is empty, sends SIGTERM to the step (for a
#   resumable job without a stop file, such as src.preprocess); once the step has ended it requeues the job, which
#   starts again with the same command, the same run directory, and resumes.
kiln_job() {
    local module=$1
    KILN_STOP_FILE=$2
    shift 2
    : "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch (or fake SLURM_* for a dry run)}"
    if [ -n "${KILN_ENV_FILE:-}" ]; then
        # shellcheck source=/dev/null
        source "$KILN_ENV_FILE"
    fi

    # What launch/multinode.sh reads. The first host of the allocation hosts the rendezvous; every node runs the
    # same command and torchrun assigns node ranks. The rendezvous id is the job id, which a requeue keeps.
    # (The host list goes through a variable rather than `| head -n1`, which can fail with SIGPIPE under pipefail.)
    local hosts
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MASTER_ADDR=${hosts%%$'\n'*}
    MASTER_PORT=${MASTER_PORT:-29500}
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?neither SLURM_JOB_NUM_NODES nor SLURM_NNODES is set}}
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    RDZV_ID=$SLURM_JOB_ID
    export MASTER_ADDR MASTER_PORT NNODES NPROC_PER_NODE RDZV_ID
    unset NODE_RANK # c10d rendezvous; a NODE_RANK left in the environment would select static rendezvous

    local payload=(bash launch/multinode.sh -m "$module" "$@")
    if [ -n "${KILN_TRAIN_CMD:-}" ]; then
        payload=(bash -c "$KILN_TRAIN_CMD")
    fi
    local extra=()
    read -r -a extra <<<"${SRUN_ARGS:-}"
    # One task per node (torchrun starts the ranks). srun does not inherit --cpus-per-task from sbatch in every
    # SLURM release, so it is passed on explicitly; --kill-on-bad-exit ends every node when one fails.
    local step=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
        ${SLURM_CPUS_PER_TASK:+"--cpus-per-task=$SLURM_CPUS_PER_TASK"} "${extra[@]}" "${payload[@]}")

    echo "kiln: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), $NNODES node(s) x $NPROC_PER_NODE," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
    if [ "${KILN_DRY_RUN:-0}" = 1 ]; then
        kiln_print "${step[@]}"
        KILN_DRY_RUN=1 bash launch/multinode.sh -m "$module" "$@"
        if [ -n "$KILN_STOP_FILE" ]; then
            echo "# on USR1: touch $KILN_STOP_FILE, wait for srun to end and, if the run removed the file:"
        else
            echo "# on USR1: kill -TERM <srun>, wait for srun to end, then:"
        fi
        kiln_print scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi

    if [ -n "$KILN_STOP_FILE" ]; then
        mkdir -p "$(dirname "$KILN_STOP_FILE")"
        rm -f "$KILN_STOP_FILE" # a stale STOP from an earlier job would stop this one after its first step
    fi
    KILN_STOP_REQUESTED=0
    KILN_STEP_PID=
    trap kiln_on_usr1 USR1
    # srun runs in the background so that the shell can take USR1 while it waits: a trapped signal makes `wait`
    # return early, so wait again until the step has really ended, then read its exit status.
    "${step[@]}" &
    KILN_STEP_PID=$!
    if [ "$KILN_STOP_REQUESTED" = 1 ] && [ -z "$KILN_STOP_FILE" ]; then
        kill -TERM "$KILN_STEP_PID" # USR1 came before the step had a pid
    fi
    while kill -0 "$KILN_STEP_PID" 2>/dev/null; do
        wait "$KILN_STEP_PID" || true
    done
    local rc=0
    wait "$KILN_STEP_PID" || rc=$?
    trap - USR1

    if [ "$KILN_STOP_REQUESTED" != 1 ]; then
        return "$rc"
    fi
    if [ -n "$KILN_STOP_FILE" ]; then
        if [ "$rc" != 0 ]; then
            echo "kiln: the step failed (exit $rc) after the stop request: not requeueing" >&2
            return "$rc"
        fi
        if [ -e "$KILN_STOP_FILE" ]; then
            # The loop removes STOP when it honours it; still there means the run reached its last step first.
            rm -f "$KILN_STOP_FILE"
            echo "kiln: the run finished before it saw $KILN_STOP_FILE: nothing to requeue" >&2
            return 0
        fi
    fi
    echo "kiln: requeueing job $SLURM_JOB_ID; it resumes from its checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID"
}
