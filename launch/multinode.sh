#!/usr/bin/env bash
# torchrun on one node of a multi-node run, configured by the environment. Run the same command on every node, by
# hand or through srun (slurm/common.sh does). Arguments are torchrun's program and its arguments, with paths
# relative to the repository root:
#   NNODES=2 MASTER_ADDR=node0 bash launch/multinode.sh -m src.train +experiment=stage1 hydra.run.dir=/runs/stage1
# Environment:
#   NNODES          number of nodes (default 1)
#   NPROC_PER_NODE  ranks per node (default: one per GPU, 1 without nvidia-smi)
#   MASTER_ADDR     the node that hosts the rendezvous (required when NNODES > 1); MASTER_PORT (default 29500)
#   NODE_RANK       unset: c10d rendezvous at MASTER_ADDR:MASTER_PORT, node ranks assigned by torchrun, nodes may
#                   start in any order; RDZV_ID names the run (default kiln; use a distinct id per concurrent run).
#                   set (0..NNODES-1): static rendezvous, node NODE_RANK of NNODES, node 0 at MASTER_ADDR.
#   MAX_RESTARTS    torchrun restarts of the worker group after a failure (default 0)
#   KILN_DRY_RUN=1  print the torchrun command instead of running it
# Network settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, GLOO_SOCKET_IFNAME: docs/cluster.md) belong to the cluster:
# export them beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-1}
if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC_PER_NODE=${NPROC_PER_NODE:-gpu}
else
    NPROC_PER_NODE=${NPROC_PER_NODE:-1}
fi
if [ "$NNODES" -gt 1 ]; then
    : "${MASTER_ADDR:?MASTER_ADDR (the rendezvous host) is required with NNODES=$NNODES}"
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

cmd=(torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --max_restarts="${MAX_RESTARTS:-0}")
if [ -n "${NODE_RANK:-}" ]; then
    cmd+=(--node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
else
    cmd+=(--rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-kiln}")
fi
cmd+=("$@")
if [ "${KILN_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
else
    exec "${cmd[@]}" # exec: signals from srun or the shell reach torchrun, which passes them to the ranks
fi
